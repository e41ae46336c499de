"""Fig. 4: source NC1 vs transfer accuracy across augmentation levels 1-5 and l_inf adversarial
pre-training (PGD, eps = 1, 2, 3, 5, 8 / 255). ResNet-50 pre-trained on CIFAR-100 (CE), linear
probe on CIFAR-10. `configs/fig4.py:digits` runs the same sweep offline on the digits (small
ResNet-18, 0-4 -> 5-9). Data as in table1.py."""
from configs import table1


def get_config(arg="cifar"):
  c = table1.get_config(arg)
  if arg != "digits":
    c.models = ("resnet50",)
  c.variants = tuple(
      [dict(tag=f"aug{l}", overrides={"pretrain.optim.aug_level": l}) for l in (1, 2, 3, 4, 5)]
      + [dict(tag=f"adv{e}", overrides={"pretrain.optim.aug_level": 3,
                                        "pretrain.adversarial_eps": e / 255})
         for e in (1, 2, 3, 5, 8)])
  return c
