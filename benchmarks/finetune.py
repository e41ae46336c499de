"""Train-step time and compiled memory of each fine-tuning method (issue 4 §7).

ResNet-18 (CIFAR stem) on 32x32 inputs, batch 128, through ncjax.train's one train step:
full FT, Layer FT block5, SCL FT block5, linear probe (full forward, head-only gradient),
and issue 19's BitFit, LoRA (rank 8; ViT: attention + MLP kernels, conv nets: the units'
convolutions) and, on a ViT, VPT-deep (10 tokens). LP-FT's steps are the linear probe's,
then full FT's. Prints medians after warm-up and ratios to full FT; temporary memory from
XLA's memory_analysis() of the compiled step.

    python benchmarks/finetune.py [--batch 128] [--reps 10] [--model resnet18] [--size 32]
    python benchmarks/finetune.py --model vit_b32 --size 224 --unit layer8 --stem ""
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ncjax import lora, methods, models, train


def bench(model_name, method, unit, batch, size, reps, stem):
  options = {"stem": stem} if stem else {}
  if method == "scl":
    options["scl_unit"] = unit
  if method == "vpt":
    options.update(vpt_tokens=10, vpt_deep=True)
  model = models.get(model_name, 10, **options)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
  y = jnp.asarray(np.arange(batch) % 10, jnp.int32)
  v = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.PRNGKey(0))
  params, forward = v["params"], train.model_forward(model)
  if method == "lora":
    params = lora.add(params, ("attention", "mlp", "conv"), 8, 0, models.units(model))
    forward = lora.forward(forward, 1.0)
  mask = methods.trainable_mask(params, method, unit)
  tx = train.make_optimizer(train.OptimConfig(), 1000, mask)
  state = train.init_state(params, v.get("batch_stats", {}), tx)
  step = jax.jit(train.make_train_step(forward, tx, mask), donate_argnums=0)
  rng = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  compiled = step.lower(state, x, y, rng).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get("flops", float("nan"))
  for _ in range(2):
    state, m = compiled(state, x, y, rng)
  jax.block_until_ready(m)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    state, m = compiled(state, x, y, rng)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  return float(np.median(times)), temp, flops, compile_s, methods.percent_trainable(params, mask)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--model", default="resnet18")
  p.add_argument("--unit", default="block5")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--stem", default="cifar")
  p.add_argument("--reps", type=int, default=10)
  a = p.parse_args()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  model: {a.model} "
        f"({a.stem} stem) {a.size}x{a.size}, batch {a.batch}, unit {a.unit}")
  rows = {}
  vit = a.model.startswith("vit")
  for method in ("full", "layer", "scl", "linear", "bitfit", "lora") + (("vpt",) if vit else ()):
    rows[method] = bench(a.model, method, a.unit, a.batch, a.size, a.reps, a.stem)
  full_t, full_m, full_f = rows["full"][:3]
  print(f"{'method':8s} {'%params':>8s} {'step ms':>9s} {'x full':>7s} {'temp MiB':>9s} "
        f"{'x full':>7s} {'GFLOP':>8s} {'x full':>7s} {'compile s':>9s}")
  for method, (t, m, f, c, pct) in rows.items():
    print(f"{method:8s} {pct:8.2f} {t * 1e3:9.2f} {t / full_t:7.3f} {m / 2**20:9.1f} "
          f"{m / full_m:7.3f} {f / 1e9:8.2f} {f / full_f:7.3f} {c:9.1f}")


if __name__ == "__main__":
  main()
