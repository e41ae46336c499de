"""Fine-tuning methods as trainable-parameter masks.

A method is nothing but a pytree of bools shaped like the parameters: ``True`` leaves train,
``False`` leaves are frozen. That mask is the single source of truth. `ncjax.train` uses it
twice: to split the parameters into a trainable and a frozen partition, so that the loss is
differentiated with respect to the trainable partition only (no backward pass runs through
the frozen prefix of the network, and no gradient is ever formed for a frozen leaf), and to
build the optimizer with `optax.masked`, so that frozen leaves keep no optimizer state.

Methods (paper §3.3, REFERENCE §3):
  ``linear``  the new classifier ``head`` only (linear probing);
  ``layer``   one fine-tuning unit (e.g. ``block5``) + ``head`` (Layer FT);
  ``scl``     the same mask as ``layer``; the model itself is built with ``scl_unit`` so the
              unit's pooled output is skip-connected to the penultimate feature (SCL FT);
  ``full``    every parameter.
Beyond the paper (issue 19), the methods researchers compare against:
  ``bitfit``  every bias and every normalisation scale / bias (leaves named ``bias`` or
              ``scale``: Dense / Conv biases, BatchNorm and LayerNorm) + ``head`` (Zaken et al.);
  ``lora``    the low-rank factors ``lora_a`` / ``lora_b`` that `ncjax.lora` adds beside the
              targeted kernels + ``head`` (Hu et al.);
  ``lp_ft``   a linear probe (``linear``'s mask) for a fraction of the schedule, then every
              parameter (Kumar et al.); `trainable_mask` gives the final (full) mask and
              `phase_masks` both;
  ``vpt``     the learnt prompt tokens, the ViT's top-level ``prompts`` + ``head`` (Jia et al.).
Extra parameters (``lora_a``, ``lora_b``, ``prompts``: `is_extra`) count as trained, and
`percent_trainable`'s denominator stays the backbone plus head without them.
BatchNorm running statistics are not parameters: they live in ``batch_stats`` and are updated
on the downstream data for every method (the train step runs every BatchNorm in train mode).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

METHODS = ("linear", "layer", "scl", "full", "bitfit", "lora", "lp_ft", "vpt")
HEAD = "head"
BITFIT_LEAVES = ("bias", "scale")       # Dense / Conv biases; BatchNorm / LayerNorm scale, bias
LORA_LEAVES = ("lora_a", "lora_b")      # `ncjax.lora`'s factors, beside the kernel they update
PROMPTS = "prompts"                     # the ViT's top-level VPT tokens (L or 1, P, D)
AFTER_UNITS = ("encoder_norm", "pre_logits")  # top-level modules between the units and head

PyTree = Any
# jax is imported inside the functions that use it: `ncjax.report` reads METHODS without it.


def needs_unit(method: str) -> bool:
  """Whether `method` fine-tunes a named unit (``layer`` and ``scl``)."""
  _check_method(method)
  return method in ("layer", "scl")


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"unknown fine-tuning method {method!r}; expected one of {METHODS}")


def trainable_top_level(method: str, unit: str | None, top_level: Sequence[str]) -> frozenset:
  """Names of the top-level submodules that train under `method`.

  Args:
    method: one of ``METHODS``.
    unit: the unit name for ``layer`` / ``scl`` (ignored otherwise).
    top_level: the model's top-level parameter names (must include ``head``).
  """
  _check_method(method)
  top_level = tuple(top_level)
  if HEAD not in top_level:
    raise ValueError(f"the model has no top-level {HEAD!r} classifier; top-level parameters: "
                     f"{top_level}")
  if method in ("full", "lp_ft"):
    return frozenset(top_level)
  if method in ("linear", "bitfit", "lora", "vpt"):  # + their leaves (`trainable_mask`)
    return frozenset({HEAD})
  if not unit:
    raise ValueError(f"method {method!r} needs a unit (e.g. 'block5' or 'layer8')")
  if unit not in top_level:
    units = [k for k in top_level if k != HEAD]
    raise ValueError(f"unit {unit!r} is not a top-level module of this model; "
                     f"top-level modules: {units}")
  return frozenset({unit, HEAD})


def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _leaf_name(path) -> str:
  """The last key of a `jax.tree_util` key path (the leaf's own name)."""
  return _key(path[-1])


def trainable_mask(params: Mapping[str, PyTree], method: str, unit: str | None = None) -> PyTree:
  """Pytree of bools shaped like `params`: ``True`` where the parameter trains.

  ``linear`` / ``layer`` / ``scl`` / ``full`` / ``lp_ft`` decide by the top-level key alone;
  ``bitfit`` adds every leaf named in `BITFIT_LEAVES`, ``lora`` every leaf named in
  `LORA_LEAVES`, ``vpt`` the top-level `PROMPTS`. A ``lora`` / ``vpt`` mask over parameters
  without their leaves raises ValueError (the adapters are added before the mask is taken)."""
  import jax  # here, not at the top: `ncjax.report` reads METHODS and must not load jax
  keep = trainable_top_level(method, unit, list(params.keys()))
  extra = {"bitfit": BITFIT_LEAVES, "lora": LORA_LEAVES}.get(method, ())

  def trains(path, _):  # path from the top: its first key is the top-level module
    k = _key(path[0])
    return k in keep or _leaf_name(path) in extra or (method == "vpt" and k == PROMPTS)
  mask = jax.tree_util.tree_map_with_path(trains, dict(params))
  if method in ("lora", "vpt") and not any(
      m for k, v in mask.items() if k != HEAD for m in jax.tree.leaves(v)):
    what = "LoRA factors (ncjax.lora.add)" if method == "lora" else "top-level 'prompts' (a ViT "\
           "built with vpt_tokens > 0)"
    raise ValueError(f"method {method!r}: the parameters have no {what}")
  return mask


def phase_masks(params: Mapping[str, PyTree], method: str, unit: str | None = None
                ) -> tuple[PyTree, ...]:
  """The masks of a method's training phases, in order: ``lp_ft``'s linear probe, then
  every parameter; one phase, `trainable_mask`, for every other method."""
  if method == "lp_ft":
    return trainable_mask(params, "linear"), trainable_mask(params, "full")
  return (trainable_mask(params, method, unit),)


def is_extra(path) -> bool:
  """Whether the leaf at `path` (a `jax.tree_util` key path from the top of the parameters)
  is an extra parameter a method adds (LoRA factors, VPT prompts), not the backbone's."""
  return _leaf_name(path) in LORA_LEAVES or _key(path[0]) == PROMPTS


def partition(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
  """Splits `params` into ``(trainable, frozen)``, each with ``None`` where the other has a leaf.

  ``None`` is an empty pytree node, so `jax.grad` over the trainable partition gives gradients
  only for trainable leaves and the optimizer sees (and keeps state for) those alone.
  """
  import jax
  trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
  frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
  return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of `partition`."""
  import jax
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)


def count(params: PyTree, mask: PyTree | None = None) -> int:
  """Number of scalars in `params` (only the ``True`` leaves of `mask` when given)."""
  import jax
  if mask is None:
    return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))
  return int(sum(np.prod(np.shape(p)) for p, m in zip(jax.tree.leaves(params),
                                                         jax.tree.leaves(mask)) if m))


def percent_trainable(params: PyTree, mask: PyTree) -> float:
  """Trainable parameters (head and extra parameters included) over the backbone and head
  (extra parameters, `is_extra`, left out), in percent (Table 3's row)."""
  import jax
  base = sum(int(np.prod(np.shape(p))) for path, p in
             jax.tree_util.tree_flatten_with_path(params)[0] if not is_extra(path))
  return 100.0 * count(params, mask) / base


def layer_decay_scales(params: Mapping[str, PyTree], units: Sequence[str],
                       decay: float) -> PyTree:
  """Layer-wise learning-rate decay: a float per leaf like `params`. Unit i of L (in
  order, 1-based) gets ``decay ** (L - i)``; top-level modules before the first unit (stem,
  embedding, class token, position embedding, VPT prompts) ``decay ** L``; the head and
  everything after the last unit (`AFTER_UNITS`: the ViT's final norm and pre-logits) 1. LoRA
  factors go with their kernel's unit. ``decay = 1``: every leaf 1."""
  import jax
  units = list(units)
  n = len(units)

  def scale(k):  # by name: jax's tree functions return dicts with sorted keys
    if k in units:
      return decay ** (n - 1 - units.index(k))
    return 1.0 if k == HEAD or k in AFTER_UNITS else decay ** n
  return {k: jax.tree.map(lambda _, k=k: float(scale(k)), v) for k, v in params.items()}


def model_options(method: str, unit: str | None) -> dict:
  """The `ncjax.models.get` options a method needs: SCL FT adds the skip from its unit to
  the penultimate feature."""
  _check_method(method)
  return {"scl_unit": unit} if method == "scl" else {}
