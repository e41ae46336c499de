"""Data parallelism: a one-axis `Mesh` (``'data'``), the batch sharded over it, the state
replicated; each process feeds its own rows of the global batch (multi-host).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ncjax.train.step import PyTree


def data_mesh(devices=None) -> Mesh:
  """A one-axis mesh ``('data',)`` over all (global) devices."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the mesh")


def local_rows(global_batch: int) -> slice:
  """This process's rows of a global batch (processes feed contiguous slices)."""
  per = global_batch // jax.process_count()
  start = jax.process_index() * per
  return slice(start, start + per)


def to_global(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """Assembles per-process batch slices into one batch-sharded global array."""
  return jax.make_array_from_process_local_data(batch_sharded(mesh), np.asarray(local))


def put_replicated(mesh: Mesh, tree: PyTree, copy: bool = False) -> PyTree:
  """`tree` replicated over `mesh`; ``copy=True`` never aliases the input buffers (a
  transfer, not a compiled copy per leaf shape)."""
  sharding = replicated(mesh)
  return jax.device_put(tree, sharding, may_alias=False if copy else None)


def to_host(x: jax.Array) -> np.ndarray:
  """Global array -> numpy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
