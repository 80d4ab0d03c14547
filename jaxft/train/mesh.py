"""Where arrays live: every batch sharded over all devices, the train state replicated."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft.train.errors import TrainError


@dataclasses.dataclass(frozen=True)
class DataMesh:
  """One ``data`` axis over every device of every process.

  Every process feeds its own contiguous slice of each global batch: the training loaders build only
  that slice (:func:`jaxft.train.setup.train_batches`); :meth:`shard` slices a batch held whole.
  """

  batch: NamedSharding
  replicated: NamedSharding
  num_devices: int

  @classmethod
  def create(cls, batch_size: int) -> "DataMesh":
    """Returns the mesh of all devices.

    Raises:
      TrainError: a batch size the number of devices does not divide.
    """
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    if batch_size % len(devices):
      raise TrainError(f"batch size {batch_size} is not divisible by the {len(devices)} devices")
    return cls(batch=NamedSharding(mesh, P("data")), replicated=NamedSharding(mesh, P()),
               num_devices=len(devices))

  @property
  def process_index(self) -> int:
    """This process (``jax.process_index()``)."""
    return jax.process_index()

  @property
  def process_count(self) -> int:
    """The number of processes (``jax.process_count()``)."""
    return jax.process_count()

  def local_rows(self, global_batch: np.ndarray) -> np.ndarray:
    """This process's contiguous slice of ``global_batch``'s rows (a view)."""
    local = len(global_batch) // self.process_count
    lo = self.process_index * local
    return global_batch[lo:lo + local]

  def shard(self, global_batch: np.ndarray) -> jax.Array:
    """The global array whose rows are ``global_batch``'s, this process holding its own slice."""
    return self.shard_local(self.local_rows(global_batch))

  def shard_local(self, local_rows: np.ndarray) -> jax.Array:
    """The global array made of every process's ``local_rows`` (this process's slice of the global
    batch, in process order), as the loaders build them (:func:`jaxft.train.setup.train_batches`)."""
    return jax.make_array_from_process_local_data(self.batch, local_rows)

  def replicate(self, tree: Any, copy: bool = False) -> Any:
    """``tree`` on every device; ``copy`` first copies every leaf (so that it shares no buffer with
    another, e.g. with a donated state). ``tree`` is not mutated."""
    if copy:
      tree = jax.tree.map(lambda a: np.array(a, copy=True), tree)
    return jax.device_put(tree, self.replicated)
