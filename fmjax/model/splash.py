"""Splash attention (`model.attention_impl=splash`, and `auto` on TPU): jax's Pallas TPU kernel, causal within packed
segments, GQA.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) never materialises the [T, S] scores: it walks
(block_q, block_kv) tiles, skips the tiles the causal mask rules out, and applies segment ids inside the others.
Grouped-query attention is native (query heads share key/value heads by integer groups). Under a mesh the kernel
runs per shard (`jax.shard_map`): batch over the data / fsdp axes, heads over the tensor axis, as the activations
are already laid out, so no collective is added. With the sequence split over the context axis (context.py) each
shard all-gathers the keys and values and attends its own queries to them: the kernel is built for the whole
sequence with its query blocks split over the axis (its block tables are sharded with the queries), and the causal
mask compares original positions, so load-balanced chunks skip exactly the tiles they should. Off TPU it runs in
Pallas's interpret mode, which is exact but slow: that is how the tests check it against the XLA path on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from fmjax import sharding
from fmjax.errors import UserError
from fmjax.model import context

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


def applies(impl: str, seq_len: int, kv_heads: int, platform: str | None = None,
            split: context.Plan | None = None) -> bool:
  """Whether a forward over `seq_len` tokens runs the kernel: `impl` 'splash' wherever the length fits (under a
  context split: each device's pieces of it); 'auto' (the default) when compiling for TPU and the key/value heads
  also split over the mesh's tensor axis. `platform`: the target's, else the mesh's devices' (fmjax.train.aot passes
  the slice's)."""
  unit = split.unit(seq_len) if split else seq_len
  if impl == "splash":
    return fits(unit)
  return (impl == "auto" and (platform or target_platform()) == "tpu" and fits(unit)
          and kv_heads % sharding.logical_ways("act_kv_heads") == 0)


FUSED_MAX_KV_BLOCKS = 8


def fused_backward(seq_len: int, block: int) -> bool:
  """Whether the backward pass is one fused kernel: dq, dk and dv from a single pass over the tiles (5 tile matmuls,
  not the 7 of separate dq and dkv kernels, which each recompute the scores). It writes one partial dQ per key block,
  a buffer of (seq_len / block) × the queries, so it is used up to FUSED_MAX_KV_BLOCKS key blocks (4096 tokens in
  tiles of 512, where it was measured faster); at 128k tokens that buffer would be 256 × the queries."""
  return seq_len // block <= FUSED_MAX_KV_BLOCKS


def _kernel(heads: int, seq_len: int, interpret: bool, split: context.Plan | None = None):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b = block_size(split.unit(seq_len) if split else seq_len)
  backward = dict(use_fused_bwd_kernel=True) if fused_backward(seq_len, b) else dict(block_q_dq=b, block_kv_dq=b)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, **backward)
  causal = _balanced_causal()(seq_len, split.shards) if split and split.balanced else sm.CausalMask((seq_len, seq_len))
  mask = sm.MultiHeadMask([causal] * heads)
  # built in each trace (not cached): its block tables become that trace's constants
  return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=split.shards if split else 1, block_sizes=sizes,
                            interpret=interpret)


@functools.cache
def _balanced_causal() -> type:
  """The mask class of load-balanced sequences (context.py): queries and keys both in that order, causal by original
  position. Each query's original position is in `q_sequence`; a key's is computed from its index (in the kernel
  too), so the gathered keys are used in the order they arrive, with no copy to restore the natural order."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  class BalancedCausalMask(sm._ComputableMask):
    def __init__(self, seq_len: int, shards: int):
      self.seq_len, self.shards = seq_len, shards
      super().__init__((seq_len, seq_len), lambda q, k: q >= context.original_position(k, seq_len, shards))
      self.q_sequence = context.original_index(seq_len, shards)

    def __eq__(self, other: object) -> bool:
      return type(other) is type(self) and (self.seq_len, self.shards) == (other.seq_len, other.shards)

    def __hash__(self) -> int:
      return hash((type(self), self.seq_len, self.shards))

  return BalancedCausalMask


def _local(kernel, q_BxNxTxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array, segment_ids_BxT: jax.Array,
           length_axes: tuple[str, ...] = ()) -> jax.Array:
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  kv_segments_BxS = segment_ids_BxT
  if length_axes:  # this shard's queries against every key (its transpose reduce-scatters the gradients)
    gather = lambda x, axis: jax.lax.all_gather(x, length_axes, axis=axis, tiled=True)  # noqa: E731
    k_BxKxSxH, v_BxKxSxH, kv_segments_BxS = gather(k_BxKxSxH, 2), gather(v_BxKxSxH, 2), gather(segment_ids_BxT, 1)
  one = lambda q, k, v, s, t: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=t))  # noqa: E731
  return jax.vmap(one)(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT, kv_segments_BxS)


def attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, segment_ids_BxT: jax.Array,
              split: context.Plan | None = None) -> jax.Array:
  """Causal self-attention within segments (a query sees earlier keys of its own segment), [B,T,N,H] out. `split`:
  how the sequence is split over the context axis (positions in load-balanced order when `split.balanced`)."""
  H = q_BxTxNxH.shape[-1]
  interpret = target_platform() != "tpu"
  q = jnp.swapaxes(q_BxTxNxH * (1.0 / math.sqrt(H)), 1, 2)  # the kernel takes no scale: fold it into q
  k, v = jnp.swapaxes(k_BxTxKxH, 1, 2), jnp.swapaxes(v_BxTxKxH, 1, 2)
  segments = segment_ids_BxT.astype(jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  N, T = q.shape[1], q.shape[2]
  if mesh.empty:
    return jnp.swapaxes(_local(_kernel(N, T, interpret), q, k, v, segments), 1, 2).astype(q_BxTxNxH.dtype)
  length_axes = sharding.logical_axes("act_len") if split else ()  # a sequence not split stays whole
  length = length_axes or None
  heads = P(*nn.logical_to_mesh_axes(("act_batch", "act_heads"))[:2], length, None)
  kv_heads = P(*nn.logical_to_mesh_axes(("act_batch", "act_kv_heads"))[:2], length, None)
  seg = P(nn.logical_to_mesh_axes(("act_batch",))[0], length)
  ways = sharding.logical_ways("act_kv_heads")
  if k.shape[1] % ways:
    raise UserError(f"model.attention_impl='splash' shards key/value heads over the tensor axis: "
                    f"model.num_kv_heads={k.shape[1]} must be a multiple of its {ways} devices; lower mesh.tensor "
                    "or use model.attention_impl=xla.")
  # the kernel for this shard's heads (its tables are per query block, so they shard with the queries' sequence)
  kernel = _kernel(N // sharding.logical_ways("act_heads"), T, interpret, split)
  kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, length)))
  run = functools.partial(_local, length_axes=length_axes)
  run = jax.shard_map(run, in_specs=(kernel_spec, heads, kv_heads, kv_heads, seg), out_specs=heads, check_vma=False)
  out = run(kernel, q, k, v, segments)
  return jnp.swapaxes(out, 1, 2).astype(q_BxTxNxH.dtype)


def kernel_cost(seq_len: int, head_dim: int, itemsize: int, split: context.Plan | None = None
                ) -> dict[str, tuple[float, float]]:
  """Analytic work of the kernels for ONE query head of ONE sequence: {'forward' | 'backward': (FLOPs, HBM bytes)};
  with `split`, of the busiest context shard's queries (all shards alike when load-balanced).

  Counts the tiles the causal mask keeps (each computed in full, the diagonal ones included), 2·b²·head_dim FLOPs per
  tile matmul: the forward does 2 (QKᵀ, PV), the fused backward 5 (QKᵀ again, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q, dS·K), separate
  dq and dkv kernels 3 + 4 (each recomputes QKᵀ and dO·Vᵀ). Bytes: the operands streamed per kept tile (K and V
  forward and in the dq kernel; Q and dO in the dkv or fused kernel, the fused one also writing one partial dQ per
  key block) and those read or written once per head (Q and O forward; Q, dO, dQ in the dq kernel; K, V, dK, dV)
  plus the float32 log-sum-exp. Grouped-query heads stream their key/value head's tiles anew. Compilers' cost models
  count a Pallas call as almost free, so a projected step time adds this (fmjax.train.aot)."""
  b = block_size(split.unit(seq_len) if split else seq_len)
  n = seq_len // b
  shards = split.shards if split else 1
  # each query block keeps the key blocks up to its own (natural) index; a shard's blocks, as context.py orders them
  blocks = context.original_index(n, shards) if split and split.balanced else np.arange(n)
  tiles = int(max((blocks.reshape(shards, -1) + 1).sum(axis=1)))
  q_len = seq_len // shards
  tile_matmul = 2.0 * b * b * head_dim
  block = b * head_dim * itemsize
  forward = (2 * tile_matmul * tiles, 2 * tiles * block + 2 * q_len * head_dim * itemsize + 4 * q_len)
  dkv = 2 * tiles * block + 4 * seq_len * head_dim * itemsize + 2 * 4 * b * tiles
  if fused_backward(seq_len, b):
    backward = (5 * tile_matmul * tiles, dkv + n * q_len * head_dim * itemsize)
  else:
    backward = (7 * tile_matmul * tiles, dkv + 2 * tiles * block + 3 * q_len * head_dim * itemsize + 8 * q_len)
  return {"forward": forward, "backward": backward}


def target_platform() -> str:
  """The platform being compiled for: the mesh's devices (a TPU slice compiled ahead of time on a CPU host too), else
  the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.devices()[0].platform
