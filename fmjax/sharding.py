"""Device mesh and logical-axis sharding.

The mesh has axes (data, fsdp, context, tensor, expert); each has a within-slice (ICI) size and an across-slice (DCN)
size, and one size per group may be -1 to take the remaining devices. Model code names logical axes only;
`config.mesh.rules` maps them to mesh axes, so a change of parallelism is a change of config.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from fmjax.errors import UserError

MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# Parameters: FSDP over the embedding dimension (over fsdp and context: the context axis holds shards of the weights
# as well, as in MaxText), tensor parallelism over heads / MLP / vocabulary, the experts of an MoE layer over expert.
# Activations: batch over data × fsdp × expert (outside the experts, the expert axis is one more batch axis, as in
# MaxText), the sequence over context (fmjax/model/context.py), the tensor-parallel dimension over tensor.
DEFAULT_RULES = (
    ("act_batch", BATCH_AXES),
    ("act_len", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("exp", "expert"),
    ("layers", None),
    ("norm", None),
    ("adapter_rank", None),
    ("labels", None),
)


def _fill(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  sizes = list(sizes)
  prefix = "mesh.dcn_" if what == "dcn" else "mesh."
  named = lambda values: ", ".join(f"{prefix}{a}={v}" for a, v in zip(MESH_AXES, values))  # noqa: E731
  if sizes.count(-1) > 1:
    raise UserError(f"{named(sizes)}: at most one {what} size may be -1 (fill).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise UserError(f"{named(sizes)} cannot fill {total} devices; make {total} divisible by {known}.")
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise UserError(f"{named(sizes)} use {math.prod(sizes)} devices but {total} are available; set one of them to "
                    "-1 to fill.")
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, context, tensor, expert) mesh from `mesh_cfg` (ICI sizes and dcn_* sizes)."""
  devices = list(devices if devices is not None else jax.devices())
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  dcn = _fill([getattr(mesh_cfg, "dcn_" + a) for a in MESH_AXES], num_slices, "dcn")
  ici = _fill([getattr(mesh_cfg, a) for a in MESH_AXES], len(devices) // num_slices, "ici")
  if num_slices > 1:
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  elif devices[0].platform == "tpu":
    arr = mesh_utils.create_device_mesh(ici, devices)
  else:
    arr = np.asarray(devices).reshape(ici)
  return Mesh(arr, MESH_AXES)


def fit_spec(shape: Sequence[int], spec: P, mesh: Mesh, name: str = "") -> P:
  """Drops mesh axes that do not divide their dimension (that dimension is then replicated), with a warning."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    if names and dim % size:
      logging.warning("sharding: %s dimension %d is not divisible by mesh axes %s (size %d); replicating it.",
                      name or "array", dim, names, size)
      axes = None
    out.append(axes)
  return P(*out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of abstract, logically-partitioned Flax variables (unboxed structure)."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), rules)
  shapes = nn.unbox(abstract_boxed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x, s: NamedSharding(mesh, fit_spec(x.shape, s, mesh, jax.tree_util.keystr(path))),
      shapes, specs)


def logical_axes(name: str) -> tuple[str, ...]:
  """The mesh axes the logical axis `name` maps to under the current rules. Asked one name at a time: flax resolves
  the names of one call as one array's dims, each mesh axis used once, and 'act_batch' already takes fsdp and
  expert."""
  axes = nn.logical_to_mesh_axes((name,))[0]
  return tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if a)


def logical_ways(name: str) -> int:
  """Devices the logical axis `name` splits over under the current mesh and rules (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else math.prod(mesh.shape[a] for a in logical_axes(name))


def batch_shards(mesh: Mesh) -> int:
  """Devices the global batch is split over."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (global batch) axis over data × fsdp × expert; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_shard(mesh: Mesh, process: int | None = None) -> tuple[int, int]:
  """(index, count): which of the `count` distinct row sets this process's devices hold. Processes whose devices
  hold the same batch shards (a context or tensor group spanning hosts) read the same rows; otherwise each process
  is its own set, as (process_index, process_count) would give."""
  index, count = _row_sets(mesh)
  return index[jax.process_index() if process is None else process], count


@functools.lru_cache(maxsize=8)
def _row_sets(mesh: Mesh) -> tuple[dict[int, int], int]:
  """Process -> index of its row set, and the number of sets (once per mesh: every batch asks)."""
  names = list(mesh.axis_names)
  devices = np.moveaxis(mesh.devices, [names.index(a) for a in BATCH_AXES], range(len(BATCH_AXES)))
  holders = devices.reshape(math.prod(mesh.shape[a] for a in BATCH_AXES), -1)  # row r: the devices of batch shard r
  rows: dict[int, set[int]] = {}
  for r, group in enumerate(holders):
    for d in group:
      rows.setdefault(d.process_index, set()).add(r)
  sets = sorted({tuple(sorted(s)) for s in rows.values()})
  return {p: sets.index(tuple(sorted(s))) for p, s in rows.items()}, len(sets)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows (its `data_shard`'s) into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  count = data_shard(mesh)[1]
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * count,) + v.shape[1:])
          for k, v in local_batch.items()}
