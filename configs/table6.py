"""Table 6: ResNet-50 (ImageNet) Layer FT and SCL FT of blocks 1, 4, 8, 14, with linear probe
and full FT, on CIFAR-10, CIFAR-100, Aircraft, DTD, Pets. Weights and data as in table3.py."""
from configs import table3


def get_config():
  c = table3.get_config()
  c.models = ("resnet50",)
  c.backbone.resnet50.unit = ("block1", "block4", "block8", "block14")
  return c
