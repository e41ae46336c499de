"""Table 3: linear probe / Layer FT / SCL FT / full FT of ImageNet ResNet-18 (block5),
ResNet-50 (block8) and ViT-B/32 (layer8) on CIFAR-10, CIFAR-100, FGVC-Aircraft, DTD, Pets.

    python -m ncjax.main --config=configs/table3.py --workdir=runs/table3 \
      --config.backbone.resnet18.weights=~/weights/resnet18-f37072fd.pth \
      --config.backbone.resnet50.weights=~/weights/resnet50-0676ba61.pth \
      --config.backbone.vit_b32.weights=~/weights/ViT-B_32.npz

Weights: torchvision's model zoo (https://download.pytorch.org/models/resnet18-f37072fd.pth,
resnet50-0676ba61.pth: the v1 ImageNet weights) and vit_jax's ImageNet-21k ViT-B/32
(gs://vit_models/imagenet21k/ViT-B_32.npz). Data: TFDS `cifar10`, `cifar100`,
`oxford_iiit_pet`, `dtd` prepared under --config.data_dir (``tfds build <name>`` on a machine
with internet), and FGVC-Aircraft as an image folder ``<dir>/{train,test}/<class>/*.jpg``
(--config.dataset_sources.aircraft=folder:<dir>).
"""
import ml_collections

from configs import default


def resnet(weights, unit):
  return ml_collections.ConfigDict(dict(
      weights=weights, unit=(unit,) if unit else (), image_size=224, channels=3,
      normalization="imagenet", datasets=(), options=ml_collections.ConfigDict(dict(stem="imagenet", width=64))))


def get_config():
  c = default.get_config()
  c.models = ("resnet18", "resnet50", "vit_b32")
  c.datasets = ("cifar10", "cifar100", "aircraft", "dtd", "oxford_iiit_pet")
  c.downstream_classes = ""
  c.pretrain.enabled = False
  c.backbone.resnet18 = resnet("~/weights/resnet18-f37072fd.pth", "block5")
  c.backbone.resnet50 = resnet("~/weights/resnet50-0676ba61.pth", "block8")
  # The paper's ViT-B/32 runs at 384x384 (145 tokens), vit_jax's [-1, 1] input scaling.
  c.backbone.vit_b32 = ml_collections.ConfigDict(dict(
      weights="~/weights/ViT-B_32.npz", unit=("layer8",), image_size=384, channels=3,
      normalization="inception", datasets=("aircraft", "dtd", "oxford_iiit_pet"),
      options=ml_collections.ConfigDict(dict(pool="cls"))))
  c.optim.epochs = 200
  c.optim.batch_size = 128
  c.optim.aug_level = 1
  c.eval_batch_size = 256
  c.checkpoint_every = 1000
  return c
