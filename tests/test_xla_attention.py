"""fmjax.model.xla_attention: the CPU path's causal query blocks give full attention's values and gradients (float64
NumPy reference) with packed segments and grouped-query heads, and really skip the masked blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.model import layers, xla_attention

B, T, N, K, H = 2, xla_attention.MIN_BLOCKED_LEN, 4, 2, 8


def packed_segments() -> np.ndarray:
  """Row 0: one sequence; row 1: three packed sequences whose borders fall inside query blocks."""
  seg = np.ones((B, T), np.int32)
  seg[1, 50:170], seg[1, 170:] = 2, 3
  return seg


def reference(q, k, v, g, mask):
  """Output and (dq, dk, dv) of masked softmax attention for the cotangent g, by hand in float64."""
  G = N // K
  kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # query head n reads key/value head n // G
  s = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(H)
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bnts,bsnh->btnh", p, vv)
  dp = np.einsum("btnh,bsnh->bnts", g, vv)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(H)
  dq = np.einsum("bnts,bsnh->btnh", ds, kk)
  dk = np.einsum("bnts,btnh->bsnh", ds, q).reshape(B, T, K, G, H).sum(3)
  dv = np.einsum("bnts,btnh->bsnh", p, g).reshape(B, T, K, G, H).sum(3)
  return out, (dq, dk, dv)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  q, g = rng.standard_normal((2, B, T, N, H))
  k, v = rng.standard_normal((2, B, T, K, H))
  return q, k, v, g, np.asarray(layers.attention_mask(jnp.asarray(packed_segments())))


def test_causal_blocks_match_full_attention_in_float64(inputs):
  q, k, v, g, mask = inputs
  f = lambda q, k, v: xla_attention.attention(q, k, v, mask, causal=True)  # noqa: E731
  out, vjp = jax.vjp(f, *(jnp.float32(a) for a in (q, k, v)))
  grads = vjp(jnp.float32(g))
  out_ref, grads_ref = reference(q, k, v, g, mask)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, grads_ref):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_skips_the_key_blocks_after_each_query_block(inputs):
  q, k, v, _, mask = inputs
  c = T // xla_attention.QUERY_BLOCKS

  def scores(causal):
    """(which [.., c, (i+1)·c] block scores the compiled function holds, whether it holds [.., T, T] ones)."""
    hlo = jax.jit(lambda q, k, v: xla_attention.attention(q, k, v, mask, causal)).lower(
        *(jnp.float32(a) for a in (q, k, v))).compile().as_text()
    return [f",{c},{(i + 1) * c}]" in hlo for i in range(xla_attention.QUERY_BLOCKS)], f",{T},{T}]" in hlo

  blocks, full = scores(causal=True)
  assert all(blocks) and not full
  blocks, full = scores(causal=False)
  assert full and not any(blocks[:-1])
