"""Beyond the paper: choose the unit to fine-tune by NC (`unit=auto`, stages.autounit), next
to the exhaustive sweep it replaces. For Layer FT and SCL FT, every block of ResNet-18 is
fine-tuned fully (the sweep) and, after it, `auto` probes each block for a tenth of the
schedule and fine-tunes the one with the lowest penultimate NC1 on the training data.
results.md's "Units chosen by NC" gives the regret (best swept accuracy - the chosen unit's,
points) and the compute of the choice as a fraction of the sweep's.

    python -m ncjax.main --config=configs/auto_unit.py:digits        # offline, this CPU
    python -m ncjax.main --config=configs/auto_unit.py:fashion_mnist  # Debian's Fashion-MNIST
    python -m ncjax.main --config=configs/auto_unit.py --workdir=runs/auto_unit \
      --config.backbone.resnet18.weights=~/weights/resnet18-f37072fd.pth

`:digits` pre-trains on digits 0-4 and transfers to 5-9 (the default job's recipe);
`:fashion_mnist` pre-trains on Fashion-MNIST classes 0-4 and transfers to 5-9 (1000
training images); the default argument uses ImageNet ResNet-18 on Table 3's datasets.
Only the sweep is dropped to use the choice alone: `--config.backbone.resnet18.unit=auto`.
"""
from configs import default, table3

BLOCKS = tuple(f"block{i}" for i in range(1, 9))


def get_config(arg="imagenet"):
  if arg not in ("imagenet", "digits", "fashion_mnist"):
    raise ValueError(f"the argument must be imagenet, digits or fashion_mnist, not {arg!r}")
  if arg == "imagenet":
    c = table3.get_config()
    c.models = ("resnet18",)
    c.backbone.resnet18.unit = BLOCKS + ("auto",)
  else:
    c = default.get_config()
    c.backbone.default.unit = BLOCKS + ("auto",)
  c.methods = ("layer", "scl")
  if arg == "fashion_mnist":
    c.pretrain.dataset = "fashion_mnist"
    c.pretrain.optim.epochs = 2
    c.datasets = ("fashion_mnist",)
    c.train_sizes = (1000,)
  return c
