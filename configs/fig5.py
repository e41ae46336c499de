"""Fig. 5: the Fig. 4 models (augmentation levels and adversarial pre-training on CIFAR-100)
transferred by linear probing to CIFAR-10, FGVC-Aircraft, DTD and Pets, against each model's
NC1 on the CIFAR-10 training set (reference_nc1_vs_accuracy.png; Fig. 13 reads the same runs
with NC1 on each downstream dataset itself). Data as in table3.py / table1.py."""
from configs import fig4


def get_config():
  c = fig4.get_config()
  c.datasets = ("cifar10", "aircraft", "dtd", "oxford_iiit_pet")
  c.backbone.default.image_size = 32  # Aircraft/DTD/Pets images resized to the CIFAR size
  return c
