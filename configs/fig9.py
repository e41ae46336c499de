"""Fig. 9: layer-wise transfer. A linear probe on every unit's pooled output of a frozen
ImageNet ResNet-34 (a) and ViT-B/32 (b, tokens mean-pooled), with that unit's NC1 on the
CIFAR-10 training data. Writes nc1_vs_accuracy.png.

    python -m ncjax.main --config=configs/fig9.py \
      --config.backbone.resnet34.weights=~/weights/resnet34-b627a593.pth \
      --config.backbone.vit_b32.weights=~/weights/ViT-B_32.npz
"""
import ml_collections

from configs import table3


def get_config():
  c = table3.get_config()
  c.job = "layer_probe"
  c.models = ("resnet34", "vit_b32")
  c.datasets = ("cifar10",)
  c.backbone.resnet34 = table3.resnet("~/weights/resnet34-b627a593.pth", "")
  c.backbone.vit_b32.options = ml_collections.ConfigDict(dict(pool="mean"))
  c.backbone.vit_b32.datasets = ()
  c.optim.epochs = 30
  return c
