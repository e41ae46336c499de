"""The containers: `ArrayDataset` (labels in memory, images an array or a lazily decoded
`ImageSource`), and the subsets every experiment draws (balanced, by class, held out).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import numpy as np
from absl import logging


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


def balanced_need(k: int, size: int, seed) -> np.ndarray:
  """How many examples of each of `k` classes `balanced_subset` takes for `size` (`seed`: its
  seed, or its generator, which this advances as it does), so that a caller can check a
  split's class counts before any image is read. ValueError if ``size < k``."""
  if size < k:
    raise ValueError(f"size {size} < num_classes {k}: a balanced subset needs at least one "
                     "example per class")
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  class_order = rng.permutation(k)
  need = np.full(k, size // k)
  need[class_order[:size % k]] += 1
  return need


def balanced_subset(ds: ArrayDataset, size: int, seed: int) -> ArrayDataset:
  """A class-balanced random subset with ``size`` examples in total.

  Every class gets ``size // K`` examples; the ``size % K`` remaining ones go to classes
  chosen by a seeded permutation (so no class is systematically favoured across seeds).
  For a fixed seed, subsets of increasing size are nested.  Examples keep their original
  order.  Raises ValueError if ``size < K`` or a class has too few examples.
  """
  k = ds.num_classes
  size = int(size)
  rng = np.random.default_rng(seed)
  need = balanced_need(k, size, rng)
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
