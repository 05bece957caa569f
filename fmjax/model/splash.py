"""Splash attention (`model.attention_impl=splash`): jax's Pallas TPU kernel, causal within packed segments, GQA.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) never materialises the [T, S] scores: it walks
(block_q, block_kv) tiles, skips the tiles the causal mask rules out, and applies segment ids inside the others.
Grouped-query attention is native (query heads share key/value heads by integer groups). Under a mesh the kernel
runs per shard (`jax.shard_map`): batch over the data / fsdp axes, heads over the tensor axis, as the activations
are already laid out, so no collective is added. Off TPU it runs in Pallas's interpret mode, which is exact but
slow: that is how the tests check it against the XLA path on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from fmjax.errors import UserError

BLOCKS = (512, 256, 128)  # tile edges, largest first (512 x 512 is MaxText's default); multiples of the TPU lanes


def block_size(seq_len: int) -> int:
  """The largest tile edge of BLOCKS that divides the sequence length, or an error naming the fix."""
  if not fits(seq_len):
    raise UserError(f"model.attention_impl='splash' needs train.seq_len a multiple of 128 (got {seq_len}); set "
                    "train.seq_len or use model.attention_impl=xla.")
  return next(b for b in BLOCKS if seq_len % b == 0)


def fits(seq_len: int) -> bool:
  """Whether the kernel takes this length (the model falls back to XLA attention for others)."""
  return seq_len % 128 == 0


def _kernel(heads: int, seq_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b = block_size(seq_len)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len))] * heads)
  # built in each trace (not cached): its block tables become that trace's constants
  return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def _local(q_BxNxTxH: jax.Array, k_BxKxTxH: jax.Array, v_BxKxTxH: jax.Array, segment_ids_BxT: jax.Array,
           interpret: bool) -> jax.Array:
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  N, T = q_BxNxTxH.shape[1], q_BxNxTxH.shape[2]
  kernel = _kernel(N, T, interpret)
  one = lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))  # noqa: E731
  return jax.vmap(one)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT)


def attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, segment_ids_BxT: jax.Array
              ) -> jax.Array:
  """Causal self-attention within segments (a query sees earlier keys of its own segment), [B,T,N,H] out."""
  H = q_BxTxNxH.shape[-1]
  interpret = _platform() != "tpu"
  q = jnp.swapaxes(q_BxTxNxH * (1.0 / math.sqrt(H)), 1, 2)  # the kernel takes no scale: fold it into q
  k, v = jnp.swapaxes(k_BxTxKxH, 1, 2), jnp.swapaxes(v_BxTxKxH, 1, 2)
  segments = segment_ids_BxT.astype(jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  run = functools.partial(_local, interpret=interpret)
  if not mesh.empty:
    heads = nn.logical_to_mesh_axes(("act_batch", "act_heads", "act_len", None))
    kv_heads = nn.logical_to_mesh_axes(("act_batch", "act_kv_heads", "act_len", None))
    seg = nn.logical_to_mesh_axes(("act_batch", "act_len"))
    axes = kv_heads[1] if isinstance(kv_heads[1], tuple) else (kv_heads[1],) if kv_heads[1] else ()
    ways = math.prod(mesh.shape[a] for a in axes)
    if k.shape[1] % ways:
      raise UserError(f"model.attention_impl='splash' shards key/value heads over the tensor axis: "
                      f"model.num_kv_heads={k.shape[1]} must be a multiple of its {ways} devices; lower mesh.tensor "
                      "or use model.attention_impl=xla.")
    run = jax.shard_map(run, in_specs=(heads, kv_heads, kv_heads, seg), out_specs=heads, check_vma=False)
  out = run(q, k, v, segments)
  return jnp.swapaxes(out, 1, 2).astype(q_BxTxNxH.dtype)


def _platform() -> str:
  """The platform being compiled for: the mesh's devices (a TPU slice compiled ahead of time on a CPU host too), else
  the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.devices()[0].platform
