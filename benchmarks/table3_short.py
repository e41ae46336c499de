"""Table 3's ResNet-18 CIFAR-10 column (linear / Layer FT block5 / SCL FT / full FT at
224x224) on a short schedule: the paper-scale pipeline end to end, for timing an accelerator.

    python benchmarks/table3_short.py --epochs 2 [--dtype bfloat16] [--train_size 0]

Data: TFDS ``cifar10`` when it is prepared (``--data_dir``); otherwise synthetic
CIFAR-10-shaped data (50,000 + 10,000 uint8 32x32x3 images: a class-dependent colour pattern
plus noise, so accuracy is above chance) written as IDX files and read through ``idx:<dir>``.
Weights: ``--weights`` (torchvision ``resnet18-f37072fd.pth``) when given, else from scratch.
Prints the results table, the wall time and the number of XLA compilations.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import table3  # noqa: E402
from ncjax import data  # noqa: E402
from ncjax.experiment import runner  # noqa: E402


def synthetic_cifar(directory: str, n_train: int = 50_000, n_test: int = 10_000) -> str:
  """Writes CIFAR-10-shaped IDX files (labels 0..9) to `directory`; returns ``idx:<dir>``."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:32, 0:32] / 31.0
  patterns = np.stack([np.stack([np.sin((k + 1) * xx + c) * np.cos((k % 3 + 1) * yy - c)
                                 for c in range(3)], -1) for k in range(10)])
  for split, n in (("train", n_train), ("t10k", n_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    noise = rng.normal(0, 0.6, (n, 32, 32, 3))
    images = np.clip(127.5 + 60 * (patterns[labels] + noise), 0, 255).astype(np.uint8)
    data.write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte"), images)
    data.write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte"), labels)
  return f"idx:{directory}"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--train_size", type=int, default=0, help="class-balanced subset (0: all)")
  p.add_argument("--weights", default="", help="torchvision resnet18 checkpoint (default: scratch)")
  p.add_argument("--data_dir", default="", help="TFDS data_dir holding a prepared cifar10")
  p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "table3_short"))
  p.add_argument("--image_size", type=int, default=224, help="model input (CPU smoke: 32)")
  p.add_argument("--synthetic_train", type=int, default=50_000)
  p.add_argument("--synthetic_test", type=int, default=10_000)
  args = p.parse_args()

  c = table3.get_config()
  c.models, c.datasets, c.dtype = ("resnet18",), ("cifar10",), args.dtype
  c.optim.epochs, c.checkpoint_every, c.plots = args.epochs, 0, False
  c.train_sizes = (args.train_size,) if args.train_size else ()
  c.backbone.resnet18.weights = args.weights
  c.backbone.resnet18.image_size = args.image_size
  c.data_dir = args.data_dir
  try:
    data.load("cifar10", "test", data_dir=args.data_dir or None)
  except (FileNotFoundError, ValueError, ImportError):
    d = os.path.join(args.workdir, "synthetic_cifar10")
    os.makedirs(d, exist_ok=True)
    with c.unlocked():
      c.dataset_sources.cifar10 = synthetic_cifar(d, args.synthetic_train, args.synthetic_test)
    print(f"TFDS cifar10 not prepared: synthetic CIFAR-10-shaped data in {d}")
  t0 = time.time()
  runner.run(c, args.workdir)
  print(f"table3_short: {time.time() - t0:.1f} s wall ({args.dtype}, {args.epochs} epochs)")


if __name__ == "__main__":
  main()
