"""Model properties that would break on a bug: causality, segment isolation, RoPE, GQA, scan, remat."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.model import ModelConfig, Transformer, init_params, layers

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                  init_std=0.2)
B, T = 2, 16


def init(cfg=CFG, seed=0):
  return init_params(cfg, jax.random.PRNGKey(seed))


def logits(params, tokens, segs=None, pos=None, cfg=CFG):
  segs = jnp.ones_like(tokens) if segs is None else segs
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if pos is None else pos
  return np.asarray(Transformer(cfg).apply({"params": params}, tokens, segs, pos))


@pytest.fixture(scope="module")
def params():
  return init()


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, CFG.vocab_size)


def test_causal_future_tokens_do_not_change_past_logits(params, tokens):
  t = 7
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 5) % CFG.vocab_size)
  a, b = logits(params, tokens), logits(params, changed)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
  assert np.abs(a[:, t + 1:] - b[:, t + 1:]).max() > 1e-3  # the change is visible where it should be


def test_no_attention_across_segments(params, tokens):
  half = T // 2
  segs = jnp.concatenate([jnp.ones((B, half), jnp.int32), 2 * jnp.ones((B, half), jnp.int32)], axis=1)
  pos = jnp.concatenate([jnp.arange(half), jnp.arange(half)])[None].repeat(B, 0)
  packed = logits(params, tokens, segs, pos)
  other_first = tokens.at[:, :half].set((tokens[:, :half] + 11) % CFG.vocab_size)
  np.testing.assert_allclose(logits(params, other_first, segs, pos)[:, half:], packed[:, half:], atol=1e-6)
  alone = logits(params, tokens[:, half:])  # the second document as its own sequence
  np.testing.assert_allclose(packed[:, half:], alone, atol=1e-5)


def test_rope_depends_only_on_relative_position(params, tokens):
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  np.testing.assert_allclose(logits(params, tokens, pos=pos + 13), logits(params, tokens, pos=pos), atol=2e-5)
  q = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.PRNGKey(3), (1, 1, 1, 8))

  def score(m, n):
    sq, cq = layers.rope_tables(jnp.array([[m]]), CFG)
    sk, ck = layers.rope_tables(jnp.array([[n]]), CFG)
    return float(jnp.sum(layers.apply_rope(q, sq, cq) * layers.apply_rope(k, sk, ck)))

  assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-5)
  assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_llama3_rope_scaling_matches_float64_reference():
  cfg = ModelConfig(head_dim=128, rope_theta=500_000.0, rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_len=8192)
  base = 1.0 / (500_000.0 ** (np.arange(0, 128, 2, dtype=np.float64) / 128))
  expected = []
  for f in base:  # the published Llama-3.1 rule, one frequency at a time
    wavelen = 2 * math.pi / f
    if wavelen < 8192 / 4.0:
      expected.append(f)
    elif wavelen > 8192 / 1.0:
      expected.append(f / 8.0)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      expected.append((1 - smooth) * f / 8.0 + smooth * f)
  got = np.asarray(layers.rope_inv_freq(cfg), np.float64)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert not np.allclose(got, base)  # scaling is active


def test_gqa_equals_full_attention_with_repeated_kv_heads(params, tokens):
  full_cfg = dataclasses.replace(CFG, num_kv_heads=CFG.num_heads)
  group = CFG.num_heads // CFG.num_kv_heads
  attn = params["layers"]["attn"]
  full = jax.tree.map(lambda x: x, params)
  full["layers"]["attn"] = dict(attn, k_kernel=jnp.repeat(attn["k_kernel"], group, axis=2),
                                v_kernel=jnp.repeat(attn["v_kernel"], group, axis=2))
  np.testing.assert_allclose(logits(full, tokens, cfg=full_cfg), logits(params, tokens), atol=1e-5)


def test_scanned_equals_unrolled(params, tokens):
  unrolled_cfg = dataclasses.replace(CFG, scan_layers=False)
  unrolled = {k: v for k, v in params.items() if k != "layers"}
  for i in range(CFG.num_layers):
    unrolled[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  assert set(init(unrolled_cfg)) == set(unrolled)
  np.testing.assert_allclose(logits(unrolled, tokens, cfg=unrolled_cfg), logits(params, tokens), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "projections", "qkv_proj"])
def test_remat_leaves_gradients_unchanged(params, tokens, policy):
  probe = jax.random.normal(jax.random.PRNGKey(4), (B, T, CFG.vocab_size))

  def grads(cfg):
    segs, pos = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(T), (B, T))
    f = lambda p: jnp.sum(Transformer(cfg).apply({"params": p}, tokens, segs, pos) * probe)  # noqa: E731
    return jax.grad(f)(params)

  ref = grads(CFG)
  got = grads(dataclasses.replace(CFG, remat=policy))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref)) > 1e-3


def test_qkv_bias_and_qk_norm_variants_run_and_differ(tokens):
  for flag in ("qkv_bias", "qk_norm"):
    cfg = dataclasses.replace(CFG, **{flag: True})
    p = init(cfg)
    assert any(flag.split("_")[-1] in k for k in p["layers"]["attn"])  # the extra params exist
    out = logits(p, tokens, cfg=cfg)
    assert np.isfinite(out).all() and out.shape == (B, T, CFG.vocab_size)


def test_tied_embeddings_share_one_matrix(tokens):
  cfg = dataclasses.replace(CFG, tie_embeddings=True)
  p = init(cfg)
  assert "unembed" not in p
  h_logits, hidden = Transformer(cfg).apply({"params": p}, tokens, jnp.ones_like(tokens),
                                             jnp.broadcast_to(jnp.arange(T), (B, T)), return_hidden=True)
  np.testing.assert_allclose(h_logits, hidden @ p["embedding"].T, rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_float32_logits_and_params(tokens):
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  p = init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  out = Transformer(cfg).apply({"params": p}, tokens, jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(T), (B, T)))
  assert out.dtype == jnp.float32
  ref = logits(p, tokens)
  # bf16 keeps 8 mantissa bits (a relative step of 2^-8 ≈ 0.4%); two layers of rounding stay within a few steps.
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 4 * 2.0**-8


@pytest.mark.parametrize("policy,saved", [
    ("full", set()), ("qkv_proj", {"q_kernel", "k_kernel", "v_kernel"}),
    ("projections", {"q_kernel", "k_kernel", "v_kernel", "o_kernel", "gate_kernel", "up_kernel"})])
def test_named_remat_policies_save_exactly_their_projections(policy, saved):
  """What the backward pass keeps from the forward pass (JAX's own account of the residuals). The down projection
  feeds only the residual sum, whose gradient needs no saved value, so "projections" has nothing to keep of it."""
  from jax._src.ad_checkpoint import saved_residuals

  cfg = dataclasses.replace(CFG, scan_layers=False, num_layers=1, remat=policy)
  segs, pos = jnp.ones((B, T), jnp.int32), jnp.broadcast_to(jnp.arange(T), (B, T))
  tok = jnp.ones((B, T), jnp.int32)
  p = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tok, segs, pos)["params"])
  residuals = saved_residuals(lambda q: Transformer(cfg).apply({"params": q}, tok, segs, pos).sum(), p)
  names = {what.split("named '")[1].split("'")[0] for _, what in residuals if "named '" in what}
  assert names == saved


def test_swiglu_matches_jax_autodiff_in_float64_and_keeps_only_its_inputs():
  """layers.swiglu's value and cotangents against jax's own autodiff of silu(gate) * up in float64, and what its
  backward pass saves: gate and up, where jax's rule for the plain expression keeps three more arrays."""
  from jax._src.ad_checkpoint import saved_residuals

  rng = np.random.default_rng(0)
  gate, up, dy = (rng.standard_normal((2, 3, 16)) * 3 for _ in range(3))
  with jax.enable_x64(True):
    y_ref, vjp_ref = jax.vjp(lambda g, u: jax.nn.silu(g) * u, jnp.float64(gate), jnp.float64(up))
    grads_ref = vjp_ref(jnp.float64(dy))
  y, vjp = jax.vjp(layers.swiglu, jnp.float32(gate), jnp.float32(up))
  for got, want in zip((y, *vjp(jnp.float32(dy))), (y_ref, *grads_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  args = (jnp.float32(gate), jnp.float32(up))
  assert len(saved_residuals(layers.swiglu, *args)) == 2
  assert len(saved_residuals(lambda g, u: jax.nn.silu(g) * u, *args)) > 2
