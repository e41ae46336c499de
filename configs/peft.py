"""Beyond the paper (issue 19): Layer FT and SCL FT against what researchers use instead.

Linear probe, BitFit, LoRA (ranks 4 and 16), LP-FT, Layer FT, SCL FT and full FT; Layer FT /
SCL FT sweep every unit and choose one with ``unit=auto`` under both selectors (NC probes
and Auto-RGN, `unit_selector='both'`), so results.md's "Units chosen" table gives each
selector's regret against the sweep and its cost. ``seeds`` sweeps the whole job,
pre-training included, once per seed (runs/s0/, runs/s1/, ...); the report's
"Fine-tuning methods compared" table gives accuracy mean ± 95% CI over the seeds, NC1, the
percentage of parameters trained and the step time, and accuracy_vs_params.png the Pareto
front.

    python -m ncjax.main --config=configs/peft.py:digits --workdir=runs/peft_digits  # offline
    python -m ncjax.main --config=configs/peft.py:fashion_mnist --workdir=runs/peft_fmnist
    python -m ncjax.main --config=configs/peft.py --workdir=runs/peft \\
      --config.backbone.resnet18.weights=~/weights/resnet18-f37072fd.pth \\
      --config.backbone.vit_b32.weights=~/weights/ViT-B_32.npz
    python -m ncjax.main --config=configs/peft.py:vit --workdir=runs/peft_vit \\
      --config.backbone.vit_b32.weights=~/weights/ViT-B_32.npz

* ``:digits``: the default job (ResNet-18, CIFAR stem, width 16, pre-trained on digits 0-4,
  transferred to 5-9), offline in minutes.
* ``:fashion_mnist``: Debian's Fashion-MNIST; pre-train on classes 0-4, transfer to 5-9 at
  50 and 1000 training images.
* default: Table 3's datasets and weights (ImageNet ResNet-18 and vit_jax ViT-B/32), LoRA
  on the convolutions of the ResNet and the attention and MLP kernels of the ViT.
* ``:vit``: ViT-B/32 alone with VPT-deep added and LoRA on the attention kernels only.

Seeds: ``SEEDS`` below, or ``--config.seeds=0,1,2,3,4``. LoRA's alpha stays 8 for every rank
(Hu et al.: alpha is set once and not tuned), so the update's scale is 8 / r.
"""
from configs import default, table3

SEEDS = (0, 1, 2)
METHODS = ("linear", "bitfit", "lora", "lp_ft", "layer", "scl", "full")



def get_config(arg="imagenet"):
  if arg not in ("imagenet", "digits", "fashion_mnist", "vit"):
    raise ValueError(f"the argument must be imagenet, digits, fashion_mnist or vit, not {arg!r}")
  if arg in ("imagenet", "vit"):
    c = table3.get_config()
    c.models = ("resnet18", "vit_b32") if arg == "imagenet" else ("vit_b32",)
    c.backbone.resnet18.unit = tuple(f"block{i}" for i in range(1, 9)) + ("auto",)
    c.backbone.vit_b32.unit = tuple(f"layer{i}" for i in range(1, 13)) + ("auto",)
  else:
    c = default.get_config()
    c.backbone.default.unit = tuple(f"block{i}" for i in range(1, 9)) + ("auto",)
  c.methods = METHODS + (("vpt",) if arg == "vit" else ())
  c.unit_selector = "both"
  c.lora.rank = (4, 16)
  c.lora.alpha = 8.0
  c.lora.targets = ("attention",) if arg == "vit" else ("attention", "mlp", "conv")
  c.lp_ft.probe_fraction = 0.5
  c.vpt.tokens = 10
  c.vpt.deep = True
  if arg == "fashion_mnist":
    c.pretrain.dataset = "fashion_mnist"
    c.pretrain.optim.epochs = 2
    c.datasets = ("fashion_mnist",)
    c.train_sizes = (50, 1000)
  c.seeds = SEEDS
  return c
