"""`einsum(spec, x, w)` for an activation times a weight, with both cotangents written as einsums of their own.

jax differentiates `einsum("BTD,DF->BTF", x, w)` by transposing the forward dot: the weight's cotangent comes out
as dot(dy, x) -> [F, D] followed by a transpose. XLA:CPU turns that into a weight-gradient matmul whose big operand,
dy [B·T, F], is first copied out transposed, with strided reads that cost a fifth of a CPU train step. Asking for
each cotangent directly in its own layout, dw = einsum("BTD,BTF->DF", x, dy) and dx = einsum("BTF,DF->BTD", dy,
w), leaves only the small transposes. The values are the same contractions; on TPU the projected step keeps its
memory and time.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


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
  dw = jnp.einsum(f"{xs},{out}->{ws}", x, g, preferred_element_type=w.dtype)
  return dx.astype(x.dtype), dw.astype(w.dtype)


einsum.defvjp(_fwd, _bwd)


def _check(spec: str) -> None:
  xs, ws, out = _subscripts(spec)
  for name, own, others in (("x", xs, ws + out), ("w", ws, xs + out)):
    lonely = "".join(c for c in own if c not in others)
    if lonely or "." in spec:
      raise ValueError(f"projection einsum {spec!r}: index {lonely or '...'!r} of {name} appears in neither the "
                       "other operand nor the output; use jnp.einsum for it.")
