"""Table 7: ViT-B/32 (ImageNet-21k) Layer FT and SCL FT of layers 2, 5, 8, 11, with linear
probe and full FT, on DTD, Pets, Aircraft. Weights and data as in table3.py."""
from configs import table3


def get_config():
  c = table3.get_config()
  c.models = ("vit_b32",)
  c.backbone.vit_b32.unit = ("layer2", "layer5", "layer8", "layer11")
  return c
