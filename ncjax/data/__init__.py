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

from ncjax.data.dataset import (
    ArrayDataset, balanced_need, balanced_subset, class_counts, concatenate, fit_image,
    holdout_mask, ImageSource, materialize, select_classes,
)
from ncjax.data.classes import (
    CIFAR100_LABEL_NAMES, cifar_fs_class_ids, CIFAR_FS_CLASSES, load_mini_imagenet,
    MINI_IMAGENET_HOWTO, MiniImageNetSplit,
)
from ncjax.data.pipeline import (
    prefetch,
)
from ncjax.data.preprocess import (
    augment, CIFAR100_MEAN, CIFAR100_STD, CIFAR10_MEAN, CIFAR10_STD, dataset_stats,
    FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD,
    normalize, preprocess, Preprocess, resize, stats_for,
)
from ncjax.data.sources import (
    DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, FEWSHOT_HOLDOUT, load, read_idx,
    TFDS_ALIASES, write_idx,
)

__all__ = [
    "ArrayDataset",
    "class_counts",
    "fit_image",
    "ImageSource",
    "materialize",
    "concatenate",
    "holdout_mask",
    "balanced_need",
    "balanced_subset",
    "select_classes",
    "CIFAR100_LABEL_NAMES",
    "CIFAR_FS_CLASSES",
    "cifar_fs_class_ids",
    "MiniImageNetSplit",
    "MINI_IMAGENET_HOWTO",
    "load_mini_imagenet",
    "prefetch",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "dataset_stats",
    "stats_for",
    "normalize",
    "resize",
    "augment",
    "preprocess",
    "Preprocess",
    "FASHION_MNIST_CLASSES",
    "DEFAULT_FASHION_MNIST_DIR",
    "TFDS_ALIASES",
    "load",
    "FEWSHOT_HOLDOUT",
    "read_idx",
    "write_idx",
]
