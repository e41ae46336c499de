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
BatchNorm running statistics are not parameters: they live in ``batch_stats`` and are updated
on the downstream data for every method (the train step runs every BatchNorm in train mode).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

METHODS = ("linear", "layer", "scl", "full")
HEAD = "head"

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
  if method == "full":
    return frozenset(top_level)
  if method == "linear":
    return frozenset({HEAD})
  if not unit:
    raise ValueError(f"method {method!r} needs a unit (e.g. 'block5' or 'layer8')")
  if unit not in top_level:
    units = [k for k in top_level if k != HEAD]
    raise ValueError(f"unit {unit!r} is not a top-level module of this model; "
                     f"top-level modules: {units}")
  return frozenset({unit, HEAD})


def trainable_mask(params: Mapping[str, PyTree], method: str, unit: str | None = None) -> PyTree:
  """Pytree of bools shaped like `params`: ``True`` where the parameter trains."""
  import jax  # here, not at the top: `ncjax.report` reads METHODS and must not load jax
  keep = trainable_top_level(method, unit, list(params.keys()))
  return {k: jax.tree.map(lambda _: k in keep, v) for k, v in params.items()}


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
  """Trainable parameters (head included) over all parameters, in percent (Table 3's row)."""
  return 100.0 * count(params, mask) / count(params)


def model_options(method: str, unit: str | None) -> dict:
  """The `ncjax.models.get` options a method needs: SCL FT adds the skip from its unit to
  the penultimate feature."""
  _check_method(method)
  return {"scl_unit": unit} if method == "scl" else {}
