"""Datasets, batching and on-device pre-processing for ncjax.

What is held where (host memory never scales with the *model's* input resolution):

* **Labels** (int32, N) are always in host memory.
* **Images** stay ``uint8`` NHWC at the source's *native* resolution (CIFAR 32x32, Fashion-MNIST
  28x28, digits 8x8).  They are resized to the model's input size **on the device, per batch,
  after augmentation** (:func:`preprocess`).  Sources whose images differ in size (Pets, DTD,
  Aircraft, most image folders), or are larger than the model's input, are decoded once to a
  bounded size: scaled so that they cover ``decode_size`` (the shorter side becomes the model's
  size), then centre-cropped to it (:func:`fit_image`).
* TFDS and image-folder splits load **lazily**: :func:`load` returns a dataset whose
  ``images`` is an :class:`ImageSource`, an array-like that decodes rows by index.  Class
  selection and ``balanced_subset`` act on the labels only, so subsets are taken before any
  image is decoded.  :func:`materialize` then decodes the chosen rows into one numpy array
  when they fit a memory budget; a larger split (ImageNet scale) stays an
  :class:`ImageSource` and is read by index, batch by batch, in a background thread
  (``ncjax.train`` wraps its batch iterators in :func:`prefetch`).
* On the device: one batch of uint8 images at a time, its pre-processed float copy, and (for
  linear probes) the cached (N, D) features.

Sources (every loader returns an :class:`ArrayDataset` of ``uint8`` NHWC images and ``int32``
labels):

* ``digits``: scikit-learn's ``load_digits()`` (1,797 8x8 images, shipped inside the wheel),
  split 80/20 per class with a fixed seed.
* ``fashion_mnist`` / ``mnist`` / ``idx:<dir>``: MNIST-format IDX files (gzipped or not).
  Fashion-MNIST defaults to ``/usr/share/datasets/fashion-mnist`` (Debian package
  ``dataset-fashion-mnist``).  When no IDX files are found, ``fashion_mnist`` / ``mnist``
  fall back to TFDS.
* ``folder:<dir>``: an image folder ``<dir>/<split>/<class>/*.{jpg,png,...}`` (e.g.
  FGVC-Aircraft, which TFDS lacks; ``fgvc_aircraft`` with ``data_dir=<dir>`` is an alias).
* few-shot benchmarks (Table 2), split by class: ``cifar_fs`` (TFDS ``cifar100``, train and
  test pooled, 600 images per class, Bertinetto et al.'s 64/16/20 classes) and
  ``mini_imagenet:<dir>`` (Ravi & Larochelle's CSVs and ``<dir>/images/``). Splits
  ``meta_train`` / ``meta_val`` / ``meta_test`` are all images of those classes; ``train`` /
  ``test`` divide ``meta_train`` for pre-training: ``test`` is a fixed 10% of each meta-train
  class (:data:`FEWSHOT_HOLDOUT`), held out so that the source accuracy is measured on
  images the 64-way classifier has not seen, of the classes it knows.
* anything else: TFDS through ``tfds.data_source`` (array_record files; TensorFlow is *not*
  needed).  ``tensorflow_datasets`` is imported only on this path.

Device side (JAX): :func:`normalize`, :func:`resize`, :func:`augment` and
:func:`preprocess` are pure, jittable functions.  We pre-process on the accelerator rather
than in a host pipeline (tf.data / torchvision workers) because

1. the host loop stays trivially cheap: it only gathers ``uint8`` rows by a permutation, and
   ``uint8`` batches are 4x smaller to transfer than ``float32`` ones;
2. crop / flip / colour jitter / resize are tiny elementwise kernels next to a ResNet step,
   so on a GPU/TPU they cost almost nothing, whereas with 2 host cores a Python/PIL
   per-image pipeline would be the bottleneck (see ``benchmarks/input_pipeline.py``);
3. the same code runs on CPU, GPU and TPU with no TensorFlow dependency, and randomness is
   an explicit JAX key, so a run is reproducible from ``(seed, step)`` alone.

Augmentation levels (paper Fig. 4/5): 1 standardise only; 2 + random crop (pad 4);
3 + horizontal flip; 4 + colour jitter; 5 + random grayscale.  Augmentations act on float
images in ``[0, 1]`` *before* normalisation (as torchvision's ``ToTensor -> aug ->
Normalize``), and at the dataset's native resolution before any up-sizing (cheaper, and the
4-pixel crop keeps its meaning relative to a 32x32 image).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import os
import pathlib
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

__all__ = [
    "ArrayDataset", "ImageSource", "load", "materialize", "fit_image", "balanced_subset", "select_classes", "class_counts",
    "read_idx", "write_idx", "prefetch",
    "normalize", "resize", "augment", "preprocess", "Preprocess", "dataset_stats", "stats_for",
    "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN",
    "CIFAR100_STD", "MNIST_MEAN", "MNIST_STD", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
    "FIG11_SIZES", "FASHION_MNIST_CLASSES", "DEFAULT_FASHION_MNIST_DIR", "concatenate",
    "holdout_mask", "FEWSHOT_HOLDOUT",
]

# ---------------------------------------------------------------------------------------------
# Constants.  Statistics are per channel, in [0, 1] units (pixel / 255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

_STATS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "fashion_mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}

#: Cifar-10 training-subset sizes of the paper's Fig. 11.
FIG11_SIZES = (10, 24, 59, 142, 344, 835, 2022, 4898)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_DEFAULT_IDX_DIRS = {
    "fashion_mnist": (DEFAULT_FASHION_MNIST_DIR,),
    "mnist": ("/usr/share/datasets/mnist",),
}

#: Friendly names (lower case, '-' -> '_') -> TFDS names.
TFDS_ALIASES = {
    "cifar10": "cifar10", "cifar_10": "cifar10",
    "cifar100": "cifar100", "cifar_100": "cifar100",
    "oxford_iiit_pet": "oxford_iiit_pet", "pets": "oxford_iiit_pet",
    "oxford_pets": "oxford_iiit_pet",
    "dtd": "dtd", "textures": "dtd",
}
_AIRCRAFT_NAMES = ("fgvc_aircraft", "aircraft")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

_AIRCRAFT_HELP = (
    "FGVC-Aircraft is not in TFDS. Download fgvc-aircraft-2013b "
    "(https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/) and lay it out as an image folder "
    "<dir>/<split>/<class>/<image>.jpg, e.g. for every line '<id> <variant>' of "
    "data/images_variant_trainval.txt copy data/images/<id>.jpg to <dir>/train/<variant>/, and "
    "likewise images_variant_test.txt -> <dir>/test/ (replace '/' in variant names such as "
    "'F-16A/B' by '_'). Then call load('folder:<dir>', 'train', decode_size=224) or "
    "load('fgvc_aircraft', 'train', data_dir='<dir>', decode_size=224).")


# ---------------------------------------------------------------------------------------------
# The in-memory dataset.

@dataclasses.dataclass
class ArrayDataset:
  """An in-memory image-classification dataset.

  Attributes:
    images: (N, H, W, C) ``uint8`` (0..255) or ``float32`` (assumed in [0, 1]) numpy array,
      or an :class:`ImageSource` (uint8, decoded lazily by index).
    labels: (N,) ``int32`` in ``[0, num_classes)``.
    num_classes: K.
    name: a human-readable name (e.g. ``'cifar10:train'``).
    class_names: K strings; defaults to ``['0', ..., 'K-1']``.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str = ""
  class_names: list[str] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    images = self.images if isinstance(self.images, ImageSource) else np.asarray(self.images)
    if images.ndim != 4:
      raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if images.dtype == np.float64:
      images = images.astype(np.float32)
    if images.dtype not in (np.uint8, np.float32):
      raise ValueError(f"images must be uint8 or float32, got {images.dtype}")
    labels = np.asarray(self.labels)
    if labels.ndim != 1:
      raise ValueError(f"labels must be (N,), got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int32)
    if len(labels) != len(images):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.num_classes = int(self.num_classes)
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                       f"[{labels.min()}, {labels.max()}]")
    names = [str(c) for c in (self.class_names or range(self.num_classes))]
    if len(names) != self.num_classes:
      raise ValueError(f"{len(names)} class_names for {self.num_classes} classes")
    self.images, self.labels, self.class_names = images, labels, names

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def take(self, indices, name: str | None = None) -> "ArrayDataset":
    """The examples at ``indices`` (a copy), same classes."""
    indices = np.asarray(indices, dtype=np.int64)
    images = (self.images.take(indices) if isinstance(self.images, ImageSource)
              else self.images[indices])
    return ArrayDataset(images, self.labels[indices], self.num_classes,
                        self.name if name is None else name, list(self.class_names))


def class_counts(ds: ArrayDataset) -> np.ndarray:
  """(K,) number of examples per class."""
  return np.bincount(ds.labels, minlength=ds.num_classes)


# ---------------------------------------------------------------------------------------------
# Lazily decoded images.

def _as_hw(image_size) -> tuple[int, int] | None:
  if image_size is None:
    return None
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  h, w = image_size
  return int(h), int(w)


def fit_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """One uint8 HWC image scaled (bilinear, antialiased when shrinking) so that it covers
  ``hw`` = (H, W), then centre-cropped to exactly H x W.  For a square target this is the
  usual "shorter side to the model's size, centre crop", so no image is distorted and no
  decoded image is larger than the model needs."""
  from PIL import Image

  h, w = hw
  ih, iw = image.shape[:2]
  if (ih, iw) == (h, w):
    return image
  scale = max(h / ih, w / iw)
  # Round the covering size up by at most a pixel so the crop never runs out of image.
  sh, sw = max(h, int(round(ih * scale))), max(w, int(round(iw * scale)))
  gray = image.shape[-1] == 1
  im = Image.fromarray(image[..., 0] if gray else image).resize((sw, sh), Image.BILINEAR)
  top, left = (sh - h) // 2, (sw - w) // 2
  out = np.asarray(im.crop((left, top, left + w, top + h)))
  return out[..., None] if gray else out


class ImageSource:
  """A lazily decoded (N, H, W, C) ``uint8`` image array.

  Indexing with an int, a slice or an integer array decodes just those rows (in a thread
  pool: PIL releases the GIL while decoding), so a split can be subset, streamed batch by
  batch, or :func:`materialize`-d without ever holding more than it needs.

  Args:
    read: ``read(ids) -> list of HWC uint8 arrays`` for a list of *source* row ids.
    ids: (N,) the source rows this array covers (a view after :meth:`take`).
    shape: (H, W, C) of every decoded row; rows of another size are passed through
      :func:`fit_image` (``fit=True``) or rejected.
    name: for error messages.
  """

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(self, read: Callable[[list[int]], list[np.ndarray]], ids, shape, *,
               fit: bool, name: str = ""):
    self._read, self._ids = read, np.asarray(ids, np.int64)
    self._row_shape, self._fit, self.name = tuple(int(s) for s in shape), fit, name

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self._ids),) + self._row_shape

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  def __len__(self) -> int:
    return len(self._ids)

  def take(self, indices) -> "ImageSource":
    """A view of rows ``indices`` (nothing is decoded)."""
    return ImageSource(self._read, self._ids[np.asarray(indices, np.int64)], self._row_shape,
                       fit=self._fit, name=self.name)

  def _decode(self, ids: np.ndarray) -> np.ndarray:
    out = np.empty((len(ids),) + self._row_shape, np.uint8)
    h, w, c = self._row_shape
    for j, im in enumerate(self._read([int(i) for i in ids])):
      im = np.asarray(im, np.uint8)
      if im.ndim == 2:
        im = im[..., None]
      if im.shape[-1] != c:
        raise ValueError(f"{self.name}: an image has {im.shape[-1]} channels, "
                         f"expected {c}")
      if im.shape[:2] != (h, w):
        if not self._fit:
          raise ValueError(f"{self.name}: images have different sizes ({im.shape[:2]} "
                           f"and {(h, w)}); pass decode_size=... to fit them")
        im = fit_image(im, (h, w))
      out[j] = im
    return out

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, (int, np.integer)):
      return self._decode(self._ids[[int(index)]])[0]
    return self._decode(self._ids[index])

  def __array__(self, dtype=None, copy=None):
    return self[:] if dtype is None else self[:].astype(dtype)


def materialize(ds: "ArrayDataset", budget_mb: float = 4096) -> "ArrayDataset":
  """Decodes a lazily loaded dataset into one in-memory numpy array when its uint8 images
  take at most ``budget_mb`` MiB; otherwise returns it unchanged (it then streams from disk
  by index).  Call it *after* taking subsets, so only the rows used are decoded."""
  if not isinstance(ds.images, ImageSource):
    return ds
  if budget_mb < 0:
    raise ValueError(f"budget_mb must be >= 0, got {budget_mb}")
  src = ds.images
  if src.nbytes > budget_mb * 2 ** 20:
    logging.info("%s: %.0f MiB of images > the %.0f MiB budget: streaming from disk",
                 ds.name, src.nbytes / 2 ** 20, budget_mb)
    return ds
  from tqdm.auto import tqdm

  images = np.empty(src.shape, np.uint8)
  chunk = 512
  with tqdm(total=len(src), desc=f"decoding {ds.name}", disable=len(src) < 2000,
            mininterval=5) as bar:
    for s in range(0, len(src), chunk):
      images[s:s + chunk] = src[s:s + chunk]
      bar.update(min(chunk, len(src) - s))
  return ArrayDataset(images, ds.labels, ds.num_classes, ds.name, list(ds.class_names))


def concatenate(parts: Sequence["ArrayDataset"], name: str = "") -> "ArrayDataset":
  """The rows of `parts` one after another (same classes, same image shape). uint8 parts of
  which any is lazy give a lazy result: a row is decoded by its part only when indexed."""
  first = parts[0]
  for p in parts[1:]:
    if (p.num_classes, p.class_names, p.image_shape) != (first.num_classes,
                                                         first.class_names, first.image_shape):
      raise ValueError(f"cannot concatenate {first.name} and {p.name}: different classes or "
                       f"image shapes ({first.image_shape} vs {p.image_shape})")
  labels = np.concatenate([p.labels for p in parts])
  name = name or "+".join(p.name for p in parts)
  if not any(isinstance(p.images, ImageSource) for p in parts):
    return ArrayDataset(np.concatenate([p.images for p in parts]), labels, first.num_classes,
                        name, list(first.class_names))
  if any(p.images.dtype != np.uint8 for p in parts):
    raise ValueError(f"{name}: lazy images concatenate with uint8 images only")
  starts = np.cumsum([0] + [len(p) for p in parts])

  def read(ids):
    ids = np.asarray(ids, np.int64)
    part = np.searchsorted(starts, ids, side="right") - 1
    out = [None] * len(ids)
    for k in np.unique(part):  # one (threaded) read per part
      at = np.flatnonzero(part == k)
      for j, row in zip(at, parts[k].images[ids[at] - starts[k]]):
        out[j] = row
    return out
  return ArrayDataset(ImageSource(read, np.arange(starts[-1]), first.image_shape, fit=False,
                                  name=name), labels, first.num_classes, name,
                      list(first.class_names))


# ---------------------------------------------------------------------------------------------
# Loading.

def load(name: str, split: str, *, data_dir: str | None = None,
         decode_size: int | tuple[int, int] | None = None) -> ArrayDataset:
  """Loads a dataset split: labels in memory, uint8 NHWC images at native resolution.

  Args:
    name: ``digits``, ``fashion_mnist``, ``mnist``, ``idx:<dir>``, ``folder:<dir>``,
      ``fgvc_aircraft`` (an image folder at ``data_dir``), ``cifar_fs``,
      ``mini_imagenet:<dir>`` (few-shot class splits, module docstring) or any TFDS
      image-classification name (aliases: ``cifar10``, ``cifar100``, ``oxford_iiit_pet``
      / ``pets``, ``dtd``).
    split: e.g. ``'train'`` / ``'test'`` (TFDS split syntax is passed through to TFDS).
    data_dir: the TFDS data directory, or for ``fashion_mnist`` / ``mnist`` a directory of
      IDX files (used as IDX dir if it holds IDX files, else as a TFDS data_dir).
    decode_size: the model's input size (int or (H, W)).  It bounds decoding only: images
      that differ in size, or are larger than it, are fitted to it (:func:`fit_image`);
      fixed-size sources no larger than it keep their native resolution (the device resizes
      each batch).  Required when a source's images differ in size (Pets, DTD, folders).

  TFDS and image-folder splits come back lazily (``images`` is an :class:`ImageSource`);
  :func:`materialize` decodes them.  digits and IDX files are small and load eagerly.

  Raises:
    FileNotFoundError: the data is not on this machine; the message says how to get it.
    ValueError: unknown dataset / split, malformed files.
  """
  hw = _as_hw(decode_size)
  key = name.strip()
  # Paths in configs are written like "folder:~/data/fgvc-aircraft".
  data_dir = os.path.expanduser(data_dir) if data_dir else data_dir
  if key.startswith("folder:"):
    return _load_folder(os.path.expanduser(key[len("folder:"):]), split, hw)
  if key.startswith("idx:"):
    return _load_idx_dir(os.path.expanduser(key[len("idx:"):]), split, name=key)
  low = key.lower().replace("-", "_")
  if low == "digits":
    return _load_digits(split)
  if low.partition(":")[0] == "mini_imagenet":
    root = os.path.expanduser(key.partition(":")[2]) or data_dir
    return _fewshot_split(_load_mini_imagenet(root, split, hw), split)
  if low == "cifar_fs":
    return _fewshot_split(_load_cifar_fs(split, data_dir, hw), split)
  if low in _AIRCRAFT_NAMES:
    if data_dir is None:
      raise FileNotFoundError("load('fgvc_aircraft') needs data_dir=<image folder>. "
                              + _AIRCRAFT_HELP)
    ds = _load_folder(data_dir, split, hw)
    ds.name = f"fgvc_aircraft:{split}"
    return ds
  if low in ("fashion_mnist", "mnist"):
    candidates = (data_dir,) if data_dir else _DEFAULT_IDX_DIRS[low]
    for d in candidates:
      if d and _find_idx_file(d, "train" if split == "train" else "t10k", "images"):
        return _load_idx_dir(d, split, name=low)
    try:
      return _load_tfds(low, split, data_dir, hw)
    except FileNotFoundError as e:
      extra = (" Or install the Debian package dataset-fashion-mnist "
               f"(IDX files in {DEFAULT_FASHION_MNIST_DIR})" if low == "fashion_mnist"
               else " Or put the IDX files (train-images-idx3-ubyte.gz, ...) in a "
               "directory and pass it as data_dir")
      raise FileNotFoundError(f"{e}{extra}; looked for IDX files in "
                              f"{list(c for c in candidates if c)}.") from e
  return _load_tfds(TFDS_ALIASES.get(low, key), split, data_dir, hw)


def _decoded_shape(shapes: Iterable[tuple[int, ...]], hw, what: str) -> tuple[tuple[int, ...], bool]:
  """The (H, W, C) every row is decoded to, and whether rows must be fitted to it: the
  native shape when all rows share one no larger than ``hw`` (in pixels), else ``hw``."""
  shapes = set(shapes)
  channels = {s[-1] for s in shapes}
  if len(channels) > 1:
    raise ValueError(f"{what}: images have different channel counts {sorted(channels)}")
  c = channels.pop()
  if len(shapes) == 1:
    (h, w, _), = shapes
    if hw is None or h * w <= hw[0] * hw[1]:
      return (h, w, c), False
  elif hw is None:
    raise ValueError(f"{what}: images have different sizes (e.g. {sorted(shapes)[:3]}); "
                     "pass decode_size=... (the model's input size) to fit them")
  return (hw[0], hw[1], c), True


# -- digits -----------------------------------------------------------------------------------

_DIGITS_SEED = 0
_DIGITS_TEST_FRACTION = 0.2


def _load_digits(split: str) -> ArrayDataset:
  from sklearn.datasets import load_digits

  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  is_test = holdout_mask(labels, _DIGITS_TEST_FRACTION, _DIGITS_SEED)
  if split == "train":
    keep = ~is_test
  elif split == "test":
    keep = is_test
  elif split == "all":
    keep = np.ones_like(is_test)
  else:
    raise ValueError(f"digits has splits 'train', 'test', 'all'; got {split!r}")
  return ArrayDataset(images[keep], labels[keep], 10, f"digits:{split}",
                      [str(c) for c in range(10)])


def holdout_mask(labels, fraction: float, seed: int) -> np.ndarray:
  """(N,) bool: a stratified, deterministic held-out part of `labels` (N,) -- for each class
  in ascending order, the first ``round(fraction * n_c)`` of a seeded permutation of its n_c
  rows."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  out = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    out[idx[:int(round(fraction * len(idx)))]] = True
  return out


# -- few-shot benchmarks (class splits) -------------------------------------------------------

#: Fraction of each meta-train class held out as the few-shot datasets' ``test`` split (the
#: source evaluation of pre-training); ``train`` is the rest. Seeded: the same images always.
FEWSHOT_HOLDOUT = 0.1
_FEWSHOT_SEED = 0
_FEWSHOT_SPLITS = ("train", "test", "meta_train", "meta_val", "meta_test")


def _fewshot_class_split(split: str) -> str:
  """The class split a few-shot dataset split draws from: 'train' | 'val' | 'test'."""
  if split not in _FEWSHOT_SPLITS:
    raise ValueError(f"few-shot datasets have splits {', '.join(_FEWSHOT_SPLITS)} "
                     f"(train/test: pre-training's division of meta_train); got {split!r}")
  return {"meta_val": "val", "meta_test": "test"}.get(split, "train")


def _fewshot_split(ds: ArrayDataset, split: str) -> ArrayDataset:
  """`ds` (all images of a class split) itself, or for ``train`` / ``test`` the rows outside /
  inside the meta-train classes' held-out slice (:data:`FEWSHOT_HOLDOUT`); lazily."""
  if split not in ("train", "test"):
    return ds
  held = holdout_mask(ds.labels, FEWSHOT_HOLDOUT, _FEWSHOT_SEED)
  return ds.take(np.flatnonzero(held if split == "test" else ~held),
                 name=f"{ds.name.rpartition(':')[0]}:{split}")


def _load_cifar_fs(split: str, data_dir, hw) -> ArrayDataset:
  """CIFAR-FS: the classes of its split, with both CIFAR-100 splits' images (600 a class),
  lazily; labels numbered over the split's classes in CIFAR-100 id order."""
  from ncjax import fewshot  # the class lists (with their source) live with the protocol

  which = _fewshot_class_split(split)
  pool = concatenate([_load_tfds("cifar100", s, data_dir, hw) for s in ("train", "test")])
  # The dataset's own names cross-check its label order; a source without names (TFDS mock
  # data: '0'..'99') has CIFAR-100's ids, in fewshot.CIFAR100_LABEL_NAMES's order.
  named = not all(n.isdigit() for n in pool.class_names)
  ds = select_classes(pool, fewshot.cifar_fs_class_ids(
      which, pool.class_names if named else fewshot.CIFAR100_LABEL_NAMES))
  ds.name = f"cifar_fs:meta_{which}"
  return ds


def _load_mini_imagenet(root, split: str, hw) -> ArrayDataset:
  """miniImageNet's class split from the Ravi & Larochelle CSV at `root` (images in
  ``<root>/images/``), lazily; labels numbered over its sorted WordNet ids."""
  from ncjax import fewshot

  which = _fewshot_class_split(split)
  if not root:
    raise FileNotFoundError("mini_imagenet needs its directory: 'mini_imagenet:<dir>' (e.g. "
                            "in dataset_sources). " + fewshot.MINI_IMAGENET_HOWTO)
  part = fewshot.load_mini_imagenet(root, (which,))[which]
  what = f"mini_imagenet:meta_{which}"
  shape, fit = _decoded_shape(_threaded(_image_size, part.paths, f"scanning {what}"), hw, what)
  read = lambda ids: _threaded(lambda i: _read_image(part.paths[i]), ids, "decoding")
  return ArrayDataset(ImageSource(read, np.arange(len(part.paths)), shape, fit=fit, name=what),
                      part.labels, len(part.classes), what, list(part.classes))


# -- IDX (MNIST format) -----------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open_maybe_gzip(path):
  with open(path, "rb") as f:
    head = f.read(2)
  return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def read_idx(path) -> np.ndarray:
  """Reads an IDX file (``.gz`` or raw, detected from the content) into a numpy array."""
  with _open_maybe_gzip(path) as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an IDX file (bad magic number "
                     f"{data[:4].hex() or 'empty file'}; expected 0000<type><ndim>, "
                     "e.g. 00000803 for images, 00000801 for labels)")
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path}: truncated IDX header")
  shape = tuple(int(s) for s in np.frombuffer(data, ">u4", ndim, 4))
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes of data) "
                     f"but the file holds {len(data) - header} bytes")
  arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return arr.astype(dtype.newbyteorder("=")) if dtype.itemsize > 1 else arr.copy()


def write_idx(path, array: np.ndarray, *, compress: bool | None = None) -> None:
  """Writes ``array`` as an IDX file (gzipped when ``compress`` or the path ends in .gz)."""
  array = np.asarray(array)
  codes = {np.dtype(v).newbyteorder("=") if np.dtype(v).itemsize > 1 else np.dtype(v): k
           for k, v in _IDX_DTYPES.items()}
  code = codes.get(array.dtype)
  if code is None:
    raise ValueError(f"dtype {array.dtype} has no IDX code")
  head = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  body = array.astype(array.dtype.newbyteorder(">")).tobytes()
  gz = str(path).endswith(".gz") if compress is None else compress
  with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
    f.write(head + body)


def _find_idx_file(directory, prefix: str, kind: str) -> pathlib.Path | None:
  ndim = 3 if kind == "images" else 1
  d = pathlib.Path(directory)
  for sep in ("-", "."):
    for ext in ("", ".gz"):
      p = d / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{ext}"
      if p.is_file():
        return p
  return None


def _load_idx_dir(directory: str, split: str, name: str) -> ArrayDataset:
  prefixes = {"train": "train", "test": "t10k", "t10k": "t10k"}
  if split not in prefixes:
    raise ValueError(f"IDX datasets have splits 'train' and 'test'; got {split!r}")
  p = prefixes[split]
  img_path = _find_idx_file(directory, p, "images")
  lbl_path = _find_idx_file(directory, p, "labels")
  if img_path is None or lbl_path is None:
    raise FileNotFoundError(
        f"no IDX files for split {split!r} in {directory!r}: expected "
        f"{p}-images-idx3-ubyte[.gz] and {p}-labels-idx1-ubyte[.gz]")
  images, labels = read_idx(img_path), read_idx(lbl_path)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"{img_path}: expected uint8 (N, H, W) images, got {images.dtype} "
                     f"{images.shape}")
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(f"{lbl_path}: {labels.shape} labels for {len(images)} images")
  base = name.split(":")[0]
  if base == "fashion_mnist":
    k, class_names = 10, FASHION_MNIST_CLASSES
  elif base == "mnist":
    k, class_names = 10, [str(c) for c in range(10)]
  else:
    k, class_names = int(labels.max()) + 1 if len(labels) else 1, []
  return ArrayDataset(images, labels.astype(np.int32), k, f"{name}:{split}", class_names)


# -- image folder -----------------------------------------------------------------------------

def _read_image(path) -> np.ndarray:
  from PIL import Image

  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _image_size(path) -> tuple[int, int, int]:
  from PIL import Image

  with Image.open(path) as im:  # reads the header only
    return im.size[1], im.size[0], 3


def _threaded(fn, items: Sequence[Any], desc: str) -> list:
  from tqdm.auto import tqdm

  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(tqdm(pool.map(fn, items), total=len(items), desc=desc,
                     disable=len(items) < 1000, mininterval=5))


def _load_folder(directory: str, split: str, hw) -> ArrayDataset:
  root = pathlib.Path(directory)
  split_dir = root / split
  if not split_dir.is_dir():
    raise FileNotFoundError(
        f"image folder split {str(split_dir)!r} not found; expected the layout "
        "<dir>/<split>/<class>/<image>.jpg|png. " + _AIRCRAFT_HELP)
  # Classes are the union over all split folders, sorted, so label ids agree across splits.
  classes = sorted({c.name for s in root.iterdir() if s.is_dir()
                    for c in s.iterdir() if c.is_dir()})
  files, labels = [], []
  for k, c in enumerate(classes):
    cdir = split_dir / c
    if not cdir.is_dir():
      continue
    for f in sorted(cdir.iterdir()):
      if f.suffix.lower() in _IMAGE_EXTENSIONS and f.is_file():
        files.append(f)
        labels.append(k)
  if not files:
    raise FileNotFoundError(f"no images ({', '.join(_IMAGE_EXTENSIONS)}) under "
                            f"{str(split_dir)!r}/<class>/")
  # Headers only: whether the folder has one native size decides how rows are decoded.
  shape, fit = _decoded_shape(_threaded(_image_size, files, f"scanning {split_dir}"), hw,
                              str(split_dir))
  read = lambda ids: _threaded(lambda i: _read_image(files[i]), ids, "decoding")
  images = ImageSource(read, np.arange(len(files)), shape, fit=fit, name=str(split_dir))
  return ArrayDataset(images, np.asarray(labels, np.int32), len(classes),
                      f"folder:{directory}:{split}", classes)


# -- TFDS -------------------------------------------------------------------------------------

def _tfds_missing_message(name: str, split: str, data_dir) -> str:
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return (
      f"TFDS dataset {name!r} (split {split!r}) is not prepared in {where!r} as "
      "array_record files. On a machine with internet and TensorFlow run "
      f"`tfds build {name} --file_format=array_record` (or `python -m "
      f"tensorflow_datasets.scripts.download_and_prepare --datasets={name} "
      "--file_format=array_record`), then copy the <data_dir>/" + name + " folder here and "
      "pass data_dir=<data_dir> (or set TFDS_DATA_DIR).")


def _read_records(source, ids: list[int]) -> list:
  if hasattr(source, "__getitems__"):
    try:
      return list(source.__getitems__(ids))
    except TypeError:  # some sources (e.g. TFDS's mock) lack batched reads
      pass
  return [source[i] for i in ids]


def _tfds_labels(tfds, open_source, source, label_key: str, what: str) -> np.ndarray:
  """All labels of a split.  Records are read with the image left encoded where TFDS can
  (``SkipDecoding``), so labelling an ImageNet-size split does not decode every image."""
  try:
    fast = open_source(decoders={"image": tfds.decode.SkipDecoding()})
    _read_records(fast, [0])
    source = fast
  except Exception:  # noqa: BLE001 - not supported here (e.g. under mock_data): decode
    pass
  from tqdm.auto import tqdm

  n, chunk = len(source), 1024
  labels = np.empty(n, np.int64)
  with tqdm(total=n, desc=f"labels of {what}", disable=n < 5000, mininterval=5) as bar:
    for s in range(0, n, chunk):
      ids = list(range(s, min(n, s + chunk)))
      labels[s:s + len(ids)] = [int(r[label_key]) for r in _read_records(source, ids)]
      bar.update(len(ids))
  return labels


def _load_tfds(name: str, split: str, data_dir, hw) -> ArrayDataset:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # pragma: no cover - tfds is a declared dependency
    raise ImportError(f"loading {name!r} needs tensorflow-datasets "
                      "(`pip install tensorflow-datasets`; TensorFlow is not needed)") from e
  not_found = getattr(getattr(tfds.core, "registered", None), "DatasetNotFoundError", ())
  open_source = functools.partial(tfds.data_source, name, split=split, data_dir=data_dir,
                                  download=False)
  try:
    source = open_source()
  except not_found as e:
    raise ValueError(f"unknown dataset {name!r}: not a built-in name (digits, "
                     "fashion_mnist, mnist, idx:<dir>, folder:<dir>, fgvc_aircraft) nor a "
                     "TFDS dataset") from e
  except ValueError as e:  # bad name syntax, unknown split, ...
    raise ValueError(f"TFDS could not open {name!r} split {split!r}: {e}") from e
  except Exception as e:  # noqa: BLE001 - TFDS raises many types for "not there"
    msg = _tfds_missing_message(name, split, data_dir)
    if name in ("visual_domain_decathlon/aircraft",):
      msg += " " + _AIRCRAFT_HELP
    raise FileNotFoundError(f"{msg} (TFDS said: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from e

  features = source.dataset_info.features
  image_key = _feature_key(features, "image", tfds.features.Image, name)
  label_key = _feature_key(features, "label", tfds.features.ClassLabel, name)
  label_feature = features[label_key]
  what = f"{name}:{split}"
  h, w, c = features[image_key].shape
  if h is None or w is None:  # images of many sizes: fitted to the model's size
    if hw is None:
      raise ValueError(f"{what}: images have different sizes; pass decode_size=... "
                       "(the model's input size) to fit them")
    shape, fit = (hw[0], hw[1], c or 3), True
  else:
    shape, fit = _decoded_shape([(h, w, c or 3)], hw, what)
  labels = _tfds_labels(tfds, open_source, source, label_key, what)
  read = lambda ids: [r[image_key] for r in _read_records(source, ids)]
  return ArrayDataset(ImageSource(read, np.arange(len(labels)), shape, fit=fit, name=what),
                      labels, label_feature.num_classes, what, list(label_feature.names))


def _feature_key(features, preferred: str, kind, name: str) -> str:
  if preferred in features and isinstance(features[preferred], kind):
    return preferred
  for k, f in features.items():
    if isinstance(f, kind):
      return k
  raise ValueError(f"TFDS dataset {name!r} has no {kind.__name__} feature "
                   f"(features: {list(features.keys())})")


# ---------------------------------------------------------------------------------------------
# Subsets.

def balanced_subset(ds: ArrayDataset, size: int, seed: int) -> ArrayDataset:
  """A class-balanced random subset with ``size`` examples in total.

  Every class gets ``size // K`` examples; the ``size % K`` remaining ones go to classes
  chosen by a seeded permutation (so no class is systematically favoured across seeds).
  For a fixed seed, subsets of increasing size are nested.  Examples keep their original
  order.  Raises ValueError if ``size < K`` or a class has too few examples.
  """
  k = ds.num_classes
  size = int(size)
  if size < k:
    raise ValueError(f"size {size} < num_classes {k}: a balanced subset needs at least one "
                     "example per class")
  rng = np.random.default_rng(seed)
  class_order = rng.permutation(k)
  need = np.full(k, size // k)
  need[class_order[:size % k]] += 1
  chosen = []
  for c in range(k):
    idx = rng.permutation(np.flatnonzero(ds.labels == c))  # consumed regardless of size
    if len(idx) < need[c]:
      raise ValueError(f"class {c} ({ds.class_names[c]!r}) has {len(idx)} examples, "
                       f"fewer than the {need[c]} a balanced subset of {size} needs")
    chosen.append(idx[:need[c]])
  indices = np.sort(np.concatenate(chosen))
  return ds.take(indices, name=f"{ds.name}[balanced{size},seed{seed}]")


def select_classes(ds: ArrayDataset, classes: Iterable[int | str]) -> ArrayDataset:
  """Keeps only ``classes`` (ids or names), relabelled 0..k-1 in the given order."""
  ids = []
  for c in classes:
    if isinstance(c, str):
      if c not in ds.class_names:
        raise ValueError(f"unknown class name {c!r}; classes: {ds.class_names}")
      c = ds.class_names.index(c)
    c = int(c)
    if not 0 <= c < ds.num_classes:
      raise ValueError(f"class {c} out of range [0, {ds.num_classes})")
    ids.append(c)
  if not ids:
    raise ValueError("select_classes needs at least one class")
  if len(set(ids)) != len(ids):
    raise ValueError(f"repeated classes in {ids}")
  lut = np.full(ds.num_classes, -1, np.int32)
  lut[ids] = np.arange(len(ids), dtype=np.int32)
  keep = np.flatnonzero(lut[ds.labels] >= 0)
  sub = ds.take(keep)
  return ArrayDataset(sub.images, lut[sub.labels], len(ids),
                      f"{ds.name}[classes {ids}]", [ds.class_names[c] for c in ids])


# ---------------------------------------------------------------------------------------------
# Reading ahead (host). Training batches: `ncjax.train.batch_iterator`.

def prefetch(iterator: Iterable[Any], size: int = 2,
             transform: Callable[[Any], Any] | None = None) -> Iterator[Any]:
  """Runs ``iterator`` (and ``transform``, e.g. ``jax.device_put``) in a background thread,
  keeping up to ``size`` items ready.  Exceptions are re-raised in the consumer."""
  q: queue.Queue = queue.Queue(maxsize=max(1, size))
  stop = threading.Event()
  end = object()

  def worker():
    try:
      for item in iterator:
        if transform is not None:
          item = transform(item)
        while not stop.is_set():
          try:
            q.put(("item", item), timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(("end", end))
    except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
      q.put(("error", e))

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    while True:
      kind, item = q.get()
      if kind == "end":
        return
      if kind == "error":
        raise item
      yield item
  finally:
    stop.set()


# ---------------------------------------------------------------------------------------------
# Statistics.

def dataset_stats(ds: ArrayDataset, chunk: int = 4096) -> tuple[tuple[float, ...],
                                                                tuple[float, ...]]:
  """Per-channel (mean, std) over all pixels, in [0, 1] units (float64 accumulation)."""
  c = ds.images.shape[-1]
  total, total_sq, count = np.zeros(c), np.zeros(c), 0
  scale = 255.0 if ds.images.dtype == np.uint8 else 1.0
  from ncjax import telemetry  # a lazily decoded split can take minutes: show progress
  starts = range(0, len(ds), chunk)
  for s in telemetry.progress(starts, total=len(starts), desc=f"{ds.name}: statistics"):
    x = ds.images[s:s + chunk].astype(np.float64).reshape(-1, c) / scale
    total += x.sum(0)
    total_sq += (x * x).sum(0)
    count += len(x)
  if count == 0:
    raise ValueError("dataset_stats of an empty dataset")
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def stats_for(name: str, channels: int | None = None):
  """(mean, std) constants for a dataset / model family name (``imagenet``, ``cifar10``,
  ``cifar100``, ``mnist``, ``fashion_mnist``); ``channels`` checks the channel count."""
  key = name.split(":")[0].lower().replace("-", "_")
  key = TFDS_ALIASES.get(key, key)
  if key not in _STATS:
    raise KeyError(f"no stored statistics for {name!r} (have {sorted(_STATS)}); use "
                   "dataset_stats(ds)")
  mean, std = _STATS[key]
  if channels is not None and channels != len(mean):
    raise ValueError(f"{name} statistics have {len(mean)} channels, not {channels}")
  return mean, std


# ---------------------------------------------------------------------------------------------
# Device-side pre-processing (pure, jittable).

def _to_float01(images) -> jax.Array:
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) * (1.0 / 255.0)
  return images.astype(jnp.float32)


def normalize(images, mean, std) -> jax.Array:
  """``(x - mean) / std`` per channel, float32.  uint8 input is first scaled by 1/255;
  float input is assumed already in [0, 1].  ``mean`` / ``std`` are in [0, 1] units."""
  x = _to_float01(images)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (x - mean) / std


def resize(images, size, method: str = "bilinear") -> jax.Array:
  """Resizes (N, H, W, C) images to ``size`` (int or (H, W)) with ``jax.image.resize``
  (antialiased when down-scaling); a no-op when the size already matches."""
  h, w = _as_hw(size)
  if images.shape[1:3] == (h, w):
    return images
  x = images if jnp.issubdtype(images.dtype, jnp.floating) else _to_float01(images)
  return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method=method, antialias=True)


_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL / torchvision


def _gray(img):  # (H, W, 3) -> (H, W, 1)
  return jnp.tensordot(img, jnp.asarray(_GRAY_WEIGHTS, img.dtype), axes=1)[..., None]


def _rotate_hue(img, angle):
  """Hue rotation by ``angle`` radians as a rotation of the chroma plane in YIQ space
  (a linear approximation of an HSV hue shift)."""
  to_yiq = jnp.asarray([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], img.dtype)
  to_rgb = jnp.linalg.inv(to_yiq)
  c, s = jnp.cos(angle), jnp.sin(angle)
  rot = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], img.dtype)
  rot = rot.at[1, 1].set(c).at[1, 2].set(-s).at[2, 1].set(s).at[2, 2].set(c)
  m = to_rgb @ rot @ to_yiq
  return img @ m.T


def _augment_one(key, img, level: int, pad: int, pad_mode: str,
                 jitter: tuple[float, float, float], hue: float, gray_p: float):
  h, w, c = img.shape
  k_crop, k_flip, k_jit, k_gray = jax.random.split(key, 4)
  if level >= 2 and pad > 0:  # random crop of the padded image back to H x W
    padded = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
    dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
    img = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
  if level >= 3:  # horizontal flip, p = 0.5
    img = jnp.where(jax.random.bernoulli(k_flip, 0.5), img[:, ::-1, :], img)
  if level >= 4:  # colour jitter: brightness, contrast, saturation (+ hue), fixed order
    b, ct, s = jitter
    kb, kc, ks, kh = jax.random.split(k_jit, 4)
    fb = jax.random.uniform(kb, (), img.dtype, max(0.0, 1 - b), 1 + b)
    img = jnp.clip(img * fb, 0.0, 1.0)
    fc = jax.random.uniform(kc, (), img.dtype, max(0.0, 1 - ct), 1 + ct)
    mean = jnp.mean(_gray(img)) if c == 3 else jnp.mean(img)
    img = jnp.clip(fc * img + (1 - fc) * mean, 0.0, 1.0)
    if c == 3:  # colour-only ops are skipped for grayscale images
      fs = jax.random.uniform(ks, (), img.dtype, max(0.0, 1 - s), 1 + s)
      img = jnp.clip(fs * img + (1 - fs) * _gray(img), 0.0, 1.0)
      if hue > 0:
        angle = jax.random.uniform(kh, (), img.dtype, -hue, hue) * (2 * jnp.pi)
        img = jnp.clip(_rotate_hue(img, angle), 0.0, 1.0)
  if level >= 5 and c == 3:  # random grayscale, p = gray_p
    img = jnp.where(jax.random.bernoulli(k_gray, gray_p),
                    jnp.broadcast_to(_gray(img), img.shape), img)
  return img


def augment(rng, images, level: int, *, pad: int | None = None, pad_mode: str = "constant",
            jitter: tuple[float, float, float] = (0.4, 0.4, 0.4), hue: float = 0.0,
            gray_p: float = 0.2) -> jax.Array:
  """Random augmentation of float images (N, H, W, C) in [0, 1], paper levels 1-5.

  * 1 (and 0): identity (standardisation is :func:`normalize`'s job);
  * 2: + random crop: pad ``pad`` pixels (``pad_mode`` 'constant' = zeros as torchvision's
    ``RandomCrop(padding=4)``, or 'reflect'), crop back to H x W at a random offset;
    ``pad=None`` scales CIFAR's 4 pixels at 32 px to the image: ``max(1, H // 8)`` (so an
    8 x 8 digit shifts by at most 1 pixel, not half its size);
  * 3: + horizontal flip with p = 0.5;
  * 4: + colour jitter: brightness, contrast, saturation factors uniform in [1-j, 1+j]
    (``jitter``), optional hue rotation of up to ``hue`` turns, applied in that order;
  * 5: + random grayscale with p = ``gray_p``.

  Each example gets its own key (``jax.random.split(rng, N)``, vmapped).  For C = 1 the
  colour-only operations (saturation, hue, grayscale) are skipped.  ``level`` and the
  keyword options are static: ``jax.jit(augment, static_argnums=2)``.
  """
  if level not in range(0, 6):
    raise ValueError(f"augmentation level must be 0..5, got {level}")
  if images.ndim != 4:
    raise ValueError(f"augment expects (N, H, W, C) images, got shape {images.shape}")
  images = _to_float01(images)
  if level <= 1:
    return images
  if pad is None:
    pad = max(1, images.shape[1] // 8)
  keys = jax.random.split(rng, images.shape[0])
  fn = lambda k, im: _augment_one(k, im, level, pad, pad_mode, tuple(jitter), hue, gray_p)
  return jax.vmap(fn)(keys, images)


def preprocess(rng, images, *, mean, std, image_size=None, aug_level: int = 1,
               train: bool = True) -> jax.Array:
  """uint8 batch -> normalised float32 model input.

  ``[0,1] floats -> augment(level) if train -> resize(image_size) -> normalize``.
  Augmenting before the resize keeps the crop at the dataset's own scale and is up to
  (224/32)^2 = 49x cheaper.  Jit with the keyword arguments bound, e.g.
  ``jax.jit(functools.partial(preprocess, mean=IMAGENET_MEAN, std=IMAGENET_STD,
  image_size=224, aug_level=5))``.  ``rng`` may be None when not training.
  """
  x = _to_float01(images)
  if train and aug_level > 1:
    if rng is None:
      raise ValueError("preprocess(train=True, aug_level>1) needs an rng key")
    x = augment(rng, x, aug_level)
  if image_size is not None:
    x = resize(x, image_size)
  return normalize(x, mean, std)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Preprocess:
  """The on-device pre-processing of one model: ``prepare(rng, uint8 batch, train)``.

  (grayscale -> ``channels`` copies) -> [0, 1] -> :func:`augment` (training only) ->
  :func:`resize` to ``image_size`` -> :func:`normalize`.

  A pytree: ``mean`` / ``std`` ((C,) float32, [0, 1] units) are its leaves, the rest is
  static.  Passed as an *argument* to a jitted function, a change of statistics (another
  training subset) reuses the compiled program; only the static fields key a recompile.
  """

  mean: Any
  std: Any
  image_size: int | None = None
  aug_level: int = 1
  channels: int | None = None

  def __call__(self, rng, x, train: bool) -> jax.Array:
    if self.channels is not None and x.shape[-1] != self.channels:
      if x.shape[-1] != 1:
        raise ValueError(f"images have {x.shape[-1]} channels but the model takes "
                         f"{self.channels}")
      x = jnp.repeat(x, self.channels, axis=-1)
    return preprocess(rng, x, mean=self.mean, std=self.std, image_size=self.image_size,
                      aug_level=self.aug_level, train=train)

  def tree_flatten(self):
    return (self.mean, self.std), (self.image_size, self.aug_level, self.channels)

  @classmethod
  def tree_unflatten(cls, static, leaves):
    return cls(*leaves, *static)
