"""Table 5: ResNet-18 (ImageNet) Layer FT and SCL FT of blocks 1, 3, 5, 7, with linear probe
and full FT, on CIFAR-10, CIFAR-100, Aircraft, DTD, Pets. Weights and data as in table3.py."""
from configs import table3


def get_config():
  c = table3.get_config()
  c.models = ("resnet18",)
  c.backbone.resnet18.unit = ("block1", "block3", "block5", "block7")
  return c
