"""Splash attention (jax's Pallas TPU kernel, run here in interpret mode) gives the XLA path's loss and gradients
with packed segments and grouped-query attention, on one device and sharded over 8 (batch and heads)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import sharding
from fmjax.errors import UserError
from fmjax.model import splash
from fmjax.model.config import ModelConfig
from fmjax.model.transformer import Transformer

pytestmark = pytest.mark.slow
T = 128


def packed_batch(batch: int, vocab: int, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Tokens, segment ids (3 documents a row, then padding as segment 0) and positions restarting per document."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (batch, T))
  segments, positions = np.zeros((batch, T), np.int32), np.zeros((batch, T), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(8, T - 8), 3, replace=False))
    start = 0
    for n, end in enumerate(cuts, start=1):
      segments[b, start:end], positions[b, start:end] = n, np.arange(end - start)
      start = end
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(segments), jnp.asarray(positions)


def loss_and_grads(cfg: ModelConfig, params, batch, mesh=None):
  model = Transformer(cfg)
  tokens, segments, positions = batch

  def loss(p):
    logits = model.apply({"params": p}, tokens, segments, positions).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    weight = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    return (nll * weight).sum() / weight.sum()

  f = jax.jit(jax.value_and_grad(loss))
  if mesh is None:
    return f(params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    return f(params)


@pytest.fixture(scope="module")
def setup():
  cfg = ModelConfig(num_heads=8, num_kv_heads=2, head_dim=16, d_model=64, num_layers=2)
  batch = packed_batch(8, cfg.vocab_size)
  params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), *batch)["params"])
  return cfg, params, batch, loss_and_grads(cfg, params, batch)  # the float32 XLA reference, computed once


def relative(a, b) -> float:
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def test_splash_matches_xla_in_float32_with_packing_and_gqa(setup):
  cfg, params, batch, (ref_loss, ref_grads) = setup
  loss, grads = loss_and_grads(dataclasses.replace(cfg, attention_impl="splash"), params, batch)
  assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
  errors = jax.tree.map(relative, grads, ref_grads)
  assert max(jax.tree.leaves(errors)) <= 1e-5, errors
  assert float(jnp.abs(ref_grads["layers"]["attn"]["q_kernel"]).max()) > 0  # attention gets a gradient at all


def test_splash_sharded_over_batch_and_heads_matches_one_device(setup):
  cfg, params, batch, (ref_loss, ref_grads) = setup
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 1, 1, 2, 1), sharding.MESH_AXES)  # batch 4, heads 2
  loss, grads = loss_and_grads(dataclasses.replace(cfg, attention_impl="splash"), params, batch, mesh)
  assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
  assert max(jax.tree.leaves(jax.tree.map(relative, grads, ref_grads))) <= 1e-5


def test_splash_in_bfloat16_is_within_bfloat16_tolerance(setup):
  cfg, params, batch, (ref_loss, ref_grads) = setup  # float32 truth
  bf16 = dataclasses.replace(cfg, dtype="bfloat16")
  xla_loss, xla_grads = loss_and_grads(bf16, params, batch)
  loss, grads = loss_and_grads(dataclasses.replace(bf16, attention_impl="splash"), params, batch)
  assert abs(float(loss) - float(ref_loss)) <= 2e-2 * abs(float(ref_loss))
  for got, xla, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(xla_grads), jax.tree.leaves(ref_grads)):
    assert relative(got, ref) <= max(2 * relative(xla, ref), 2e-2)  # no worse than bf16 XLA attention


def test_splash_needs_a_sequence_of_whole_tiles():
  assert [splash.block_size(n) for n in (128, 256, 384, 640, 1024, 8192)] == [128, 256, 128, 128, 512, 512]
  with pytest.raises(UserError, match=r"needs train.seq_len a multiple of 128 \(got 100\)"):
    splash.block_size(100)
