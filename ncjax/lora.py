"""LoRA (Hu et al., ICLR 2022) as extra parameters beside the kernels they update.

`add` puts two factors next to every targeted kernel ``W`` of the fine-tuning units:
``lora_a`` (fan_in, r) and ``lora_b`` (r, fan_out), ``lora_b`` zero, so the model starts
exactly at its pre-trained function. The forward (`forward`) runs the unchanged Flax model
on `merge`d parameters, ``W + (alpha / r) * reshape(A @ B, W.shape)``, and the method's mask
(``methods.trainable_mask(params, 'lora')``: the factors and the head) makes the one train
step differentiate the factors only. The same `merge` exports a fine-tuned model as plain
weights that ncjax (and `ncjax.weights`) read back.

Kernel layouts (fan_in, fan_out), the issue's reshape:
* Dense (D_in, D_out): as is;
* ViT attention query / key / value (D, H, D_h) -> (D, H * D_h); out (H, D_h, D) ->
  (H * D_h, D);
* convolutions (k, k, C_in / groups, C_out) -> (k * k * C_in / groups, C_out).

The update is merged, not run as a side branch ``x A B``: one code path for every layer type
(grouped and strided convs, multi-head kernels), at the price of the targeted kernels' full
weight gradient ``dL/dW_eff`` (from which the factors' gradients are two small matmuls).
The frozen kernels that are not targeted get no gradient, and no backward pass runs below the
lowest targeted unit (tests/test_peft.py counts the convolutions).

Targets (`TARGETS`), a leaf's kind by its path inside a unit:
``query`` ``key`` ``value`` ``out`` (ViT attention; ``attention`` = all four), ``mlp`` (the
ViT's ``MlpBlock`` kernels), ``conv`` (every 4-D kernel), ``dense`` (every other 2-D kernel,
e.g. the MLP's layers). ``<unit>/<kind>`` (``layer12/query``) restricts a kind to one unit.
The stem, embedding, final norms and head are never targeted.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ncjax import methods

PyTree = Any
ATTENTION = ("query", "key", "value", "out")
TARGETS = ATTENTION + ("attention", "mlp", "conv", "dense")
A, B = methods.LORA_LEAVES


def kind(path: Sequence[str], kernel_ndim: int) -> str:
  """The target kind of the kernel at `path` (module names inside its unit, without the
  leaf name ``kernel``)."""
  if path and path[-1] in ATTENTION and any(p.startswith("MultiHeadDotProductAttention")
                                            for p in path):
    return path[-1]
  if any(p.startswith("MlpBlock") for p in path):
    return "mlp"
  return "conv" if kernel_ndim == 4 else "dense"


def check_targets(targets: Sequence[str], units: Sequence[str]) -> list[str]:
  """Problems with `targets` for a model with `units`, one line each (none: valid)."""
  out = []
  for t in targets:
    unit, _, k = t.rpartition("/")
    if k not in TARGETS:
      out.append(f"unknown LoRA target {t!r} (kinds: {', '.join(TARGETS)}, optionally as "
                 "<unit>/<kind>)")
    elif unit and unit not in units:
      out.append(f"LoRA target {t!r}: {unit!r} is not a unit (units: {', '.join(units)})")
  return out


def _selected(targets: Sequence[str], unit: str, k: str) -> bool:
  for t in targets:
    u, _, tk = t.rpartition("/")
    if (not u or u == unit) and (tk == k or (tk == "attention" and k in ATTENTION)):
      return True
  return False


def _shape2(k: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """(fan_in, fan_out) of a kernel of kind `k` (module docstring)."""
  if k in ("query", "key", "value"):
    return shape[0], int(np.prod(shape[1:]))
  return int(np.prod(shape[:-1])), shape[-1]


def targeted(params: PyTree, targets: Sequence[str], units: Sequence[str]
             ) -> list[tuple[tuple[str, ...], tuple[int, int]]]:
  """``[(path of the module holding the kernel, (fan_in, fan_out)), ...]`` of every kernel
  `targets` select in `units` (paths from the top of `params`, in tree order)."""
  out = []

  def walk(tree, path):
    if not isinstance(tree, dict):
      return
    if "kernel" in tree and not isinstance(tree["kernel"], dict):
      shape = tuple(np.shape(tree["kernel"]))
      k = kind(path[1:], len(shape))
      if _selected(targets, path[0], k):
        out.append((path, _shape2(k, shape)))
    for name, sub in tree.items():
      walk(sub, path + (name,))

  for u in units:
    walk(params.get(u, {}), (u,))
  return out


def _set(tree: dict, path: tuple[str, ...], fn) -> dict:
  """A copy of nested dict `tree` with the dict at `path` replaced by ``fn(that dict)``."""
  if not path:
    return fn(tree)
  return {**tree, path[0]: _set(tree[path[0]], path[1:], fn)}


def add(params: PyTree, targets: Sequence[str], rank: int, seed: int,
        units: Sequence[str]) -> PyTree:
  """`params` with ``lora_a`` (fan_in, rank) and ``lora_b`` (rank, fan_out) beside every
  targeted kernel: A uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform with a = sqrt 5),
  drawn from `seed` and the kernel's path; B zero. Raises ValueError when nothing is
  targeted."""
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  sites = targeted(params, targets, units)
  if not sites:
    raise ValueError(f"LoRA targets {tuple(targets)} select no kernel of the units "
                     f"{tuple(units)}")
  key = jax.random.PRNGKey(seed)
  for i, (path, (fan_in, fan_out)) in enumerate(sites):
    bound = 1.0 / np.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32,
                           -bound, bound)
    params = _set(params, path, lambda d, a=a, fo=fan_out: {
        **d, A: a, B: jnp.zeros((rank, fo), jnp.float32)})
  return params


def merge(params: PyTree, scale: float) -> PyTree:
  """Plain parameters: every kernel with factors beside it becomes ``W + scale * A @ B``
  (reshaped to W's shape, in W's dtype) and the factors are dropped. Jittable."""
  if not isinstance(params, dict):
    return params
  if A in params:
    w = params["kernel"]
    delta = (params[A] @ params[B]).reshape(w.shape)
    rest = {k: v for k, v in params.items() if k not in (A, B)}
    return {**rest, "kernel": w + (scale * delta).astype(w.dtype)}
  return {k: merge(v, scale) for k, v in params.items()}


def count(params: PyTree) -> int:
  """The LoRA factors' scalars in `params`."""
  return int(sum(np.prod(np.shape(p)) for path, p in
                 jax.tree_util.tree_flatten_with_path(params)[0]
                 if methods._leaf_name(path) in methods.LORA_LEAVES))


@functools.lru_cache(maxsize=None)
def forward(base: Callable, scale: float) -> Callable:
  """The `ncjax.train.Forward` of a LoRA model: `base` (e.g. ``train.model_forward(model)``)
  on ``merge(params, scale)``. Cached per (base, scale), so evaluation functions keyed on the
  forward compile once."""
  def fwd(params, batch_stats, x, train):
    return base(merge(params, scale), batch_stats, x, train)
  return fwd
