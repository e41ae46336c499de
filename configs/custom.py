"""Fine-tune your own checkpoint on your own image folder: linear probe, Layer FT, SCL FT, full FT.

    python -m ncjax.main --config=configs/custom.py --workdir=runs/mine \
      --config.data=folder:~/data/flowers \
      --config.weights=~/weights/resnet50-0676ba61.pth \
      --config.model=resnet50

Three fields, each set on the command line:

* ``data``: the images, ``folder:<dir>`` laid out as ``<dir>/train/<class>/*.jpg`` and
  ``<dir>/test/<class>/*.jpg`` (any size, JPEG or PNG, grayscale or colour: every image is
  fitted to the model's 224 x 224 RGB input), or any other `ncjax.data.load` source (a TFDS
  name such as ``cifar10``). Every class is used; results call the dataset ``custom``.
* ``weights``: a torchvision ResNet state dict (``.pth`` / ``.safetensors`` / ``.npz``), a
  vit_jax ``.npz``, or a run of ncjax itself: ``<workdir>/runs/<run id>`` (its newest
  checkpoint), its ``checkpoints/`` or one ``checkpoints/<step>/``; the classifier is replaced
  by one for your classes. A checkpoint of another architecture is reported before any work,
  with what it looks like. '' trains from scratch.
* ``model``: resnet18, resnet34, resnet50 (ImageNet stem, width 64, ImageNet normalisation) or
  vit_b32, vit_b16, vit_s16, vit_ti16 (vit_jax's [-1, 1] input scaling, class-token pooling).

Layer FT and SCL FT tune one mid-network unit: block5 of resnet18 and block8 of resnet50 (the
paper's Table 3), block8 of resnet34, layer8 of the ViTs; ``--config.backbone.<model>.unit=``
changes it. Everything else is configs/default.py's (the paper's SGD recipe), with 30 epochs.
"""
import ml_collections

from configs import default

RESNETS = {"resnet18": "block5", "resnet34": "block8", "resnet50": "block8"}
VITS = {"vit_b32": "layer8", "vit_b16": "layer8", "vit_s16": "layer8", "vit_ti16": "layer8"}


def get_config():
  c = default.get_config()
  # The three fields to set. The fields ncjax reads take them by reference (`get_ref`): an
  # override of `model` is an override of `models`, and so on.
  c.model = "resnet50"
  c.data = "folder:~/data/custom"
  c.weights = "~/weights/resnet50-0676ba61.pth"
  del c["models"]  # a tuple in default.py; here one name, which `models` also accepts
  c.models = c.get_ref("model")
  c.datasets = ("custom",)
  c.dataset_sources = ml_collections.ConfigDict({"custom": c.get_ref("data")})
  c.downstream_classes = ""  # all classes
  c.pretrain.enabled = False
  c.backbone.default.weights = c.get_ref("weights")
  for name, unit in RESNETS.items():
    c.backbone[name] = ml_collections.ConfigDict(dict(
        unit=(unit,), image_size=224, channels=3, normalization="imagenet",
        options=ml_collections.ConfigDict(dict(stem="imagenet", width=64))))
  for name, unit in VITS.items():
    c.backbone[name] = ml_collections.ConfigDict(dict(
        unit=(unit,), image_size=224, channels=3, normalization="inception",
        options=ml_collections.ConfigDict(dict(pool="cls"))))
  c.optim.epochs = 30
  c.eval_batch_size = 256
  c.checkpoint_every = 1000
  return c
