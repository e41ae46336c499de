"""Input-pipeline throughput: can ncjax.data starve a GPU training step?

Measures, on CIFAR-shaped synthetic uint8 data (N x 32 x 32 x 3):

1. host batch iteration alone (``data.batches``: permutation gather of uint8 rows);
2. host iteration + transfer to the device (``jax.device_put``);
3. the jitted device pre-processing alone (uint8 -> [0,1] -> augment level 5 -> resize to
   224 -> normalise), on a batch already on the device;
4. the whole pipeline (prefetched host batches + transfer + pre-processing).

All as images/s at batch 128.  Compare with a ResNet-18 224x224 training step (roughly
2-3k images/s on one H100): the input pipeline is not the bottleneck if (4) is well above it.

    PYTHONPATH=. python benchmarks/input_pipeline.py [--n 20000 --steps 100]
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import numpy as np

from ncjax import data


def _rate(n_images: int, seconds: float) -> float:
    return n_images / max(seconds, 1e-9)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20000, help="synthetic dataset size")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--aug-level", type=int, default=5)
    p.add_argument("--steps", type=int, default=50, help="timed pre-processing calls")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    ds = data.ArrayDataset(rng.integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8),
                           rng.integers(0, 10, args.n).astype(np.int32), 10, "synthetic")
    bs = args.batch_size
    nb = data.num_batches(ds, bs)
    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "batch_size": bs,
               "image_size": args.image_size, "aug_level": args.aug_level, "n": args.n}

    # 1. host iteration alone (two epochs, the first one also warms the caches)
    for _ in data.batches(ds, bs, seed=0, epoch=0):
        pass
    t = time.perf_counter()
    for _ in data.batches(ds, bs, seed=0, epoch=1):
        pass
    results["host_iteration_img_s"] = _rate(nb * bs, time.perf_counter() - t)

    # 2. host iteration + host-to-device transfer of the uint8 batch (after a warm-up
    #    transfer, so that first-use set-up is not timed)
    jax.block_until_ready((jax.device_put(ds.images[:bs]), jax.device_put(ds.labels[:bs])))
    x = None
    t = time.perf_counter()
    for x, y in data.batches(ds, bs, seed=0, epoch=2):
        x = jax.device_put(x)
        y = jax.device_put(y)
    jax.block_until_ready(x)
    results["host_plus_transfer_img_s"] = _rate(nb * bs, time.perf_counter() - t)

    # 3. device pre-processing alone
    pre = jax.jit(functools.partial(
        data.preprocess, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD,
        image_size=args.image_size, aug_level=args.aug_level, train=True))
    xb = jax.device_put(ds.images[:bs])
    key = jax.random.PRNGKey(0)
    t = time.perf_counter()
    out = pre(key, xb).block_until_ready()
    results["compile_s"] = time.perf_counter() - t
    assert out.shape == (bs, args.image_size, args.image_size, 3), out.shape
    for i in range(3):
        out = pre(jax.random.fold_in(key, i), xb)
    out.block_until_ready()
    t = time.perf_counter()
    for i in range(args.steps):
        out = pre(jax.random.fold_in(key, i), xb)
    out.block_until_ready()
    results["device_preprocess_img_s"] = _rate(args.steps * bs, time.perf_counter() - t)

    # 4. full pipeline: prefetched host batches -> device -> pre-processing
    steps = min(args.steps, nb)
    it = data.prefetch(data.batches(ds, bs, seed=0, epoch=3), size=2,
                       transform=lambda b: (jax.device_put(b[0]), jax.device_put(b[1])))
    t = time.perf_counter()
    for i, (xb, yb) in zip(range(steps), it):
        out = pre(jax.random.fold_in(key, i), xb)
    out.block_until_ready()
    results["full_pipeline_img_s"] = _rate(steps * bs, time.perf_counter() - t)
    it.close()

    for k, v in results.items():
        print(f"{k:>28}: {v:,.1f}" if isinstance(v, float) else f"{k:>28}: {v}")
    print("reference: ResNet-18 224x224 training step on one H100 ~ 2,000-3,000 img/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
