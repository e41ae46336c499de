"""On-device pre-processing (pure, jittable): normalisation statistics, normalise, resize and
the paper's augmentation levels 1-5 (Figs. 4/5).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ncjax import telemetry
from ncjax.data.dataset import ArrayDataset, _as_hw
from ncjax.data.sources import TFDS_ALIASES


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


def dataset_stats(ds: ArrayDataset, chunk: int = 4096) -> tuple[tuple[float, ...],
                                                                tuple[float, ...]]:
  """Per-channel (mean, std) over all pixels, in [0, 1] units (float64 accumulation)."""
  c = ds.images.shape[-1]
  total, total_sq, count = np.zeros(c), np.zeros(c), 0
  scale = 255.0 if ds.images.dtype == np.uint8 else 1.0
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
