"""fmjax.model.projection.einsum: jnp.einsum's value and cotangents (float64 references), and the CPU layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.model import projection

SPECS = {  # every projection the decoder makes: (spec, x shape, w shape)
    "mlp_in": ("BTD,DF->BTF", (2, 5, 8), (8, 12)),
    "mlp_out": ("BTF,FD->BTD", (2, 5, 12), (12, 8)),
    "q": ("BTD,DNH->BTNH", (2, 5, 8), (8, 4, 3)),
    "o": ("BTNH,NHD->BTD", (2, 5, 4, 3), (4, 3, 8)),
    "w_stored_out_in": ("BTD,FD->BTF", (2, 5, 8), (12, 8)),  # the flattened weight cotangent is permuted back
    "summed_dims_not_leading": ("TBD,DF->BTF", (5, 2, 8), (8, 12)),  # the plain einsum
    "dim_shared_by_all": ("BND,NDF->BNF", (2, 4, 8), (4, 8, 12)),  # the plain einsum
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_value_and_cotangents_match_jax_autodiff_in_float64(name):
  spec, xshape, wshape = SPECS[name]
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal(xshape), rng.standard_normal(wshape)
  y = np.einsum(spec, x, w)
  g = rng.standard_normal(y.shape)
  with jax.enable_x64(True):  # the reference: jax's own transpose rule for jnp.einsum, in float64
    dx_ref, dw_ref = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), jnp.float64(x), jnp.float64(w))[1](jnp.float64(g))
  y32, vjp = jax.vjp(lambda a, b: projection.einsum(spec, a, b), jnp.float32(x), jnp.float32(w))
  dx, dw = vjp(jnp.float32(g))
  np.testing.assert_allclose(y32, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_cotangent_dtypes_follow_the_operands():
  x = jnp.ones((2, 3, 4), jnp.bfloat16)
  w = jnp.ones((4, 6), jnp.float32)
  y, vjp = jax.vjp(lambda a, b: projection.einsum("BTD,DF->BTF", a, b.astype(a.dtype), jnp.float32), x, w)
  dx, dw = vjp(jnp.ones_like(y))
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
  np.testing.assert_array_equal(dw, np.full((4, 6), 6.0))  # each weight sees the 2*3 positions


def test_an_index_summed_within_one_operand_is_refused():
  with pytest.raises(ValueError, match="index 'K' of x"):
    projection.einsum("BTK,DF->BTF", jnp.ones((2, 3, 4)), jnp.ones((5, 6)))


def test_cpu_weight_gradient_copies_no_operand_transposed():
  """The point of the module: on XLA:CPU the weight gradient of x [B, T, D] -> [B, T, F] is one matmul over the
  flattened B·T that copies neither operand out transposed, also where x is a layer scan's saved residual; jax's own
  transpose rule leads XLA to copy the F-wide cotangent out as [F, B·T]."""
  B, T, D, F, L = 4, 64, 16, 48, 3
  w = jnp.ones((D, F))

  def weight_grad(einsum):
    return lambda x, g: jax.vjp(lambda b: einsum("BTD,DF->BTF", x, b), w)[1](g)[0]

  def in_scan(einsum):
    return lambda xs, gs: jax.lax.scan(lambda c, xg: (c, weight_grad(einsum)(*xg)), 0.0, (xs, gs))[1]

  x, g = jnp.ones((B, T, D)), jnp.ones((B, T, F))
  xs, gs = jnp.ones((L, B, T, D)), jnp.ones((L, B, T, F))
  hlo = lambda f, *a: jax.jit(f).lower(*a).compile().as_text()  # noqa: E731
  plain = hlo(weight_grad(lambda s, a, b: jnp.einsum(s, a, b)), x, g)
  assert f"f32[{F},{B * T}]" in plain  # the layout this module exists to avoid (if XLA stops making it, it can go)
  for ours in (hlo(weight_grad(projection.einsum), x, g), hlo(in_scan(projection.einsum), xs, gs)):
    for transposed in (f"f32[{F},{B * T}]", f"f32[{D},{B * T}]", f"f32[{F},{B},{T}]", f"f32[{D},{B},{T}]"):
      assert transposed not in ours
