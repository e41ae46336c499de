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
changes it. Everything else is configs/default.py's (the paper's SGD recipe), with 30 epochs
in batches of 16 (at lr 0.0125, the paper's rate per example), so that ResNet-18 at 224 x 224
fits a laptop: memory grows with ``optim.batch_size``, not with the folder. A batch larger than
the training set is capped at its size, and a schedule of fewer than 20 optimizer steps cannot
learn: both are said in one WARNING line before any work (``--config.strict=True``: an error).
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
  # Sized for a laptop CPU: host memory grows with the batches, not with the folder. ResNet-18
  # at 224 x 224 on XLA:CPU takes ~42 MB per training example (full FT) and ~4 MB per
  # evaluated one, over ~0.8 GB for jax, torch and the model: batch 128 peaked at 5.4 GiB,
  # batch 32 at 2.4 GiB, batch 16 stays well under 2.5 GB (`/usr/bin/time -v`, issue 22).
  c.optim.batch_size = 16
  c.optim.lr = 0.0125     # default.py's 0.1 at batch 128: the same rate per example
  c.eval_batch_size = 64
  # A split of at most this many MiB at the model's size (~1,700 images at 224 x 224) is
  # decoded once into memory; a larger one streams from disk, decoded batch by batch.
  c.data_budget_mb = 256
  c.checkpoint_every = 1000
  return c
