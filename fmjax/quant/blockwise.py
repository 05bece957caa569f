"""Quantize and dequantize a weight matrix viewed as [..., I, O] (I: its input dims flattened, O: its outputs), as
bitsandbytes does for the torch weight [O, I] of the same layer:

  nf4    4-bit NormalFloat codes in blocks of `blocksize` consecutive inputs of one output, each block scaled by its
         absmax (float32); code = how many midpoints between neighbouring NF4 values w · (1/absmax) exceeds (the
         nearest value, a tie to the lower); two codes per byte,
         the even input in the high nibble. Dequantized: NF4[code] · absmax in float32.
  double the NF4 block scales stored again as 8 bits (QLoRA's double quantisation): their mean is taken out, and
         blocks of 256 (in bitsandbytes' order of the [O, I/blocksize] scales) are coded on the signed dynamic map
         with a float32 absmax each.
  int8   per output channel (LLM.int8's vector-wise): absmax over the inputs, code = round-half-even(w · 127 ·
         (1/absmax));
         dequantized: code · absmax · (1/127).
All arithmetic is float32 whatever the weight's dtype, as bitsandbytes computes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.quant import codes

DOUBLE_BLOCK = 256  # scales per second-level block (bitsandbytes' nested blocksize)
INV127 = 7.874015718698502e-3  # 1/127 as bitsandbytes writes it (float32 once cast)


def _barrier(scale: jax.Array) -> jax.Array:
  """A reciprocal scale kept as computed: XLA would fold x · (127/a) into (x · 127)/a, which rounds differently."""
  return jax.lax.optimization_barrier(scale)


def nearest(x: jax.Array, book: jax.Array) -> jax.Array:
  """Index of the value of the sorted code book `book` nearest to each of `x`, ties to the lower index (argmin's
  first): the two neighbours found by search, then compared exactly."""
  hi = jnp.clip(jnp.searchsorted(book, x, side="left"), 1, book.shape[0] - 1)
  lo = hi - 1
  return jnp.where(jnp.abs(x - book[hi]) < jnp.abs(x - book[lo]), hi, lo)


def _blocks(w: jax.Array, blocksize: int) -> jax.Array:
  """[..., I, O] float32 -> [..., I/blocksize, blocksize, O]."""
  *lead, i, o = w.shape
  return w.astype(jnp.float32).reshape(*lead, i // blocksize, blocksize, o)


def nf4_quantize(w: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
  """(packed codes uint8 [..., I/2, O], absmax float32 [..., I/blocksize, O]) of `w` [..., I, O]."""
  x = _blocks(w, blocksize)
  absmax = jnp.max(jnp.abs(x), axis=-2)
  # an all-zero block has absmax 0: its values code as the exact zero (x · 0, not x · inf)
  inv = _barrier(jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0))
  c = jnp.searchsorted(jnp.asarray(codes.NF4_MIDPOINTS), x * inv[..., None, :], side="left")
  c = c.astype(jnp.uint8).reshape(w.shape)
  return (c[..., 0::2, :] << 4) | c[..., 1::2, :], absmax


def nf4_unpack(packed: jax.Array) -> jax.Array:
  """uint8 [..., I/2, O] -> the codes [..., I, O] (int32)."""
  hi, lo = (packed >> 4).astype(jnp.int32), (packed & 15).astype(jnp.int32)
  return jnp.stack([hi, lo], axis=-2).reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])


def nf4_dequantize(packed: jax.Array, absmax: jax.Array, dtype) -> jax.Array:
  """[..., I, O] in `dtype` from `nf4_quantize`'s pair (absmax float32)."""
  c = nf4_unpack(packed)
  *lead, i, o = c.shape
  blocks = i // absmax.shape[-2]
  values = jnp.asarray(codes.NF4)[c].reshape(*lead, absmax.shape[-2], blocks, o) * absmax[..., None, :]
  return values.reshape(c.shape).astype(dtype)


def _nested_index(shape: tuple[int, ...]) -> jax.Array:
  """The second-level block of each scale of a [..., n, O] scale array: bitsandbytes orders them [O, n]."""
  n, o = shape[-2:]
  position = jnp.arange(o)[None, :] * n + jnp.arange(n)[:, None]  # its index in the [O, n] order
  return position // DOUBLE_BLOCK


def blockwise8_quantize(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(codes uint8 [n], absmax float32 [ceil(n/256)]) of a float32 vector in blocks of 256 on the dynamic map; a
  short last block as bitsandbytes' (its absmax over its own values)."""
  n = v.shape[0]
  pad = -n % DOUBLE_BLOCK
  x = jnp.pad(v.astype(jnp.float32), (0, pad)).reshape(-1, DOUBLE_BLOCK)
  absmax = jnp.max(jnp.abs(x), axis=-1)
  scaled = jnp.clip(x * _barrier(1.0 / absmax)[:, None], -1.0, 1.0)
  return nearest(scaled, jnp.asarray(codes.dynamic8())).astype(jnp.uint8).reshape(-1)[:n], absmax


def double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """NF4 block scales [..., n, O] -> (codes uint8 [..., n, O], second-level absmax [..., blocks], offset [...]):
  each [n, O] slice on its own (one layer's kernel: one bitsandbytes tensor)."""

  def one(a):
    offset = jnp.mean(a)
    flat = (a - offset).T.reshape(-1)  # bitsandbytes' [O, n] order
    q, absmax2 = blockwise8_quantize(flat)
    return q.reshape(a.shape[::-1]).T, absmax2, offset

  fn = one
  for _ in absmax.shape[:-2]:
    fn = jax.vmap(fn)
  return fn(absmax)


def double_dequantize(q: jax.Array, absmax2: jax.Array, offset: jax.Array) -> jax.Array:
  """The NF4 block scales [..., n, O] float32 from `double_quantize`'s triple."""
  index = _nested_index(q.shape)
  scale2 = jnp.take(absmax2, index, axis=-1)  # [..., n, O]
  return jnp.asarray(codes.dynamic8())[q.astype(jnp.int32)] * scale2 + offset[..., None, None]


def int8_quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(codes int8 [..., I, O], absmax float32 [..., O]) of `w` [..., I, O]."""
  x = w.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x), axis=-2)
  # 127 · (1/absmax), two roundings: torch evaluates bitsandbytes' `127.0 / absmax` as a reciprocal times 127
  scale = _barrier(jnp.where(absmax > 0, 127.0 * _barrier(1.0 / jnp.where(absmax > 0, absmax, 1.0)), 0.0))
  return jnp.round(x * scale[..., None, :]).astype(jnp.int8), absmax


def int8_dequantize(q: jax.Array, absmax: jax.Array, dtype) -> jax.Array:
  return (q.astype(jnp.float32) * absmax[..., None, :] * jnp.float32(INV127)).astype(dtype)
