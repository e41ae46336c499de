"""Fig. 6: downstream NC1 of public ImageNet-1k models against their transfer accuracy, through
job 'rank' (stages.score): torchvision's ResNet-18/34/50/101/152, DenseNet-121 and
MobileNetV2, frozen, on CIFAR-10, Pets, DTD and FGVC-Aircraft. Each model is scored by -NC1
(and LogME, H-score, LEEP, NCTI beside it) on the downstream training split, and its
linear-probe accuracy is the ground truth; results.md gives Kendall's tau per estimator and
scores_vs_accuracy.png the paper's scatter (its -NC1 panel).

    python -m ncjax.main --config=configs/fig6.py --workdir=runs/fig6

Weights: torchvision's v1 ImageNet state dicts under ~/weights (override per model with
--config.backbone.<model>.weights=...): resnet18-f37072fd.pth, resnet34-b627a593.pth,
resnet50-0676ba61.pth, resnet101-63fe2227.pth, resnet152-394f9c45.pth,
densenet121-a639ec97.pth, mobilenet_v2-b0353104.pth from https://download.pytorch.org/models/.
Data as in configs/table3.py.
"""
from configs import rank

WEIGHTS = {
    "resnet18": "~/weights/resnet18-f37072fd.pth",
    "resnet34": "~/weights/resnet34-b627a593.pth",
    "resnet50": "~/weights/resnet50-0676ba61.pth",
    "resnet101": "~/weights/resnet101-63fe2227.pth",
    "resnet152": "~/weights/resnet152-394f9c45.pth",
    "densenet121": "~/weights/densenet121-a639ec97.pth",
    "mobilenet_v2": "~/weights/mobilenet_v2-b0353104.pth",
}


def get_config():
  c = rank.get_config()
  c.models = tuple(WEIGHTS)
  c.datasets = ("cifar10", "oxford_iiit_pet", "dtd", "aircraft")
  for name, path in WEIGHTS.items():
    c.backbone[name] = rank.torchvision_backbone(name, path)
  return c
