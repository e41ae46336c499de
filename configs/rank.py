"""Beyond the paper: rank candidate pre-trained models for a downstream dataset without
fine-tuning them (job 'rank', stages.score). Every candidate is scored from its frozen
penultimate features of the downstream training split by -NC1, LogME, H-score, LEEP (where
the candidate has a source classifier) and NCTI, then fine-tuned (linear probe and Layer FT)
for the ground truth; results.md gives each estimator's Kendall tau against the measured
accuracy and its time, scores_vs_accuracy.png one panel per estimator.

    python -m ncjax.main --config=configs/rank.py:digits      # offline zoo, this CPU
    python -m ncjax.main --config=configs/rank.py --workdir=runs/rank \
      --config.backbone.resnet18.weights=~/weights/resnet18-f37072fd.pth ...

`:digits` builds a zoo of 6 ResNet-18s (CIFAR stem, width 16) pre-trained on digits 0-4
that differ in loss (CE, MSE, SupCon), projection head, augmentation and length, and ranks
them for transfer to digits 5-9. The default argument ranks torchvision's ImageNet
ResNet-18/50, DenseNet-121 and MobileNetV2 (weights files as in configs/table3.py) on
Table 3's datasets by the linear probe.
"""
import ml_collections

from configs import default, table3

# The zoo: pre-training variants of the default ResNet-18 (Table 1 / Figs. 3-5 machinery).
ZOO = (
    dict(tag="ce", overrides={"pretrain.loss": "ce"}),
    dict(tag="ce-short", overrides={"pretrain.loss": "ce", "pretrain.optim.epochs": 3}),
    dict(tag="ce+mlp", overrides={"pretrain.loss": "ce", "pretrain.projection_layers": 2}),
    dict(tag="ce-crop", overrides={"pretrain.loss": "ce", "pretrain.optim.aug_level": 2}),
    # The square loss diverges at lr 0.1 (configs/table1.py).
    dict(tag="mse", overrides={"pretrain.loss": "mse", "pretrain.optim.lr": 0.01}),
    dict(tag="supcon+mlp", overrides={"pretrain.loss": "supcon",
                                      "pretrain.projection_layers": 2,
                                      "pretrain.optim.aug_level": 2}),
)

TORCHVISION = {
    "resnet18": "~/weights/resnet18-f37072fd.pth",
    "resnet50": "~/weights/resnet50-0676ba61.pth",
    "densenet121": "~/weights/densenet121-a639ec97.pth",
    "mobilenet_v2": "~/weights/mobilenet_v2-b0353104.pth",
}


def torchvision_backbone(model, weights):
  """A torchvision ImageNet backbone at 224 with ImageNet normalisation."""
  options = dict(stem="imagenet", width=64) if model.startswith("resnet") else {}
  return ml_collections.ConfigDict(dict(
      weights=weights, unit=(), image_size=224, channels=3, normalization="imagenet",
      datasets=(), options=ml_collections.ConfigDict(options)))


def get_config(arg="imagenet"):
  if arg not in ("imagenet", "digits"):
    raise ValueError(f"the argument must be imagenet or digits, not {arg!r}")
  if arg == "digits":
    c = default.get_config()
    c.job = "rank"
    c.variants = ZOO
    c.methods = ("linear", "layer")
    return c
  c = table3.get_config()
  c.job = "rank"
  c.methods = ("linear",)
  c.models = tuple(TORCHVISION)
  for name, path in TORCHVISION.items():
    c.backbone[name] = torchvision_backbone(name, path)
  return c
