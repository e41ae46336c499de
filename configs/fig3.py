"""Fig. 3: projection heads in pre-training. ResNet-50 pre-trained on CIFAR-100 with CE, MSE
and SupCon, each with 1, 2 and 3 projection layers (dropped after pre-training); linear probe
on CIFAR-10; NC1 measured on the source data. Data as in table1.py."""
from configs import table1


def get_config():
  c = table1.get_config()
  c.models = ("resnet50",)
  c.variants = tuple(
      dict(tag=f"{loss}-proj{n}",
           overrides={"pretrain.loss": loss, "pretrain.projection_layers": n,
                      **({"pretrain.optim.lr": 0.01} if loss == "mse" else {})})  # table1.py
      for loss in ("ce", "mse", "supcon") for n in (1, 2, 3))
  return c
