"""On-policy RL's numerics: advantages, the clipped surrogate with k3 KL under each normaliser (float64 formulas,
TRL's own loss code), reward specs and the sort task's rewards. The runs in the loop: tests/test_rl_runs.py."""

import collections
import os

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config_lib, objectives
from fmjax.errors import UserError
from fmjax.objectives import LossContext
from fmjax.objectives import grpo, sampling
from fmjax.rl import advantages, rewards
from fmjax.train import rollout

V = 11


def grpo_cfg(**kw):
  return config_lib.use_head(config_lib.base(), "grpo", **kw)


# --- advantages ---------------------------------------------------------------------------------------------------

def test_advantages_sum_to_zero_per_group_and_follow_the_sample_std():
  r = np.random.default_rng(0).normal(size=24)
  for scale in advantages.SCALES:
    a = advantages.compute(r, 4, scale)
    np.testing.assert_allclose(a.reshape(-1, 4).sum(axis=1), 0.0, atol=1e-12)
  g = r.reshape(-1, 4)
  want = (g - g.mean(1, keepdims=True)) / (np.sqrt(((g - g.mean(1, keepdims=True)) ** 2).sum(1, keepdims=True) / 3)
                                           + 1e-4)
  np.testing.assert_allclose(advantages.compute(r, 4, "group"), want.reshape(-1), rtol=1e-12)
  np.testing.assert_allclose(advantages.compute(r, 4, "batch"),
                             ((g - g.mean(1, keepdims=True)) / (np.std(r, ddof=1) + 1e-4)).reshape(-1), rtol=1e-12)


def test_equal_rewards_give_zero_advantage_and_no_nan():
  r = np.array([0.5] * 4 + [1.0, 0.0, 1.0, 0.0])
  for scale in advantages.SCALES:
    a = advantages.compute(r, 4, scale)
    assert np.all(np.isfinite(a)) and np.all(a[:4] == 0)
  assert advantages.zero_std_fraction(r, 4) == 0.5


def test_rloo_is_the_leave_one_out_baseline():
  np.testing.assert_allclose(advantages.compute(np.arange(1, 7), 3, "rloo"), [-1.5, 0, 1.5, -1.5, 0, 1.5])
  with pytest.raises(UserError, match="num_generations >= 2"):
    advantages.compute(np.ones(3), 1, "rloo")


# --- the per-token loss ---------------------------------------------------------------------------------------------

def test_k3_is_zero_with_zero_gradient_at_the_reference_and_positive_elsewhere():
  cfg = grpo_cfg(kl_coef=1.0)
  ref = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)) - 2.0)
  mask, zero = jnp.ones((3, 5)), jnp.zeros((3, 5))
  kl = lambda logp: grpo.policy_loss(logp, jax.lax.stop_gradient(logp), ref, zero, mask, cfg)[1]["kl"]  # noqa: E731
  assert float(jnp.max(jnp.abs(kl(ref)))) < 1e-7
  g = jax.grad(lambda logp: jnp.sum(grpo.policy_loss(logp, jax.lax.stop_gradient(logp), ref, zero, mask, cfg)[0]))
  assert float(jnp.max(jnp.abs(g(ref)))) < 1e-6
  other = ref + jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)))
  assert float(jnp.min(kl(other))) > 0


def table_model(seed=0):
  """apply(params, inputs) = params[token]: logits that a float64 NumPy gradient can follow."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=(V, V))), \
      lambda params, inputs: params[inputs["tokens"]]


def rollout_batch(seed=3, lengths=(3, 5, 1, 4), width=9, prompt=2):
  rng = np.random.default_rng(seed)
  n = len(lengths)
  prompts = [rng.integers(0, V, prompt) for _ in range(n)]
  comps = [rng.integers(0, V, k) for k in lengths]
  adv = rng.normal(size=n)
  rows = rollout.rows(prompts, comps, np.ones(n, bool), width, {"advantages": adv},
                      {"old_logps": [np.zeros(k, np.float32) for k in lengths]})
  return {k: jnp.asarray(v) for k, v in rows.items()}, adv


def float64_gradient(table, batch, weights, temperature):
  """d/d table of −Σ_t w_t · Â_t · log π(target_t) (float64): log π = log_softmax(table[token] / T)[target]."""
  table = np.asarray(table, np.float64)
  grad = np.zeros_like(table)
  toks, tgts = np.asarray(batch["tokens"]), np.asarray(batch["targets"])
  adv, w = np.asarray(batch["advantages"], np.float64), np.asarray(weights, np.float64)
  for (b, t), wt in np.ndenumerate(w):
    if wt == 0:
      continue
    z = table[toks[b, t]] / temperature
    p = np.exp(z - np.logaddexp.reduce(z))
    grad[toks[b, t]] += -wt * adv[b, t] * (np.eye(V)[tgts[b, t]] - p) / temperature
  return grad


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_at_one_iteration_the_gradient_is_the_advantage_weighted_score_function(loss_type):
  table, apply = table_model()
  batch, _ = rollout_batch()
  cfg = grpo_cfg(loss_type=loss_type, temperature=0.7, max_completion_length=6)
  head = objectives.get(cfg)
  assert head.frozen == ()  # β = 0: no reference model
  loss = lambda p: (lambda s, w, m: s / w)(*head.loss(p, batch, LossContext(apply=apply)))  # noqa: E731
  mask = np.asarray(batch["loss_mask"], np.float64)
  n_i, rows = mask.sum(1, keepdims=True), (mask.sum(1) > 0).sum()
  weights = {"grpo": mask / np.maximum(n_i, 1) / rows, "dr_grpo": mask / (rows * 6), "dapo": mask / mask.sum()}
  np.testing.assert_allclose(jax.grad(loss)(table), float64_gradient(table, batch, weights[loss_type], 0.7),
                             rtol=1e-5, atol=1e-7)
  # ρ = 1 exactly: the value is −Σ w·Â
  np.testing.assert_allclose(float(loss(table)), -np.sum(weights[loss_type] * np.asarray(batch["advantages"])),
                             rtol=1e-5)


def test_clipping_zeroes_the_gradient_where_the_ratio_left_its_range_in_the_advantages_direction():
  cfg = grpo_cfg(num_iterations=2, epsilon_low=0.2, epsilon_high=0.28)
  logp = jnp.zeros((1, 4))
  old = jnp.log(jnp.asarray([[1 / 1.5, 1 / 1.5, 1 / 0.5, 1 / 0.5]]))  # ratios 1.5, 1.5, 0.5, 0.5
  adv = jnp.asarray([[1.0, -1.0, -1.0, 1.0]])
  g = jax.grad(lambda lp: jnp.sum(grpo.policy_loss(lp, old, None, adv, jnp.ones((1, 4)), cfg)[0]))(logp)
  # above 1 + ε_high with Â > 0, and below 1 − ε_low with Â < 0: clipped, no gradient; the others keep theirs
  np.testing.assert_allclose(np.asarray(g), [[0.0, 1.5, 0.0, -0.5]], atol=1e-6)
  values = grpo.policy_loss(logp, old, None, adv, jnp.ones((1, 4)), cfg)[1]
  assert np.asarray(values["clip_ratio/high"]).tolist() == [[1, 0, 0, 0]]
  assert np.asarray(values["clip_ratio/low"]).tolist() == [[0, 0, 1, 0]]


def test_dr_grpo_normaliser_does_not_depend_on_the_lengths():
  loss = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6)))
  short, long = jnp.asarray([[1, 1, 0, 0, 0, 0]] * 2, jnp.float32), jnp.ones((2, 6))
  for mask in (short, long):
    total, weight = grpo.normalise(loss * mask, mask, jnp.ones(2), "dr_grpo", 6)
    np.testing.assert_allclose(float(total / weight), float(jnp.sum(loss * mask)) / (2 * 6), rtol=1e-6)
  g_short, w_short = grpo.normalise(loss * short, short, jnp.ones(2), "grpo", 6)
  np.testing.assert_allclose(float(g_short / w_short), float(jnp.mean(jnp.sum(loss * short, 1) / 2)), rtol=1e-6)


# --- TRL's own loss code ------------------------------------------------------------------------------------------

def trl_loss(loss_type, logp, old, ref, adv, mask, beta, eps_low, eps_high, max_len, level="token", is_ratio=None):
  torch = pytest.importorskip("torch")
  from trl.trainer.grpo_trainer import GRPOTrainer

  t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
  B, C = logp.shape
  stub = types.SimpleNamespace(
      _get_per_token_logps_and_entropies=lambda *a, **k: (t(logp), torch.zeros(B, C, dtype=torch.float64), None),
      top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
      args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
      loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=is_ratio is not None,
      vllm_importance_sampling_correction=is_ratio is not None, model=types.SimpleNamespace(training=True),
      current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
      aux_loss_enabled=False, _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
      accelerator=types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x))
  inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
            "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": t(mask),
            "advantages": t(adv), "old_per_token_logps": t(old), "ref_per_token_logps": t(ref),
            "num_items_in_batch": t(mask).sum()}
  if is_ratio is not None:
    inputs["importance_sampling_ratio"] = t(is_ratio)
  return float(GRPOTrainer._compute_loss(stub, None, inputs))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_the_loss_equals_trls_grpo_trainer_loss(loss_type, level):
  """GRPO's token ratios and GSPO's sequence ratios (TRL's importance_sampling_level), under each normaliser."""
  pytest.importorskip("trl")
  rng = np.random.default_rng(5)
  B, C = 6, 7
  logp, ref = -rng.uniform(0.1, 3, (B, C)), -rng.uniform(0.1, 3, (B, C))
  old = logp + rng.normal(scale=0.5, size=(B, C))  # ratios on both sides of the clip range
  adv = rng.normal(size=B)
  mask = (np.arange(C)[None] < rng.integers(1, C + 1, B)[:, None]).astype(np.float64)
  eps = (0.2, 0.28) if level == "token" else (0.05, 0.08)  # sequence ratios spread less: some rows still clip
  cfg = grpo_cfg(kl_coef=0.04, epsilon_low=eps[0], epsilon_high=eps[1], num_iterations=2, loss_type=loss_type,
                 importance_sampling_level=level)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  per_token, values = grpo.policy_loss(f32(logp), f32(old), f32(ref), f32(np.repeat(adv[:, None], C, 1)), f32(mask),
                                       cfg)
  total, weight = grpo.normalise(per_token, f32(mask), jnp.ones(B), loss_type, C)
  want = trl_loss(loss_type, logp, old, ref, adv, mask, 0.04, *eps, C, level)
  np.testing.assert_allclose(float(total / weight), want, rtol=2e-6)
  clipped = np.asarray(values["clip_ratio/low"] + values["clip_ratio/high"]) * mask
  assert 0 < clipped.sum() < mask.sum()  # the clip is in play, on some tokens only


def test_gspo_token_is_gspo_with_one_advantage_per_completion_and_on_policy_the_mean_score_function():
  """GSPO-token has GSPO's value and, with one advantage per completion, its gradient; on-policy (ρ = 1) GSPO's
  gradient for completion i is −Â_i ∇ mean_t log π_t (float64 closed form), whatever the loss's clipping."""
  rng = np.random.default_rng(6)
  B, C = 5, 6
  logp = jnp.asarray(-rng.uniform(0.1, 3, (B, C)))
  old = logp + jnp.asarray(rng.normal(scale=0.05, size=(B, C)))
  adv = np.repeat(rng.normal(size=B)[:, None], C, 1)
  mask = jnp.asarray((np.arange(C)[None] < rng.integers(1, C + 1, B)[:, None]).astype(np.float64))

  def loss(level, logp, old):
    cfg = grpo_cfg(loss_type="grpo", importance_sampling_level=level, epsilon_low=3e-4, epsilon_high=4e-4)
    total, weight = grpo.normalise(grpo.policy_loss(logp, old, None, jnp.asarray(adv), mask, cfg)[0], mask,
                                   jnp.ones(B), "grpo", C)
    return total / weight

  for f in (loss, jax.grad(loss, argnums=1)):
    np.testing.assert_allclose(f("sequence_token", logp, old), f("sequence", logp, old), rtol=1e-5, atol=1e-7)
  on_policy = jax.grad(lambda lp: loss("sequence", lp, jax.lax.stop_gradient(lp)))(logp)
  m = np.asarray(mask)
  np.testing.assert_allclose(on_policy, -adv * m / m.sum(1, keepdims=True) / B, rtol=1e-5, atol=1e-8)


# --- reward functions ---------------------------------------------------------------------------------------------

def test_reward_specs_and_a_wrong_return_names_the_function():
  assert rewards.parse("sort_digits:0.5, sort_exact, model:2") == [("sort_digits", 0.5), ("sort_exact", 1.0),
                                                                   ("model", 2.0)]
  assert rewards.parse("my.module:score:0.3") == [("my.module:score", 0.3)]
  assert rewards.parse("my.module:score") == [("my.module:score", 1.0)]
  with pytest.raises(UserError, match="'nope' is not a reward function"):
    rewards.resolve("nope")
  with pytest.raises(UserError, match="returned 1 values for 2 completions"):
    rewards.call("short", lambda p, c: [1.0], ["a", "b"], ["x", "y"], {})
  with pytest.raises(UserError, match="'bad' returned NoneType"):
    rewards.call("bad", lambda p, c: None, ["a"], ["x"], {})
  assert rewards.resolve("os.path:exists") is os.path.exists
  with pytest.raises(UserError, match="'os.path:sep' is a str, not a function"):
    rewards.resolve("os.path:sep")


def test_sort_rewards():
  from fmjax.rl import tasks
  p = "Sort: 3 1 2\n"
  assert tasks.sort_exact([p, p], ["1 2 3", "1 3 2"]) == [1.0, 0.0]
  np.testing.assert_allclose(tasks.sort_digits([p, p, p], ["1 2 3", "1 3 2", "1 2 3 4 5"]), [1.0, 1 / 3, 0.8])


@pytest.mark.parametrize("mode", [m for m in sampling.CORRECTIONS if m != "none"])
def test_the_sampler_correction_is_tis_and_weighs_the_surrogate_as_trl(mode):
  """TIS weights (float64 formulas of TRL's vllm_importance_sampling_mode), applied to the clipped surrogate before
  the KL term, as TRL's GRPOTrainer applies its importance_sampling_ratio."""
  pytest.importorskip("trl")
  rng = np.random.default_rng(11)
  B, C = 6, 7
  logp, ref = -rng.uniform(0.1, 3, (B, C)), -rng.uniform(0.1, 3, (B, C))
  old = logp + rng.normal(scale=0.5, size=(B, C))
  sampler = old + rng.normal(scale=0.6, size=(B, C))  # the sampler's numerics differ from the trainer's
  adv = rng.normal(size=B)
  mask = (np.arange(C)[None] < rng.integers(1, C + 1, B)[:, None]).astype(np.float64)
  cfg = grpo_cfg(kl_coef=0.04, num_iterations=2, loss_type="dapo", sampler_correction=mode,
                 sampler_correction_min=0.5, sampler_correction_max=2.0)
  diff = (old - sampler) * mask
  w = np.exp(diff.sum(1, keepdims=True) if mode.startswith("sequence") else diff) * np.ones((B, C))
  want_w = np.clip(w, 0.5, 2.0) if mode.endswith("truncate") else np.where((w < 0.5) | (w > 2.0), 0.0, w)
  assert 0 < np.mean(want_w != w) < 1  # the bounds are in play
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  weight = sampling.correction(f32(old), f32(sampler), f32(mask), cfg)
  np.testing.assert_allclose(np.asarray(weight) * mask, want_w * mask, rtol=1e-5)
  per_token, _ = grpo.policy_loss(f32(logp), f32(old), f32(ref), f32(np.repeat(adv[:, None], C, 1)), f32(mask), cfg,
                                  weight)
  total, norm = grpo.normalise(per_token, f32(mask), jnp.ones(B), "dapo", C)
  want = trl_loss("dapo", logp, old, ref, adv, mask, 0.04, 0.2, 0.28, C, is_ratio=want_w)
  np.testing.assert_allclose(float(total / norm), want, rtol=2e-6)
