"""Where datasets come from: `load(name, split)` for digits, IDX files (Fashion-MNIST, MNIST),
image folders, the few-shot benchmarks and TFDS.
"""
from __future__ import annotations

import functools
import gzip
import os
import pathlib
from typing import Iterable

import numpy as np

from ncjax.data.dataset import (
    ArrayDataset, _as_hw, concatenate, holdout_mask, ImageSource, select_classes,
)
from ncjax.data.classes import (
    CIFAR100_LABEL_NAMES, cifar_fs_class_ids, load_mini_imagenet, MINI_IMAGENET_HOWTO,
)
from ncjax.data.pipeline import _threaded
from ncjax.errors import DataError


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

  which = _fewshot_class_split(split)
  pool = concatenate([_load_tfds("cifar100", s, data_dir, hw) for s in ("train", "test")])
  # The dataset's own names cross-check its label order; a source without names (TFDS mock
  # data: '0'..'99') has CIFAR-100's ids, in CIFAR100_LABEL_NAMES's order.
  named = not all(n.isdigit() for n in pool.class_names)
  ds = select_classes(pool, cifar_fs_class_ids(
      which, pool.class_names if named else CIFAR100_LABEL_NAMES))
  ds.name = f"cifar_fs:meta_{which}"
  return ds


def _load_mini_imagenet(root, split: str, hw) -> ArrayDataset:
  """miniImageNet's class split from the Ravi & Larochelle CSV at `root` (images in
  ``<root>/images/``), lazily; labels numbered over its sorted WordNet ids."""

  which = _fewshot_class_split(split)
  if not root:
    raise FileNotFoundError("mini_imagenet needs its directory: 'mini_imagenet:<dir>' (e.g. "
                            "in dataset_sources). " + MINI_IMAGENET_HOWTO)
  part = load_mini_imagenet(root, (which,))[which]
  what = f"mini_imagenet:meta_{which}"
  shape, fit = _decoded_shape(_threaded(_image_size, part.paths, f"scanning {what}"), hw, what)
  read = lambda ids: _threaded(lambda i: _read_image(part.paths[i]), ids, "decoding")
  return ArrayDataset(ImageSource(read, np.arange(len(part.paths)), shape, fit=fit, name=what),
                      part.labels, len(part.classes), what, list(part.classes))


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


def _read_image(path) -> np.ndarray:
  from PIL import Image

  try:
    with Image.open(path) as im:
      if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit gray: PIL's convert("RGB") clips at 255 (a 0..65535 gradient comes out 99.6%
        # white); scale to 8 bits instead, as the 16-bit RGB decoder does.
        gray = np.round(np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255)
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise _unusable_image(path, e) from e


def _image_size(path) -> tuple[int, int, int]:
  from PIL import Image

  try:
    with Image.open(path) as im:  # reads the header only
      return im.size[1], im.size[0], 3
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise _unusable_image(path, e) from e


def _unusable_image(path, e: Exception) -> DataError:
  """The error naming the image file that cannot be decoded (the run stops: a dataset with a
  file missing is not the dataset the config names)."""
  from PIL import Image

  if isinstance(e, Image.DecompressionBombError):
    why = (f"{' '.join(str(e).split())}; refused as a decompression bomb (raise "
           "PIL.Image.MAX_IMAGE_PIXELS if it is a real image)")
  else:
    why = f"cannot be decoded ({type(e).__name__}: {' '.join(str(e).split())})"
  return DataError(f"image {os.fspath(path)}: {why}; replace or remove the file")


def _load_folder(directory: str, split: str, hw) -> ArrayDataset:
  root = pathlib.Path(directory)
  split_dir = root / split
  if not split_dir.is_dir():
    raise FileNotFoundError(
        f"image folder split {str(split_dir)!r} not found; expected the layout "
        "<dir>/<split>/<class>/<image>.jpg|png. " + _AIRCRAFT_HELP)
  # Classes are the union over all split folders, sorted, so label ids agree across splits.
  # Hidden directories (.ipynb_checkpoints, .DS_Store folders, ...) are tools' files, not
  # classes.
  classes = sorted({c.name for s in root.iterdir() if s.is_dir()
                    for c in s.iterdir() if c.is_dir() and not c.name.startswith(".")})
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
