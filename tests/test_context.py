"""Context parallelism: the load-balancing order, the one-line errors, and context 4 × fsdp 2 against one device's
XLA attention on packed rows whose documents cross every shard boundary (XLA and splash with its fused or separate
backward kernels, GQA, chunked loss, remat, a REFT adapter)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config_lib, sharding
from fmjax.adapters import reft
from fmjax.errors import UserError
from fmjax.model import context, transformer
from fmjax.model.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
CONTEXT, FSDP, B = 4, 2, 2


@pytest.mark.parametrize("shards", [2, 4])
def test_balanced_order_round_trips_and_pairs_front_with_back_chunks(shards):
  T = 8 * shards
  index = context.original_index(T, shards)
  c = T // (2 * shards)
  for i, piece in enumerate(index.reshape(shards, 2 * c)):  # device i: chunk i, then chunk 2·shards-1-i
    want = np.r_[np.arange(i * c, (i + 1) * c), np.arange((2 * shards - 1 - i) * c, (2 * shards - i) * c)]
    np.testing.assert_array_equal(piece, want)
  x = np.random.default_rng(0).integers(0, 1000, size=(3, T, 5))
  np.testing.assert_array_equal(context.balance(x, shards)[:, :, 0], x[:, index, 0])
  np.testing.assert_array_equal(context.unbalance(context.balance(x, shards), shards), x)
  np.testing.assert_array_equal(np.asarray(context.unbalance(context.balance(jnp.asarray(x), shards), shards)), x)


def test_a_sequence_the_context_axis_does_not_split_is_one_line_error(repo):
  context.check_length(96, 4, True)
  context.check_length(100, 4, False)
  with pytest.raises(UserError, match=r"train.seq_len=100 does not split into 2 × mesh.context = 8 .*multiple of 8"):
    context.check_length(100, 4, True)
  import from_config

  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  c.train.seq_len, c.mesh.context = 36, 4
  with pytest.raises(UserError, match=r"^train.seq_len=36 does not split") as e:
    from_config.build(c, devices=jax.devices())
  assert "\n" not in str(e.value)


def packed_rows(T: int, seed: int = 0):
  """Rows of documents of random lengths (positions restart at each), a padded tail on the second row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
  seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
  for b in range(B):
    t, s, end = 0, 1, T - (T // 8 if b else 0)
    while t < end:
      n = min(int(rng.integers(T // 16, T // 3)), end - t)
      seg[b, t:t + n], pos[b, t:t + n] = s, np.arange(n)
      t, s = t + n, s + 1
  return tokens, seg, pos, np.roll(tokens, -1, axis=1)


def loss_and_grads(cfg, adapter, params, batch, mesh=None):
  tokens, seg, pos, targets = batch
  T = tokens.shape[1]
  codes = None
  if adapter is not None:  # REFT's per-token intervention codes, per packed row
    codes = np.stack([adapter.batch_columns({"segment_ids": s, "loss_mask": (s > 0).astype(np.float32)})["intervene"]
                      for s in seg])

  def loss(p):
    stats = transformer.Transformer(cfg, adapter).apply(
        {"params": p}, tokens, seg, pos, targets_BxT=targets,
        adapter_inputs=None if codes is None else {"intervene": codes})
    w = (seg > 0) * jnp.arange(1, T + 1)  # weighted by position: a token read back in the wrong place shows
    return -jnp.sum(stats.logp * w) / jnp.sum(w)

  step = jax.jit(jax.value_and_grad(loss))
  if mesh is None:
    return step(params), None
  boxed = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0), boxed=True, adapter=adapter))
  params = jax.device_put(params, sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    compiled = step.lower(params).compile()
    return compiled(params), compiled.as_text()


CASES = {
    # XLA attention, load-balanced, with the chunked loss, full remat and a REFT adapter's per-token inputs
    "xla": (dict(attention_impl="xla", loss_chunk=16, remat="full"), 64, True),
    "xla-contiguous": (dict(attention_impl="xla", context_load_balance=False), 64, False),
    "splash": (dict(attention_impl="splash"), 1024, False),  # Pallas interpret mode on CPU; 8 chunks of 128
    "splash-separate-backward": (dict(attention_impl="splash"), 1024, False),  # the dq and dkv kernels
}


@pytest.mark.parametrize("case", CASES)
def test_context_parallel_step_matches_one_device(case, monkeypatch):
  from fmjax.model import splash

  if case == "splash-separate-backward":
    monkeypatch.setattr(splash, "FUSED_MAX_KV_BLOCKS", 4)  # 1024 tokens in tiles of 128 are 8 key blocks
  overrides, T, with_adapter = CASES[case]
  cfg = dataclasses.replace(CFG, **overrides)
  adapter = reft.ReftConfig(rank=4, positions="f2+l2") if with_adapter else None
  params = transformer.init_params(cfg, jax.random.key(0), adapter=adapter)
  if adapter is not None:  # interventions off their identity start, so they change the outputs
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(tree, [x + 0.1 * np.random.default_rng(i).normal(size=x.shape).astype(x.dtype)
                                       for i, x in enumerate(leaves)])
  batch = packed_rows(T)
  seg = batch[1]
  edges = np.arange(1, 2 * CONTEXT) * (T // (2 * CONTEXT))
  assert all(((seg[:, e - 1] == seg[:, e]) & (seg[:, e] > 0)).any() for e in edges)  # documents cross every edge

  (l1, g1), _ = loss_and_grads(dataclasses.replace(cfg, attention_impl="xla"), adapter, params, batch)  # reference
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, FSDP, CONTEXT, 1, 1), sharding.MESH_AXES)
  (l8, g8), hlo = loss_and_grads(cfg, adapter, params, batch, mesh)
  assert f"[{B // FSDP},{T // CONTEXT},{cfg.d_model}]" in hlo  # each device holds its share of the sequence
  np.testing.assert_allclose(l8, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
  assert max(float(np.abs(b).max()) for b in jax.tree.leaves(g1)) > 1e-3


def test_splash_cost_counts_the_busiest_shard():
  """Load-balanced shards split the kept tiles exactly; contiguous shards leave the last with the most."""
  from fmjax.model import splash

  T, H = 4096, 128
  whole = splash.kernel_cost(T, H, 2)
  balanced = splash.kernel_cost(T, H, 2, context.plan(T, True, 4))
  contiguous = splash.kernel_cost(T, H, 2, context.plan(T, False, 4))
  for p in ("forward", "backward"):
    assert balanced[p][0] * 4 == whole[p][0]
  n = T // 512  # 8 query blocks of 512; the last two shards' blocks 6 and 7 keep 7 + 8 key blocks
  assert contiguous["forward"][0] == whole["forward"][0] * (7 + 8) / (n * (n + 1) / 2)
