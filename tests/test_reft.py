"""REFT: the interventions' algebra (float64 closed forms), their positions under packing, the frozen base, cached
generation, save/load, DPO's starting loss, and a parameterisation defined here training through the registry."""

import dataclasses
import math
import types
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import fmjax
from fmjax import adapters, config_lib, sample
from fmjax.adapters import reft
from fmjax.model import Transformer, init_params, resolve
from fmjax.train import loop
import from_config

SMOKE = resolve("smoke")
NO_RNG = types.SimpleNamespace(has_rng=lambda name: False)


def intervention(cfg, d=16, r=4, seed=0, groups=1):
  """Random layer params {R, W, b, on} for one layer, R from `cfg`'s parameterisation of a random A."""
  rs = np.random.default_rng(seed)
  a = jnp.asarray(rs.standard_normal((groups, d, r)), jnp.float32)
  return {"R": cfg._rows(a), "W": jnp.asarray(rs.standard_normal((groups, d, r)), jnp.float32),
          "b": jnp.asarray(rs.standard_normal((groups, r)), jnp.float32), "on": jnp.float32(1.0)}


def edit(cfg, params, h, codes):
  return np.asarray(cfg.block_output(NO_RNG, jnp.asarray(h, jnp.float32), params, {"intervene": jnp.asarray(codes)}),
                    np.float64)


def test_loreft_rows_stay_orthonormal_and_the_edit_has_its_closed_form():
  cfg = reft.ReftConfig(rank=4, positions="f2", share_weights=True)
  p = intervention(cfg)
  R, W, b = (np.asarray(p[k][0], np.float64) for k in ("R", "W", "b"))
  np.testing.assert_allclose(R @ R.T, np.eye(4), atol=1e-6)
  h = np.random.default_rng(1).standard_normal((2, 5, 16))
  codes = np.array([[1, 1, 0, 0, 1], [0, 1, 0, 1, 0]], np.int32)
  phi = edit(cfg, p, h, codes)
  on = codes > 0
  # R Φ(h) = W h + b and (I − RᵀR) Φ(h) = (I − RᵀR) h at edited positions; elsewhere Φ(h) = h exactly
  np.testing.assert_allclose((phi @ R.T)[on], (h @ W + b)[on], atol=1e-4)
  complement = np.eye(16) - R.T @ R
  np.testing.assert_allclose((phi @ complement)[on], (h @ complement)[on], atol=1e-4)
  np.testing.assert_array_equal(phi[~on], np.asarray(h, np.float32)[~on])
  assert np.abs(phi[on] - h[on]).max() > 0.1  # the edit did something
  # with W = R (Rᵀ in W's [d, r] layout) and b = 0 it is the identity
  same = dict(p, W=jnp.swapaxes(p["R"], -1, -2), b=jnp.zeros_like(p["b"]))
  np.testing.assert_allclose(edit(cfg, same, h, codes), h, atol=1e-5)


def test_direft_and_noreft_closed_forms():
  h = np.random.default_rng(2).standard_normal((1, 3, 16))
  codes = np.ones((1, 3), np.int32)
  for method, minus_rh in (("direft", False), ("noreft", True)):
    cfg = reft.ReftConfig(rank=4, method=method, positions="f2", share_weights=True)
    p = intervention(cfg, seed=3)
    R, W, b = (np.asarray(p[k][0], np.float64) for k in ("R", "W", "b"))
    expected = h + (h @ W + b - (h @ R.T if minus_rh else 0)) @ R
    np.testing.assert_allclose(edit(cfg, p, h, codes), expected, rtol=1e-4, atol=1e-4)


def test_first_and_last_sides_use_their_own_intervention():
  cfg = reft.ReftConfig(rank=4, positions="f1+l1")
  assert cfg.groups == 2
  p = intervention(cfg, groups=2, seed=4)
  h = np.random.default_rng(5).standard_normal((1, 3, 16))
  phi = edit(cfg, p, h, np.array([[1, 0, 2]], np.int32))
  for g, t in ((0, 0), (1, 2)):
    R, W, b = (np.asarray(p[k][g], np.float64) for k in ("R", "W", "b"))
    np.testing.assert_allclose(phi[0, t], h[0, t] + (h[0, t] @ W + b - h[0, t] @ R.T) @ R, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(phi[0, 1], np.asarray(h, np.float32)[0, 1])


def test_two_parameterisations_at_once_are_refused_naming_both_switches(repo):
  c = config_lib.load(f"{repo}/configs/reft.py:smoke")
  assert isinstance(config_lib.adapter(c), reft.ReftConfig)
  c.lora.rank = 8
  with pytest.raises(ValueError, match=r"lora and reft are both on.*lora.rank=0; reft.rank=0"):
    config_lib.adapter(c)
  c.reft.rank, c.reft.layers = 4, "0,9"
  c.lora.rank = 0
  with pytest.raises(ValueError, match="reft.layers='0,9' names block 9, but the model has 2"):
    from_config.build(c, devices=jax.devices()[:1])


def test_positions_follow_pyreft_and_each_packed_prompt():
  assert reft.parse_positions("f5+l5") == (5, 5) and reft.parse_positions("l7") == (0, 7)
  for bad in ("f5l5", "+", "first5", "f5+"):
    with pytest.raises(ValueError, match="reft.positions"):
      reft.parse_positions(bad)
  np.testing.assert_array_equal(reft.segment_codes(7, 5, 5), [1, 1, 1, 0, 2, 2, 2])  # each side capped at 7 // 2
  np.testing.assert_array_equal(reft.segment_codes(12, 2, 3), [1, 1, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2])
  cfg = reft.ReftConfig(rank=2, positions="f1+l2")
  # two packed examples: prompts of 4 and 6 tokens (the last prompt token's target is the first response token)
  seg = np.array([1] * 6 + [2] * 9 + [0] * 3)
  mask = np.array([0, 0, 0, 1, 1, 1] + [0] * 5 + [1] * 4 + [0] * 3, np.float32)
  codes = cfg.batch_columns({"segment_ids": seg, "loss_mask": mask})["intervene"]
  np.testing.assert_array_equal(codes, [1, 0, 2, 2, 0, 0] + [1, 0, 0, 0, 2, 2, 0, 0, 0] + [0] * 3)
  text = cfg.batch_columns({"segment_ids": np.array([1] * 8), "loss_mask": np.ones(8, np.float32)})["intervene"]
  np.testing.assert_array_equal(text, [1, 0, 0, 0, 0, 0, 2, 2])  # all loss-bearing: the whole segment is the prompt


def random_reft_params(cfg, model_cfg=SMOKE, seed=0):
  """Init, then the interventions moved off the identity start (so they change the outputs)."""
  params = init_params(model_cfg, jax.random.PRNGKey(seed), adapter=cfg)
  trained, base = adapters.split(cfg, params)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 8))
  trained = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), trained)
  return base, trained, adapters.combine(base, trained)


def test_packed_examples_equal_each_alone_and_earlier_logits_are_the_bases():
  cfg = reft.ReftConfig(rank=4, positions="f2+l2", layers="1")
  base, _, full = random_reft_params(cfg)
  rs = np.random.default_rng(0)
  lengths, prompts = (9, 7), (5, 4)
  examples = [rs.integers(0, SMOKE.vocab_size, n) for n in lengths]
  masks = [np.r_[np.zeros(p - 1), np.ones(n - p + 1)] for n, p in zip(lengths, prompts)]
  apply = jax.jit(lambda params, t, s, pos, c: Transformer(SMOKE, cfg).apply(
      {"params": params}, t, s, pos, adapter_inputs={"intervene": c}))
  plain = jax.jit(lambda params, t, s, pos: Transformer(SMOKE).apply({"params": params}, t, s, pos))

  def run(tokens, seg, mask, params=full):
    pos = np.concatenate([np.arange((seg == s).sum()) for s in np.unique(seg)])
    codes = cfg.batch_columns({"segment_ids": seg, "loss_mask": mask})["intervene"]
    args = (tokens[None].astype(np.int32), seg[None].astype(np.int32), pos[None].astype(np.int32))
    return np.asarray(apply(params, *args, codes[None])[0]), np.asarray(plain(base, *args)[0]), codes

  packed, _, _ = run(np.concatenate(examples), np.repeat([1, 2], lengths), np.concatenate(masks))
  start = 0
  for tokens, mask, n in zip(examples, masks, lengths):
    alone, base_logits, codes = run(tokens, np.ones(n, np.int32), mask)
    np.testing.assert_allclose(packed[start:start + n], alone, atol=1e-5)
    first = int(np.flatnonzero(codes)[0])
    np.testing.assert_allclose(alone[:first], base_logits[:first], atol=1e-6)
    assert np.abs(alone[first:] - base_logits[first:]).max() > 1e-3
    start += n


def test_cached_generation_with_interventions_equals_full_recomputation():
  cfg = reft.ReftConfig(rank=4, positions="f2+l3")
  _, _, full = random_reft_params(cfg, seed=3)
  rs = np.random.default_rng(1)
  prompts = [rs.integers(0, SMOKE.vocab_size, n).astype(np.int32) for n in (3, 7, 12)]
  new = 6
  width = max(map(len, prompts)) + new
  codes = cfg.prompt_columns(np.array([len(p) for p in prompts]), width)["intervene"]
  module = Transformer(SMOKE, cfg)
  apply = lambda p, t, s, pos: module.apply({"params": p}, t, s, pos, adapter_inputs={"intervene": codes})  # noqa
  expected = sample.greedy(apply, full, prompts, new)
  got = sample.generate(SMOKE, cfg, full, prompts, new)
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(g, e)
  plain = sample.generate(SMOKE, None, full, prompts, new)  # the base alone continues otherwise
  assert any(not np.array_equal(a, b) for a, b in zip(plain, got))


def reft_run_config(repo, **reft_options):
  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  c.train.seq_len, c.train.batch_size, c.train.steps = 32, 8, 4
  c.optimizer.warmup_steps, c.optimizer.lr, c.optimizer.weight_decay = 0, 5e-2, 0.0
  c.reft.rank, c.reft.positions = 4, "f3+l3"
  for k, v in reft_options.items():
    c.reft[k] = v
  return c


@pytest.fixture(scope="module")
def trained(repo):
  exp = from_config.build(reft_run_config(repo), devices=jax.devices()[:1])
  base_before, start = jax.device_get(exp.state.base), jax.device_get(exp.state.params)
  state, losses, batch = exp.state, [], exp.next_batch()
  for _ in range(4):  # one batch: its loss must fall
    state, metrics = exp.run.step(state, batch)
    losses.append(float(metrics["loss"]))
  return exp, base_before, start, jax.device_get(state), losses


def test_training_keeps_the_base_and_r_orthonormal_and_counts_2dr_plus_r(trained):
  exp, base_before, start, state, losses = trained
  jax.tree.map(np.testing.assert_array_equal, state.base, base_before)
  flat = traverse_util.flatten_dict(state.params)
  assert sorted(p[-1] for p in flat) == ["reft_bias", "reft_rotation", "reft_weight"]
  d, r, cfg = exp.run.model_cfg.d_model, 4, exp.run.model.adapter
  interventions = cfg.groups * exp.run.model_cfg.num_layers
  assert exp.run.num_params == (2 * d * r + r) * interventions == 2 * 516 * 2
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state.params, start)
  assert min(jax.tree.leaves(moved)) > 1e-3  # R, W and b all trained
  rows = np.asarray(cfg._rows(jnp.asarray(state.params["reft_rotation"])), np.float64)  # [layers, groups, r, d]
  np.testing.assert_allclose(rows @ np.swapaxes(rows, -1, -2), np.broadcast_to(np.eye(r), rows.shape[:2] + (r, r)),
                             atol=1e-5)
  assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_reft_step_on_8_devices_matches_1(repo, trained):
  _, _, _, state1, losses1 = trained
  c = reft_run_config(repo)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  exp = from_config.build(c, devices=jax.devices())
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(exp.state.params))
  state, losses, batch = exp.state, [], exp.next_batch()
  for _ in range(4):
    state, metrics = exp.run.step(state, batch)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, losses1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6), state.params,
               state1.params)


def test_a_layer_subset_trains_only_those_layers(repo):
  exp = from_config.build(reft_run_config(repo, layers="1", share_weights=True), devices=jax.devices()[:1])
  assert exp.run.num_params == 2 * exp.run.model_cfg.d_model * 4 + 4  # one intervention
  state, metrics = exp.run.step(exp.state, exp.next_batch())
  assert math.isfinite(float(metrics["loss"]))


def test_save_then_load_gives_the_run_logits(repo, tmp_path):
  c = reft_run_config(repo)
  c.train.steps, c.eval.every_steps, c.checkpoint.every_steps = 3, 0, 3
  exp = loop.train(c, str(tmp_path))
  model = fmjax.load(str(tmp_path))
  assert isinstance(model.adapter, reft.ReftConfig) and model.adapter == exp.run.model.adapter
  tokens = np.random.default_rng(0).integers(0, exp.run.model_cfg.vocab_size, (2, 12)).astype(np.int32)
  codes = model.adapter.prompt_columns(np.array([12, 12]), 12)["intervene"]
  full = adapters.combine(exp.state.base, exp.state.params)
  pos = np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape)
  expected = Transformer(exp.run.model_cfg, exp.run.model.adapter).apply({"params": full}, tokens, np.ones_like(tokens), pos,
                                                                 adapter_inputs={"intervene": codes})
  np.testing.assert_allclose(model.logits(tokens), np.asarray(expected), atol=1e-5)
  base = Transformer(exp.run.model_cfg).apply({"params": exp.state.base}, tokens, np.ones_like(tokens), pos)
  assert np.abs(model.logits(tokens) - np.asarray(base)).max() > 1e-4  # the loaded interventions do act


def test_dpo_with_reft_starts_at_ln2_with_the_base_as_reference(repo):
  c = config_lib.load(f"{repo}/configs/dpo.py:smoke")
  c.init_from.bootstrap = c.init_from.workdir = ""
  c.train.seq_len, c.train.batch_size = 128, 4
  c.lora.rank, c.optimizer.lr, c.optimizer.warmup_steps = 0, 1e-2, 0
  c.reft.rank, c.reft.positions = 4, "f3+l3"
  exp = from_config.build(c, devices=jax.devices()[:1])
  assert "reference" not in exp.state.frozen and exp.state.base is not None  # the base serves as the reference
  state, metrics = exp.run.step(exp.state, exp.next_batch())
  assert abs(float(metrics["loss"]) - math.log(2)) < 1e-5
  _, metrics = exp.run.step(state, exp.next_batch())
  assert abs(float(metrics["loss"]) - math.log(2)) > 1e-6  # and moves once REFT has trained a step


@dataclasses.dataclass(frozen=True)
class Gain(adapters.Adapter):
  """A parameterisation defined outside the package: a learned per-layer gain on each block's output."""

  on: bool = False
  title: ClassVar[str] = "gain"

  @classmethod
  def enabled(cls, section):
    return section.on

  @classmethod
  def owns_path(cls, path):
    return path[-1] == "gain_scale"

  def layer_params(self, module, num_layers):
    return module.param("gain_scale", nn.with_logical_partitioning(nn.initializers.ones, ("layers",)), (num_layers,))

  def block_output(self, module, x, layer_params, inputs):
    return x * layer_params


def test_a_parameterisation_defined_in_a_test_trains_through_the_registry(repo):
  import ml_collections

  adapters.register("gain", Gain)
  try:
    c = reft_run_config(repo)
    c.reft.rank = 0
    c.gain = ml_collections.ConfigDict({"on": True})
    exp = from_config.build(c, devices=jax.devices()[:1])
    assert jax.tree.structure(exp.state.params) == jax.tree.structure({"gain_scale": 0})
    base = jax.device_get(exp.state.base)
    state, _ = exp.run.step(exp.state, exp.next_batch())
    state, _ = exp.run.step(state, exp.next_batch())
    scale = np.asarray(state.params["gain_scale"])
    assert scale.shape == (exp.run.model_cfg.num_layers,) and np.abs(scale - 1).max() > 1e-4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.base), base)
  finally:
    adapters._LOADED.pop("gain", None)


@pytest.mark.slow
def test_reft_smoke_standalone_stops_resumes_and_learns(repo, tmp_path, cpu_env):
  import json
  import subprocess
  import sys

  from fmjax.train import weights

  def run(*extra):
    proc = subprocess.run([sys.executable, "-m", "fmjax.main", "--config=configs/reft.py:smoke", f"--workdir={tmp_path}",
                           *extra], cwd=repo, capture_output=True, text=True, timeout=300, env=cpu_env(1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr

  first = run("--config.train.stop_after=20")
  assert "2,064 trained: loreft rank 4 at f5+l5" in first  # (2·64·4 + 4) × 2 sides × 2 blocks
  trained, step = weights.read_params(str(tmp_path))
  assert step == 20 and all(p[-1].startswith("reft_") for p in traverse_util.flatten_dict(trained))
  resumed = run()
  assert "resuming from step 20" in resumed and "initialised the frozen REFT base" in resumed
  evals = {r["step"]: r["eval_loss"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "eval_loss" in r}
  assert sorted(evals) == [0, 10, 20, 30] and evals[30] < evals[0] - 0.01
