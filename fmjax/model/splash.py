"""Splash attention (`model.attention_impl=splash`, and `auto` on TPU): jax's Pallas TPU kernel, causal within packed
segments, GQA.

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


def applies(impl: str, seq_len: int, kv_heads: int, platform: str | None = None) -> bool:
  """Whether a forward over `seq_len` tokens runs the kernel: `impl` 'splash' wherever the length fits; 'auto' (the
  default) when compiling for TPU and the key/value heads also split over the mesh's tensor axis. `platform`:
  the target's, else the mesh's devices' (fmjax.train.aot passes the slice's)."""
  if impl == "splash":
    return fits(seq_len)
  return (impl == "auto" and (platform or target_platform()) == "tpu" and fits(seq_len)
          and kv_heads % _kv_head_ways() == 0)


def _kv_head_ways() -> int:
  """Devices the key/value heads split over under the current mesh (the logical 'act_kv_heads' axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes(("act_kv_heads",))[0]
  axes = axes if isinstance(axes, tuple) else (axes,) if axes else ()
  return math.prod(mesh.shape[a] for a in axes)


def _kernel(heads: int, seq_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b = block_size(seq_len)
  # one fused backward kernel: dq, dk and dv from a single pass over the tiles (5 tile matmuls, not the 7 of
  # separate dq and dkv kernels, which each recompute the scores)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
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
  interpret = target_platform() != "tpu"
  q = jnp.swapaxes(q_BxTxNxH * (1.0 / math.sqrt(H)), 1, 2)  # the kernel takes no scale: fold it into q
  k, v = jnp.swapaxes(k_BxTxKxH, 1, 2), jnp.swapaxes(v_BxTxKxH, 1, 2)
  segments = segment_ids_BxT.astype(jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  run = functools.partial(_local, interpret=interpret)
  if not mesh.empty:
    heads = nn.logical_to_mesh_axes(("act_batch", "act_heads", "act_len", None))
    kv_heads = nn.logical_to_mesh_axes(("act_batch", "act_kv_heads", "act_len", None))
    seg = nn.logical_to_mesh_axes(("act_batch", "act_len"))
    ways = _kv_head_ways()
    if k.shape[1] % ways:
      raise UserError(f"model.attention_impl='splash' shards key/value heads over the tensor axis: "
                      f"model.num_kv_heads={k.shape[1]} must be a multiple of its {ways} devices; lower mesh.tensor "
                      "or use model.attention_impl=xla.")
    run = jax.shard_map(run, in_specs=(heads, kv_heads, kv_heads, seg), out_specs=heads, check_vma=False)
  out = run(q, k, v, segments)
  return jnp.swapaxes(out, 1, 2).astype(q_BxTxNxH.dtype)


def kernel_cost(seq_len: int, head_dim: int, itemsize: int) -> dict[str, tuple[float, float]]:
  """Analytic work of the kernels for ONE query head of ONE sequence: {'forward' | 'backward': (FLOPs, HBM bytes)}.

  Counts the tiles the causal mask keeps (each computed in full, the diagonal ones included), 2·b²·head_dim FLOPs per
  tile matmul: the forward does 2 (QKᵀ, PV), the fused backward 5 (QKᵀ again, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q, dS·K). Bytes: the
  operands streamed per kept tile (K and V forward; Q and dO backward, which also writes one partial dQ per key
  block) and those read or written once per head (Q and O forward; K, V, dK, dV backward) plus the float32
  log-sum-exp. Grouped-query heads stream their key/value head's tiles anew. Compilers' cost models count a Pallas
  call as almost free, so a projected step time adds this (fmjax.train.aot)."""
  b = block_size(seq_len)
  n = seq_len // b
  tiles = n * (n + 1) // 2
  tile_matmul = 2.0 * b * b * head_dim
  block = b * head_dim * itemsize
  forward = (2 * tile_matmul * tiles, 2 * tiles * block + 2 * seq_len * head_dim * itemsize + 4 * seq_len)
  backward = (5 * tile_matmul * tiles,
              2 * tiles * block + n * seq_len * head_dim * itemsize + 4 * seq_len * head_dim * itemsize
              + 2 * 4 * b * tiles)
  return {"forward": forward, "backward": backward}


def target_platform() -> str:
  """The platform being compiled for: the mesh's devices (a TPU slice compiled ahead of time on a CPU host too), else
  the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.devices()[0].platform
