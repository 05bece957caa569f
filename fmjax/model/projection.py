"""`einsum(spec, x, w)` for an activation times a weight, with both cotangents written as einsums of their own.

jax differentiates `einsum("BTD,DF->BTF", x, w)` by transposing the forward dot: the weight's cotangent comes out
as dot(dy, x) -> [F, D] followed by a transpose. XLA:CPU turns that into a weight-gradient matmul whose big operand,
dy [B·T, F], is first copied out transposed, with strided reads that cost a fifth of a CPU train step. Asking for
each cotangent directly in its own layout, dw = einsum("BTD,BTF->DF", x, dy) and dx = einsum("BTF,DF->BTD", dy,
w), leaves only the small transposes. The weight's cotangent is taken with the summed dims (B, T) flattened into one
first: from a [B, T, D] operand XLA:CPU still copies x out transposed, and where x is a layer scan's saved residual
(a slice of the stacked residuals) that copy runs ten times slower than a plain transpose; from [B·T, D] it
contracts the leading dim in place (the flattening is for CPU only). The values are the same contractions; on TPU
the projected step keeps its memory and time.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from fmjax.quant import Quantized


def _subscripts(spec: str) -> tuple[str, str, str]:
  ins, out = spec.replace(" ", "").split("->")
  xs, ws = ins.split(",")
  return xs, ws, out


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def einsum(spec: str, x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
  """jnp.einsum(spec, x, w, preferred_element_type=...) for a two-operand `spec` in which every index of `x` or `w`
  also appears in the other operand or in the output (a projection: no index is summed within one operand)."""
  _check(spec)
  return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)


def _fwd(spec, x, w, preferred_element_type):
  return einsum(spec, x, w, preferred_element_type), (x, w)


def _bwd(spec, preferred_element_type, residuals, g):
  x, w = residuals
  xs, ws, out = _subscripts(spec)
  dx = jnp.einsum(f"{out},{ws}->{xs}", g, w, preferred_element_type=x.dtype)
  return dx.astype(x.dtype), _weight_cotangent(xs, ws, out, x, g, w.dtype).astype(w.dtype)


def _weight_cotangent(xs: str, ws: str, out: str, x: jax.Array, g: jax.Array, dtype) -> jax.Array:
  """einsum(f"{xs},{out}->{ws}", x, g); on CPU as one 2-D matmul over the flattened summed dims where they lead both
  x and g in the same order (as B, T do in every projection here). Elsewhere the plain einsum: in the Llama-3-8B
  v5p-8 compile the flattened form moved 10% more bytes per layer."""
  plain = lambda x, g: jnp.einsum(f"{xs},{out}->{ws}", x, g, preferred_element_type=dtype)  # noqa: E731
  n = 0
  while n < min(len(xs), len(out)) and xs[n] == out[n] and xs[n] not in ws:
    n += 1
  x_rest, g_rest = xs[n:], out[n:]
  if n == 0 or any(c not in ws for c in x_rest + g_rest) or set(x_rest) & set(g_rest):
    return plain(x, g)

  def flat(x, g):
    x2 = x.reshape(math.prod(x.shape[:n]), math.prod(x.shape[n:]))
    g2 = g.reshape(x2.shape[0], math.prod(g.shape[n:]))
    dw = jnp.einsum("na,nb->ab", x2, g2, preferred_element_type=dtype).reshape(x.shape[n:] + g.shape[n:])
    return dw if x_rest + g_rest == ws else jnp.transpose(dw, [(x_rest + g_rest).index(c) for c in ws])

  return jax.lax.platform_dependent(x, g, cpu=flat, default=plain)


einsum.defvjp(_fwd, _bwd)


def apply(spec: str, x: jax.Array, w: jax.Array | Quantized, preferred_element_type=None, int8: bool = False
          ) -> jax.Array:
  """`einsum`; for a quantized frozen kernel `frozen_einsum`; with `int8`, `int8_einsum`."""
  if isinstance(w, Quantized):
    return frozen_einsum(spec, x, w, preferred_element_type)
  if int8:
    return int8_einsum(spec, x, w, preferred_element_type)
  return einsum(spec, x, w, preferred_element_type)


def int8_dot(spec: str, a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
  """einsum(spec, a, b) with both operands in int8: each scaled by its absmax over the contracted dims (per row of
  `a`, per column of `b`: a token's activations, an output channel's weights), rounded to nearest, multiplied with
  int32 accumulation and scaled back in float32."""
  as_, bs, out = _subscripts(spec)
  summed = set(as_) & set(bs)

  def quantize(v, subs):
    axes = tuple(i for i, c in enumerate(subs) if c in summed)
    v32 = v.astype(jnp.float32)
    scale = jnp.max(jnp.abs(v32), axis=axes, keepdims=True) / 127.0
    q = jnp.round(v32 / jnp.where(scale > 0, scale, 1.0)).astype(jnp.int8)
    return q, jnp.squeeze(scale, axes), "".join(c for c in subs if c not in summed)

  qa, sa, fa = quantize(a, as_)
  qb, sb, fb = quantize(b, bs)
  acc = jnp.einsum(spec, qa, qb, preferred_element_type=jnp.int32).astype(jnp.float32)
  return (acc * jnp.einsum(f"{fa},{fb}->{out}", sa, sb)).astype(out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def int8_einsum(spec: str, x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
  """A trained projection with its three matmuls in int8 (`int8_dot`): the output, x's cotangent g·wᵀ and w's
  xᵀ·g, each operand quantized per slice over that matmul's contracted dims; gradients pass the rounding straight
  through."""
  _check(spec)
  return int8_dot(spec, x, w, preferred_element_type or x.dtype)


def _int8_fwd(spec, x, w, preferred_element_type):
  return int8_einsum(spec, x, w, preferred_element_type), (x, w)


def _int8_bwd(spec, preferred_element_type, residuals, g):
  x, w = residuals
  xs, ws, out = _subscripts(spec)
  return (int8_dot(f"{out},{ws}->{xs}", g, w, x.dtype), int8_dot(f"{xs},{out}->{ws}", x, g, w.dtype))


int8_einsum.defvjp(_int8_fwd, _int8_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def frozen_einsum(spec: str, x: jax.Array, w: Quantized, preferred_element_type=None) -> jax.Array:
  """einsum(spec, x, w.kernel()) for a frozen quantized kernel, in x's dtype. The backward pass keeps the packed
  kernel and dequantizes it again for x's cotangent, so no layer's full-precision kernel outlives its use (a saved
  residual would hold the whole base in the compute dtype); the kernel itself gets no gradient."""
  _check(spec)
  return jnp.einsum(spec, x, w.kernel(x.dtype), preferred_element_type=preferred_element_type)


def _frozen_fwd(spec, x, w, preferred_element_type):
  return frozen_einsum(spec, x, w, preferred_element_type), (x, w)


def _frozen_bwd(spec, preferred_element_type, residuals, g):
  x, w = residuals
  xs, ws, out = _subscripts(spec)
  dx = jnp.einsum(f"{out},{ws}->{xs}", g, w.kernel(x.dtype), preferred_element_type=x.dtype)
  zero = jax.tree.map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0 if jnp.issubdtype(a.dtype, jnp.integer)
                                           else a.dtype), w)
  return dx.astype(x.dtype), zero


frozen_einsum.defvjp(_frozen_fwd, _frozen_bwd)


def _check(spec: str) -> None:
  xs, ws, out = _subscripts(spec)
  for name, own, others in (("x", xs, ws + out), ("w", ws, xs + out)):
    lonely = "".join(c for c in own if c not in others)
    if lonely or "." in spec:
      raise ValueError(f"projection einsum {spec!r}: index {lonely or '...'!r} of {name} appears in neither the "
                       "other operand nor the output; use jnp.einsum for it.")
