"""The device mesh and the shardings of batches and state over it.

Mesh axes: ("data", "fsdp"). The batch is split over both (every device gets its slice).
Params and optimizer state are replicated over "data" and, when fsdp > 1, split over
"fsdp" (each device holds 1/fsdp of every large tensor); XLA then all-gathers a layer's
weights where the step needs them and reduce-scatters its gradients.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Tensors smaller than this stay replicated: splitting them saves nothing worth a collective.
FSDP_MIN_SIZE = 2**12


def create_mesh(mesh_cfg=None, devices=None) -> Mesh:
  """A (data, fsdp) mesh over every device of every process (or `devices`).

  Consecutive devices share an fsdp group, so with fsdp <= devices per host the all-gathers
  stay inside a host.
  """
  devices = jax.devices() if devices is None else devices
  fsdp = mesh_cfg.fsdp if mesh_cfg is not None else 1
  return Mesh(np.asarray(devices).reshape(-1, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _leaf_sharding(leaf, mesh: Mesh) -> NamedSharding:
  fsdp = mesh.shape[FSDP_AXIS]
  if fsdp == 1 or leaf.size < FSDP_MIN_SIZE:
    return replicated(mesh)
  # Split the largest dimension the fsdp size divides (a conv's output channels, usually).
  for dim in sorted(range(leaf.ndim), key=lambda d: -leaf.shape[d]):
    if leaf.shape[dim] % fsdp == 0:
      spec = [None] * leaf.ndim
      spec[dim] = FSDP_AXIS
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(abstract_state, mesh: Mesh):
  """Shardings for every leaf of a train state, derived from its shapes (jax.eval_shape)."""
  return jax.tree.map(lambda leaf: _leaf_sharding(leaf, mesh), abstract_state)


def bytes_per_device(tree) -> tuple[int, int]:
  """(bytes held by the first local device, bytes of the whole arrays)."""
  leaves = jax.tree.leaves(tree)
  local = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  total = sum(x.nbytes for x in leaves)
  return local, total


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assemble each process's numpy batch into one global jax.Array per key."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
