"""The fused, chunked unembedding + softmax (`model.loss_chunk`): its statistics against float64 closed forms, and
the loss heads' values and gradients through the training context against the materialised-logits path, with
packed segments, GQA, padding of a ragged last chunk, a mesh, bfloat16 and a LoRA on the unembedding."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax

from fmjax import config_lib, objectives, sharding
from fmjax.adapters.lora import LoraConfig
from fmjax.model import token_stats
from fmjax.model.config import ModelConfig
from fmjax.model.transformer import Transformer, init_params
from fmjax.train import frozen as frozen_lib

T = 24  # with loss_chunk 16 the last chunk is ragged (padded)
CFG = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


def packed(batch: int, seed: int) -> dict[str, jnp.ndarray]:
  """A text batch: 2 documents a row then padding, targets the next token within a document, mask on them."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (batch, T)).astype(np.int32)
  seg, pos = np.zeros((batch, T), np.int32), np.zeros((batch, T), np.int32)
  for b in range(batch):
    cut, end = int(rng.integers(6, 12)), int(rng.integers(16, T - 2))
    seg[b, :cut], seg[b, cut:end] = 1, 2
    pos[b, :cut], pos[b, cut:end] = np.arange(cut), np.arange(end - cut)
  targets = np.roll(tokens, -1, axis=1)
  mask = ((np.roll(seg, -1, axis=1) == seg) & (seg > 0)).astype(np.float32)
  mask[:, -1] = 0
  return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask),
          "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}


def objective(name: str, **kw):
  return config_lib.use_head(config_lib.base(), name, **kw)


def head_value_and_grads(cfg: ModelConfig, head, params, batch, reference=None, mesh=None):
  """(loss/weight, metrics/weight, grads) of `head` through frozen.make_context, the context training uses."""
  model = Transformer(cfg)
  specs = tuple(s for s in head.frozen if s.source == "policy")
  plan = frozen_lib.Plan(specs, {}, {s.role: reference for s in specs}, {})
  frozen = {s.role: reference for s in specs}

  def f(p):
    s, w, m = head.loss(p, batch, frozen_lib.make_context(model, plan)(None, frozen))
    return s / w, {k: v / w for k, v in m.items()}

  g = jax.jit(jax.value_and_grad(f, has_aux=True))
  if mesh is None:
    return g(params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    return g(params)


def relative(a, b) -> float:
  return float(jnp.abs(a - b).max() / max(float(jnp.abs(b).max()), 1e-30))


def assert_same(got, want, tol=1e-5):
  (loss, metrics), grads = got
  (ref_loss, ref_metrics), ref_grads = want
  assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss))
  for k in ref_metrics:
    assert abs(float(metrics[k]) - float(ref_metrics[k])) <= tol * max(abs(float(ref_metrics[k])), 1.0), k
  errors = jax.tree.map(relative, grads, ref_grads)
  assert max(jax.tree.leaves(errors)) <= tol, errors
  assert float(jnp.abs(ref_grads["unembed"]).max()) > 0


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


def test_statistics_match_float64_closed_forms():
  rng = np.random.default_rng(1)
  logits, targets = rng.normal(0, 3, (2, 5, 40)).astype(np.float32), rng.integers(0, 40, (2, 5))
  for temperature in (1.0, 0.7):
    s = token_stats.from_logits(jnp.asarray(logits), jnp.asarray(targets), temperature, extra=token_stats.EXTRA)
    z = logits.astype(np.float64) / temperature
    logp = log_softmax(z, axis=-1)
    ulp = 4 * np.finfo(np.float32).eps * np.abs(z).max()  # z - logz in float32 is exact to a few ulps of |z|
    np.testing.assert_allclose(s.logp, np.take_along_axis(logp, targets[..., None], -1)[..., 0], rtol=0, atol=ulp)
    np.testing.assert_allclose(s.logz, np.log(np.exp(z).sum(-1)), rtol=1e-6)
    np.testing.assert_allclose(s.entropy, -(np.exp(logp) * logp).sum(-1), rtol=0, atol=ulp)
    np.testing.assert_array_equal(s.argmax, logits.argmax(-1))


def test_only_the_statistics_asked_for_are_computed():
  logits, targets = jnp.zeros((1, 3, 8)), jnp.zeros((1, 3), jnp.int32)
  plain = token_stats.from_logits(logits, targets)
  assert plain.argmax is None and plain.entropy is None and plain.logp.shape == (1, 3)
  chunked = token_stats.unembed_stats(jnp.ones((1, 5, 4)), jnp.ones((4, 8)), jnp.zeros((1, 5), jnp.int32), 2,
                                      jnp.float32, extra=("entropy",))
  assert chunked.argmax is None and chunked.entropy.shape == (1, 5)
  np.testing.assert_allclose(chunked.entropy, np.log(8), rtol=1e-6)  # equal logits: the uniform distribution
  with pytest.raises(ValueError, match="perplexity"):
    token_stats.from_logits(logits, targets, extra=("perplexity",))


@pytest.mark.parametrize("chunk", [4, 7])  # 7: the last chunk is padded
def test_chunked_unembedding_has_the_values_and_vjp_of_the_full_one(chunk):
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.normal(size=(3, T, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 50)) * 0.3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (3, T)))
  cot = token_stats.TokenStats(*(jnp.asarray(rng.normal(size=(3, T)), jnp.float32) for _ in range(2)),
                               np.zeros((3, T), jax.dtypes.float0), jnp.asarray(rng.normal(size=(3, T)), jnp.float32))
  everything = token_stats.EXTRA
  full = lambda h, w: token_stats.unembed_stats(h, w, targets, 0, jnp.float32, 0.8, everything)  # noqa: E731
  chunked = lambda h, w: token_stats.unembed_stats(h, w, targets, chunk, jnp.float32, 0.8, everything)  # noqa: E731
  (want, want_vjp), (got, got_vjp) = jax.vjp(full, h, w), jax.vjp(chunked, h, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  for a, b in zip(got_vjp(cot), want_vjp(cot)):
    assert relative(a, b) <= 1e-5


@pytest.mark.parametrize("name,kw", [("lm", {"z_loss": 1e-3}), ("sft", {}), ("grpo", {"temperature": 0.7, "kl_coef": 0.05})])
def test_heads_match_the_materialised_logits_path_in_float32(params, name, kw):
  head = objectives.get(objective(name, **kw))
  batch = packed(4, 3)
  if name == "sft":  # half the targets are the model's greedy tokens, so accuracy is neither 0 nor 1
    greedy = Transformer(CFG).apply({"params": params}, batch["tokens"], batch["segment_ids"],
                                    batch["positions"]).argmax(-1)
    batch["targets"] = jnp.where(jnp.arange(T) % 2 == 0, greedy, batch["targets"])
  if name == "grpo":
    batch["advantages"] = jnp.asarray(np.random.default_rng(4).normal(size=(4, T)), jnp.float32)
  reference = jax.tree.map(lambda x: x * 0.9, params) if head.frozen else None
  want = head_value_and_grads(CFG, head, params, batch, reference)
  got = head_value_and_grads(dataclasses.replace(CFG, loss_chunk=16), head, params, batch, reference)
  assert_same(got, want)
  if name == "sft":
    assert 0.2 < float(want[0][1]["accuracy"]) < 0.8


def test_dpo_with_a_reference_matches_the_materialised_logits_path(params):
  head = objectives.get(objective("dpo", beta=0.5))
  a, b = packed(3, 5), packed(3, 6)
  batch = {**{"chosen_" + k: v for k, v in a.items()}, **{"rejected_" + k: v for k, v in b.items()}}
  reference = jax.tree.map(lambda x: x * 1.1, params)
  want = head_value_and_grads(CFG, head, params, batch, reference)
  assert_same(head_value_and_grads(dataclasses.replace(CFG, loss_chunk=8), head, params, batch, reference), want)


@pytest.mark.slow
def test_chunked_loss_sharded_over_batch_and_vocabulary_matches_one_device(params):
  head = objectives.get(objective("lm"))
  batch = packed(8, 7)
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 1, 1, 2, 1), sharding.MESH_AXES)  # batch 4, vocab 2
  want = head_value_and_grads(CFG, head, params, batch)
  assert_same(head_value_and_grads(dataclasses.replace(CFG, loss_chunk=16), head, params, batch, mesh=mesh), want)


def test_chunked_loss_in_bfloat16_is_within_bfloat16_tolerance(params):
  head = objectives.get(objective("lm"))
  batch = packed(4, 8)
  (truth, _), truth_grads = head_value_and_grads(CFG, head, params, batch)
  bf16 = dataclasses.replace(CFG, dtype="bfloat16")
  (_, _), full_grads = head_value_and_grads(bf16, head, params, batch)
  (loss, _), grads = head_value_and_grads(dataclasses.replace(bf16, loss_chunk=16), head, params, batch)
  assert abs(float(loss) - float(truth)) <= 1e-2 * float(truth)
  for got, full, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads), jax.tree.leaves(truth_grads)):
    assert relative(got, ref) <= max(2 * relative(full, ref), 2e-2)  # no worse than bf16 with full logits


def test_a_lora_on_the_unembedding_still_trains_under_loss_chunk(params):
  lora = LoraConfig(rank=2, alpha=4.0, targets="unembed")
  full_params = init_params(CFG, jax.random.PRNGKey(1), adapter=lora)
  full_params["unembed_lora_b"] = jax.random.normal(jax.random.PRNGKey(2), full_params["unembed_lora_b"].shape)
  trained = {"unembed_lora_a": full_params["unembed_lora_a"], "unembed_lora_b": full_params["unembed_lora_b"]}
  base = {k: v for k, v in full_params.items() if k not in trained}
  model = Transformer(dataclasses.replace(CFG, loss_chunk=16), lora)
  ctx = frozen_lib.make_context(model, frozen_lib.Plan((), {}, {}, {}))(base, {})
  batch = packed(2, 9)
  stats = ctx.token_stats(trained, batch)
  want = token_stats.from_logits(ctx.apply(trained, batch), batch["targets"])
  np.testing.assert_allclose(stats.logp, want.logp, rtol=1e-6)
  plain = token_stats.from_logits(Transformer(CFG).apply({"params": base}, batch["tokens"], batch["segment_ids"],
                                                         batch["positions"]), batch["targets"])
  assert float(jnp.abs(stats.logp - plain.logp).max()) > 1e-3  # the LoRA update is in it
  grads = jax.grad(lambda p: -jnp.sum(ctx.token_stats(p, batch).logp))(trained)
  assert float(jnp.abs(grads["unembed_lora_b"]).max()) > 0


def test_chunked_loss_never_holds_the_full_logits():
  cfg = ModelConfig(vocab_size=32_768, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64)
  B, L = 2, 512
  logits_bytes = B * L * cfg.vocab_size * 4
  head = objectives.get(objective("lm"))
  batch = {k: jax.ShapeDtypeStruct((B, L), jnp.float32 if k == "loss_mask" else jnp.int32)
           for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))

  def temp_bytes(chunk: int) -> int:
    model = Transformer(dataclasses.replace(cfg, loss_chunk=chunk))
    ctx = frozen_lib.make_context(model, frozen_lib.Plan((), {}, {}, {}))(None, {})
    grad = jax.jit(jax.grad(lambda p, b: head.loss(p, b, ctx)[0]))
    return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

  full, small, large = temp_bytes(0), temp_bytes(32), temp_bytes(128)
  assert full >= logits_bytes  # the reference path does hold [B,T,V] float32
  assert small < logits_bytes / 2, (small, full)
  assert small < large < full  # what is held scales with the chunk, not the sequence
