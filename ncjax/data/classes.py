"""The few-shot benchmarks' class lists: CIFAR-FS's 64/16/20 split of CIFAR-100 (Bertinetto et
al.) and miniImageNet's CSVs (Ravi & Larochelle), read from a user's copy.
"""
from __future__ import annotations

import csv
import os
from typing import NamedTuple, Sequence

import numpy as np


# CIFAR-100's 100 fine label names in label-id order, which is alphabetical: the order of
# `fine_label_names` in the dataset's `meta` file, which TFDS `cifar100` (its
# `fine_label_names.txt`) and torchvision's `CIFAR100.classes` keep.
CIFAR100_LABEL_NAMES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm")

# CIFAR-FS (Bertinetto, Henriques, Torr, Vedaldi, ICLR 2019) class split, 64/16/20 classes,
# sorted by name. Source: the split of bertinetto/r2d2 (data/cifar-fs/splits/bertinetto/
# {train,val,test}.txt, not in that repository's public snapshot) as shipped in
# tristandeleu/pytorch-meta torchmeta/datasets/assets/cifar100/cifar-fs/{train,val,test}.json;
# the val and test lists agree name for name with two further public copies of the split
# (a `cls_name['valid'/'test']` preparation script and a `novel_classes` list).
CIFAR_FS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus",
        "can", "castle", "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup",
        "dinosaur", "dolphin", "elephant", "forest", "girl", "hamster", "house", "kangaroo",
        "keyboard", "lawn_mower", "lion", "lizard", "lobster", "mountain", "mouse", "mushroom",
        "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate", "porcupine",
        "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper",
        "snake", "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train",
        "trout", "tulip", "turtle", "willow_tree", "wolf"),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
        "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor"),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck",
        "plain", "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone",
        "wardrobe", "whale", "woman", "worm"),
}


def cifar_fs_class_ids(split: str,
                       label_names: Sequence[str] = CIFAR100_LABEL_NAMES) -> np.ndarray:
  """CIFAR-100 label ids (sorted, int64) of CIFAR-FS split 'train' (64), 'val' (16) or
  'test' (20), given CIFAR-100's fine label names in id order (a dataset's own names, e.g.
  TFDS `info.features['label'].names`, or :data:`CIFAR100_LABEL_NAMES`). The meta-train
  set is both CIFAR-100 splits' images of the 'train' classes, the meta-test set theirs of
  the 'test' classes (600 images per class)."""
  if split not in CIFAR_FS_CLASSES:
    raise ValueError(f"split must be one of {', '.join(CIFAR_FS_CLASSES)}, got {split!r}")
  index = {name: i for i, name in enumerate(label_names)}
  missing = [c for c in CIFAR_FS_CLASSES[split] if c not in index]
  if missing:
    raise ValueError(f"CIFAR-FS {split} classes missing from the label names: {missing}")
  return np.sort(np.asarray([index[c] for c in CIFAR_FS_CLASSES[split]], np.int64))


class MiniImageNetSplit(NamedTuple):
  """One split: paths (list of N image paths), labels (N,) int32 in 0..K-1, classes (K,
  WordNet ids, sorted; label j is classes[j])."""
  paths: list[str]
  labels: np.ndarray
  classes: tuple[str, ...]


MINI_IMAGENET_HOWTO = (
    "miniImageNet (Ravi & Larochelle, ICLR 2017) is not downloadable automatically: put the "
    "split files train.csv, val.csv, test.csv (rows 'filename,label', e.g. "
    "'n0153282900000005.jpg,n01532829'; twitter/meta-learning-lstm data/miniImagenet) in the "
    "data directory and the 60,000 84x84 images (made from ImageNet with that repository's "
    "or a common 'images.zip' preparation) in <data dir>/images/<filename>; name the directory "
    "as 'mini_imagenet:<data dir>' (configs: dataset_sources.mini_imagenet)")


def load_mini_imagenet(root, splits: Sequence[str] = ("train", "val", "test"), *,
                       csv_dir=None, check_files: bool = True) -> dict[str, MiniImageNetSplit]:
  """Reads miniImageNet's Ravi & Larochelle split: `<csv_dir or root>/<split>.csv` rows
  `filename,label` (a header row `filename,label` is skipped) and images
  `<root>/images/<filename>`. Returns {split: MiniImageNetSplit} with labels numbered per
  split over its sorted WordNet ids (64/16/20 classes, 600 images each in the real data).
  Pure: reads the CSV files (and, with `check_files`, stats every image); decodes nothing.
  Raises FileNotFoundError, saying how to get the data, for a missing CSV or image.
  """
  root = os.fspath(root)
  csv_dir = root if csv_dir is None else os.fspath(csv_dir)
  out = {}
  for split in splits:
    path = os.path.join(csv_dir, f"{split}.csv")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found. {MINI_IMAGENET_HOWTO}")
    with open(path, newline="") as f:
      rows = [r for r in csv.reader(f) if r]
    if rows and [c.strip() for c in rows[0][:2]] == ["filename", "label"]:
      rows = rows[1:]
    bad = [r for r in rows if len(r) != 2]
    if bad:
      raise ValueError(f"{path}: expected rows 'filename,label', got {bad[0]!r}")
    names = [r[0].strip() for r in rows]
    wnids = [r[1].strip() for r in rows]
    classes, labels = np.unique(np.asarray(wnids, dtype=str), return_inverse=True)
    paths = [os.path.join(root, "images", n) for n in names]
    if check_files:
      missing = [p for p in paths if not os.path.isfile(p)]
      if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} {split} images are "
                                f"missing, e.g. {missing[0]}. {MINI_IMAGENET_HOWTO}")
    out[split] = MiniImageNetSplit(paths, labels.astype(np.int32).reshape(-1),
                                   tuple(str(c) for c in classes))
  return out
