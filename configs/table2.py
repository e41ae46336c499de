"""Table 2: few-shot transfer and NC. ConvNet4, ResNet12 and SEResNet12 pre-trained with
cross-entropy on the 64 meta-train classes of CIFAR-FS and of miniImageNet (one variant each),
frozen; 5-way 1-shot and 5-shot episodes (15 queries, 600 episodes) on the 20 meta-test
classes, a logistic regression on the L2-normalised support embeddings (RFS); accuracy +- 95%
CI, and NC1 of the embeddings on the meta-test classes (and, as `source_nc1`, on the
meta-train classes).

    python -m ncjax.main --config=configs/table2.py --workdir=runs/table2        # both datasets
    python -m ncjax.main --config=configs/table2.py:cifar_fs --workdir=runs/t2c  # one of them
    python -m ncjax.main --config=configs/table2.py:mini_imagenet --workdir=runs/t2m
    python -m ncjax.main --config=configs/table2.py:digits   # offline: digits 0-4 -> 5-way on 5-9

Data (`ncjax.data`, few-shot sources): `cifar_fs` is TFDS `cifar100` under --config.data_dir,
train and test pooled (600 images a class) under CIFAR-FS's class split; `mini_imagenet` reads
Ravi & Larochelle's train/val/test.csv and images/ from `dataset_sources.mini_imagenet`.
Pre-training trains on the `train` split of the meta-train classes and reports its source
accuracy on `test`, a fixed 10% of each meta-train class held out of pre-training; episodes
draw from `meta_test` (all images of the meta-test classes).

Recipe (RFS, Tian et al. 2020, §4 and train_supervised.py): SGD momentum 0.9, lr 0.05, weight
decay 5e-4, batch 64, x0.1 step decays after whole epochs. miniImageNet: 100 epochs, decays
after 60 and 80 (the script's defaults; "the third decay has no effect"). CIFAR-FS: 90 epochs
and three decays, whose epochs RFS does not give (WangYueFt/rfs issue 29): 45, 60, 75 here.
"""
import ml_collections

from configs import default

# RFS's optimisation for both datasets; each dataset's length and decays below.
_RECIPE = dict(steps=0, lr=0.05, weight_decay=5e-4, batch_size=64, aug_level=3,
               schedule="step", decay_factor=0.1)
_CIFAR_FS = dict(epochs=90, decay_epochs=(45, 60, 75))
_MINI_IMAGENET = dict(epochs=100, decay_epochs=(60, 80))


def _dataset(name, size, normalization, optim):
  """Overrides that pre-train on `name`'s meta-train classes and test on its meta-test ones."""
  return {"pretrain.dataset": name, "datasets": (name,), "backbone.default.image_size": size,
          "backbone.default.normalization": normalization,
          **{f"pretrain.optim.{k}": v for k, v in optim.items()}}


_DATASETS = {"cifar_fs": _dataset("cifar_fs", 32, "cifar10", _CIFAR_FS),
             "mini_imagenet": _dataset("mini_imagenet", 84, "imagenet", _MINI_IMAGENET)}


def get_config(arg="all"):
  c = default.get_config()
  c.job = "fewshot"
  c.models = ("convnet4", "resnet12", "seresnet12")
  c.methods = ("linear",)
  c.collapse = False
  c.backbone.default.unit = ()
  c.backbone.default.options = ml_collections.ConfigDict()
  c.backbone.default.channels = 3
  c.pretrain.loss = "ce"
  c.pretrain.classes = c.downstream_classes = ""  # the datasets' splits hold the classes
  c.pretrain.optim = ml_collections.ConfigDict({**_RECIPE, **_CIFAR_FS})
  c.fewshot.shots = (1, 5)
  c.fewshot.split = "meta_test"
  c.dataset_sources.mini_imagenet = "mini_imagenet:~/data/mini-imagenet"
  if arg == "digits":
    c.pretrain.dataset, c.pretrain.classes = "digits", "0-4"
    c.datasets, c.downstream_classes = ("digits",), "5-9"
    c.backbone.default.image_size = 32
    c.fewshot.split = "train"  # digits 5-9 have no meta split: their training images
    # 14 epochs of 11 steps (719 images, batch 64), CIFAR-FS's decays scaled from 90 epochs.
    c.pretrain.optim.update(dict(epochs=14, decay_epochs=(7, 9, 12), aug_level=2))
    return c
  c.update_from_flattened_dict(_DATASETS["cifar_fs" if arg == "all" else arg])
  if arg == "all":  # one pre-training per dataset: a variant each, runs under runs/<tag>/
    c.variants = tuple(dict(tag=name, overrides=o) for name, o in _DATASETS.items())
  return c
