"""The mixture-of-experts block: a float64 per-expert loop, transformers' load-balancing loss, capacity drops, the
Pallas grouped matmul, and the whole train step on 1 device vs 8 with expert parallelism."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.model import config as model_config
from fmjax.model import moe
from test_train_step import make_config, one_step, rel_err

CFG = model_config.resolve("small_moe", dict(d_model=16, mlp_dim=8, num_experts=4, num_experts_per_tok=2,
                                              num_layers=1))
B, T = 3, 5


def block_inputs(cfg=CFG, seed=0):
  x = jax.random.normal(jax.random.key(seed), (B, T, cfg.d_model))
  params = nn.unbox(moe.MoE(cfg).init(jax.random.key(seed + 1), x, jnp.ones((B, T), bool))["params"])
  # spread the router so the top-k choices are well separated (no near-ties for float32 to flip)
  params = {**params, "router": params["router"] * 40}
  return params, x


def run_block(params, x, cfg=CFG, valid=None):
  valid = jnp.ones(x.shape[:2], bool) if valid is None else valid
  y, state = moe.MoE(cfg).apply({"params": params}, x, valid, mutable=["intermediates"])
  return y, moe.stats(state["intermediates"])


def loop_reference(params, x, cfg=CFG, keep=None):
  """Every expert on every token, float64, weighted by the router's top-k (mask `keep` [N,K] drops choices)."""
  x = x.reshape(-1, x.shape[-1])
  probs = jax.nn.softmax(x @ params["router"], axis=-1)
  top, idx = jax.lax.top_k(probs, cfg.num_experts_per_tok)
  top = top / top.sum(-1, keepdims=True) if cfg.moe_norm_topk else top
  if keep is not None:
    top = jnp.where(keep, top, 0.0)
  y = jnp.zeros_like(x)
  for e in range(cfg.num_experts):
    h = jax.nn.silu(x @ params["expert_gate"][e]) * (x @ params["expert_up"][e])
    weight = jnp.sum(jnp.where(idx == e, top, 0.0), axis=-1)
    y = y + weight[:, None] * (h @ params["expert_down"][e])
  return y.reshape(B, T, -1)


def test_dropless_block_equals_float64_loop_forward_and_gradients():
  params, x = block_inputs()
  loss = lambda p, x: jnp.sum(jnp.sin(run_block(p, x)[0]))  # noqa: E731
  y, _ = run_block(params, x)
  with jax.enable_x64(True):
    p64, x64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, x))
    ref = jax.jit(loop_reference)(p64, x64)
    ref_grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(loop_reference(p, x))), argnums=(0, 1)))(p64, x64)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  for name, got, want in zip(("params", "x"), grads, ref_grads):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert np.abs(w).max() > 0, name
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * np.abs(w).max(), err_msg=name)


def test_unnormalised_topk_and_shared_experts():
  cfg = dataclasses.replace(CFG, moe_norm_topk=False, moe_shared_experts=1)
  params, x = block_inputs(cfg)
  y, _ = run_block(params, x, cfg)
  shared = params["shared"]
  h = jax.nn.silu(x @ shared["gate_kernel"]) * (x @ shared["up_kernel"])
  routed = {k: v for k, v in params.items() if k != "shared"}
  np.testing.assert_allclose(y, loop_reference(routed, x, cfg) + h @ shared["down_kernel"], rtol=1e-5, atol=1e-6)


def test_megablox_kernel_equals_ragged_dot():
  cfg = dataclasses.replace(CFG, moe_matmul="megablox")
  params, x = block_inputs(cfg)
  loss = lambda p, x, c: jnp.sum(jnp.sin(run_block(p, x, c)[0]))  # noqa: E731
  want = jax.value_and_grad(loss, argnums=(0, 1))(params, x, CFG)
  got = jax.value_and_grad(loss, argnums=(0, 1))(params, x, cfg)  # Pallas interpret mode off TPU
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_megablox_grouped_matmul_leaves_rows_past_the_groups_zero():
  """Rows routed to no group (other devices' experts under expert parallelism): zero out, zero cotangent."""
  x = jax.random.normal(jax.random.key(5), (200, 16))
  w = jax.random.normal(jax.random.key(6), (3, 16, 8))
  sizes = jnp.array([50, 0, 70])  # 80 rows in no group
  f = lambda x, w, impl: jnp.sum(jnp.cos(moe.grouped_matmul(x, w, sizes, impl)))  # noqa: E731
  want = jax.value_and_grad(f, argnums=(0, 1))(x, w, "ragged_dot")
  got = jax.value_and_grad(f, argnums=(0, 1))(x, w, "megablox")
  assert np.all(np.asarray(want[1][0][120:]) == 0)
  for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_transformers(masked):
  torch = pytest.importorskip("torch")
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

  E, K, L = 6, 2, 3
  logits = jax.random.normal(jax.random.key(3), (L, B, T, E)) * 2
  valid = np.ones((B, T), bool)
  if masked:
    valid[0, 3:] = valid[2, 1:] = False  # right padding
  layers = []
  for l in range(L):
    probs, _, idx = moe.route(logits[l], K, True)
    layers.append(moe.router_stats(logits[l], probs, idx, jnp.asarray(valid), jnp.zeros(())))
  ours = moe.aux_terms(jax.tree.map(lambda *a: jnp.stack(a), *layers), K)
  theirs = load_balancing_loss_func(tuple(torch.tensor(np.asarray(logits[l]).reshape(B * T, E)) for l in range(L)),
                                    E, K, torch.tensor(valid.astype(np.int64)) if masked else None)
  np.testing.assert_allclose(ours["aux_loss"], theirs.item(), rtol=1e-5)
  z = jax.nn.logsumexp(logits, axis=-1)
  np.testing.assert_allclose(ours["z_loss"], np.sum(z ** 2 * valid) / (L * valid.sum()), rtol=1e-5)


def test_capacity_drops_exactly_the_rows_over_capacity():
  cfg = dataclasses.replace(CFG, moe_capacity_factor=0.5)
  params, x = block_inputs(cfg)
  y, stats = run_block(params, x, cfg)
  N, K, E = B * T, cfg.num_experts_per_tok, cfg.num_experts
  C = math.ceil(0.5 * N * K / E)
  assert moe.capacity(N, K, E, 0.5) == C
  _, idx = jax.lax.top_k(x.reshape(N, -1) @ params["router"], K)  # softmax keeps the order
  seen, keep = np.zeros(E, int), np.zeros((N, K), bool)
  for n in range(N):  # earliest token first, then its first choice
    for j in range(K):
      e = int(idx[n, j])
      keep[n, j] = seen[e] < C
      seen[e] += 1
  assert 0 < (~keep).sum() < N * K  # the shape drops some rows, not all
  assert int(stats["dropped"].sum()) == (~keep).sum()
  np.testing.assert_allclose(y, loop_reference(params, x, cfg, keep=jnp.asarray(keep)), rtol=1e-5, atol=1e-6)


def moe_config(repo, mesh, capacity=0.0):
  c = make_config(repo)
  c.model.name = "small_moe"
  c.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=32, num_experts=8,
                 moe_capacity_factor=capacity)
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor, c.mesh.expert = mesh
  return c


@pytest.fixture(scope="module")
def moe_single(repo):
  return {cap: one_step(moe_config(repo, (1, 1, 1, 1, 1), cap), jax.devices()[:1]) for cap in (0.0, 8.0)}


@pytest.mark.parametrize("mesh,capacity", [((1, 2, 1, 1, 4), 0.0), ((1, 2, 1, 2, 2), 0.0), ((1, 1, 2, 1, 4), 8.0)],
                         ids=["fsdp2xexpert4", "fsdp2xtensor2xexpert2", "capacity-context2xexpert4"])
def test_expert_parallel_step_matches_single_device(repo, moe_single, mesh, capacity):
  before1, after1, m1, _ = moe_single[capacity]
  before8, after8, m8, state8 = one_step(moe_config(repo, mesh, capacity), jax.devices())
  experts = state8.params["layers"]["moe"]["expert_gate"]
  assert experts.sharding.shard_shape(experts.shape)[1] == 8 // mesh[4]  # the experts are split over the axis
  assert abs(m8["loss"] - m1["loss"]) <= 1e-5 * abs(m1["loss"])
  for key in ("moe/aux_loss", "moe/z_loss", "moe/load_max"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)
  assert m1["moe/dropped"] == m8["moe/dropped"] == 0
  assert m1["loss"] > m1["nll"]  # the auxiliary losses are part of the trained loss
  grads1 = jax.tree.map(np.subtract, before1, after1)
  grads8 = jax.tree.map(np.subtract, before8, after8)
  assert rel_err(grads8, grads1) <= 1e-5
  assert np.abs(grads1["layers"]["moe"]["router"]).max() > 1e-4


@pytest.mark.parametrize("capacity,impl,rows", [(0.0, "ragged_dot", 3), (0.5, "ragged_dot", 3), (0.0, "megablox", 8)],
                         ids=["dropless", "capacity", "megablox-expert-parallel"])
def test_block_under_a_mesh(capacity, impl, rows):
  """On fsdp 2 x expert 4: a sampler's batch of 3 rows (every device holds all rows) and, split over the devices,
  the Pallas kernel per shard; the same outputs as one device's."""
  from fmjax import sharding

  cfg = dataclasses.replace(CFG, num_experts=8, moe_capacity_factor=capacity)
  params, x = block_inputs(cfg)
  x = jnp.resize(x, (rows,) + x.shape[1:])
  want, _ = run_block(params, x, cfg)
  cfg = dataclasses.replace(cfg, moe_matmul=impl)
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 2, 1, 1, 4), sharding.MESH_AXES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    assert moe.mesh_axes() == moe.Axes(batch=("data", "fsdp", "expert"), expert=("expert",), embed=("fsdp", "context"),
                                       mlp=("tensor",))
    block = jax.jit(lambda p, x: run_block(p, x, cfg))
    got, stats = block(params, x)
    # each device holds 2 of the 8 experts, half of their model dim (fsdp 2), their full hidden dim: [2, 8, 8]
    assert "tensor<2x8x8xf32>" in block.lower(params, x).as_text()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert (int(stats["dropped"].sum()) > 0) == (capacity > 0)
