"""Context (sequence) parallelism: the sequence dimension of the activations split over the `context` mesh axis.

Each device of a context group holds T/C positions of the rows of its batch shard. Everything but attention works per
position, so only attention talks: keys and values are all-gathered over the axis (splash or XLA then attends the
local queries to all of them) and their gradients reduce-scattered back. The weights are sharded over the axis too
(one more FSDP axis), so a context group holds one copy of the model state between them.

Causal attention gives late positions more keys than early ones: split into contiguous shards, the last device would
do 2C-1 times the work of the first. Load balancing (`model.context_load_balance`, on by default) cuts the sequence
into 2C chunks and gives device i chunks i and 2C-1-i, so every device does the same work (exactly, in whole
tiles). The model reorders its inputs on entry (`balance`) and its per-position outputs on exit (`unbalance`);
positions (RoPE) and segment ids travel with their tokens, and attention masks by original index (`original_index`),
so documents packed across shard boundaries attend as in one piece.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from fmjax import sharding
from fmjax.errors import UserError


class Plan(NamedTuple):
  """How one forward over T positions splits its sequence: over `shards` devices, load-balanced or contiguous."""
  shards: int
  balanced: bool

  def unit(self, seq_len: int) -> int:
    """The length of the contiguous pieces a device holds (a kernel's tiles must divide it)."""
    return seq_len // (2 * self.shards if self.balanced else self.shards)


def plan(seq_len: int, load_balance: bool, shards: int | None = None) -> Plan | None:
  """The split of a `seq_len` forward over `shards` devices (default: the current mesh's under the current rules), or
  None when the sequence is not split. A length the split does not divide (e.g. one prompt being scored) keeps the
  sequence whole on each device."""
  shards = shards or sharding.logical_ways("act_len")
  if shards == 1 or seq_len % shards:
    return None
  return Plan(shards, load_balance and seq_len % (2 * shards) == 0)


def check_length(seq_len: int, shards: int, load_balance: bool) -> None:
  """A one-line error unless `seq_len` splits over `shards` context devices (in 2·shards chunks when balanced)."""
  pieces = 2 * shards if load_balance and shards > 1 else shards
  if seq_len % pieces:
    how = f"2 × mesh.context = {pieces} load-balanced chunks" if pieces > shards else f"mesh.context={shards}"
    raise UserError(f"train.seq_len={seq_len} does not split into {how}; make train.seq_len a multiple of {pieces} "
                    "or change mesh.context.")


def _at(axis: int, index) -> tuple:
  return (slice(None),) * axis + (index,)


def balance(x, shards: int, axis: int = 1):
  """Natural order -> load-balanced order along `axis` (numpy or jax arrays): device i's slice holds chunks i and
  2·shards-1-i."""
  xp = np if isinstance(x, np.ndarray) else jnp
  axis = axis % x.ndim
  chunks = x.reshape(x.shape[:axis] + (2 * shards, -1) + x.shape[axis + 1:])
  front, back = chunks[_at(axis, slice(0, shards))], chunks[_at(axis, slice(2 * shards - 1, shards - 1, -1))]
  return xp.stack([front, back], axis=axis + 1).reshape(x.shape)


def unbalance(x, shards: int, axis: int = 1):
  """Load-balanced order -> natural order along `axis` (the inverse of `balance`)."""
  xp = np if isinstance(x, np.ndarray) else jnp
  axis = axis % x.ndim
  pairs = x.reshape(x.shape[:axis] + (shards, 2, -1) + x.shape[axis + 1:])
  front, back = pairs[_at(axis + 1, 0)], pairs[_at(axis + 1, 1)][_at(axis, slice(None, None, -1))]
  return xp.concatenate([front, back], axis=axis).reshape(x.shape)


def original_position(p, seq_len: int, shards: int):
  """The natural position of load-balanced position(s) `p`, by integer arithmetic alone, so the same function
  serves NumPy and traced arrays (inside the splash kernel too): piece s holds chunks s and 2·shards-1-s."""
  c = seq_len // (2 * shards)
  s, w = p // (2 * c), p % (2 * c)
  return s * c + w + (w >= c) * ((2 * shards - 2 - 2 * s) * c)


def original_index(seq_len: int, shards: int) -> np.ndarray:
  """[T] int32: the natural position of each load-balanced position."""
  return original_position(np.arange(seq_len, dtype=np.int32), seq_len, shards).astype(np.int32)
