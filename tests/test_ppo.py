"""PPO's numerics (fmjax/rl/gae.py, the `ppo` head's `finish` and `losses`): GAE against float64 closed forms, and
one rollout update against TRL 1.12.0's own PPOTrainer.train() (the last TRL with one), run in a subprocess by
tests/trl_ppo_reference.py on the same rows.

The cross-check's rows fill TRL's whole generation length (no padding): TRL puts the score one token after the EOS
when there is room and keeps the value there, fmjax puts it on the completion's last token; they agree exactly when
the completion is the full length, so the comparison is of the arithmetic, not of that convention. Inputs are
float32-representable so both sides start from the same numbers; TRL computes in float32, hence rtol 1e-5."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.objectives import ppo
from fmjax.rl import gae

import trl_peer

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL, ATOL = 1e-5, 1e-6


# --- GAE against closed forms (float64) ---------------------------------------------------------------------------

def ragged(seed=0):
  """Rows of [12] with completions of different lengths at different offsets (prompt before, padding after), one
  row empty; rewards and values are noise everywhere, so positions outside the mask must be ignored."""
  spans = [(0, 12), (3, 9), (5, 6), (2, 3), (4, 4)]  # [start, end); the last row has no completion
  mask = np.zeros((len(spans), 12))
  for i, (a, b) in enumerate(spans):
    mask[i, a:b] = 1
  rng = np.random.default_rng(seed)
  return rng.normal(size=mask.shape), rng.normal(size=mask.shape), mask, spans


def direct_gae(r, v, spans, gamma, lam):
  """A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} − V_t, V past the completion's last token 0: a double sum."""
  adv = np.zeros_like(r)
  for i, (a, b) in enumerate(spans):
    vv = np.append(v[i, a:b], 0.0)
    delta = r[i, a:b] + gamma * vv[1:] - vv[:-1]
    for t in range(b - a):
      adv[i, a + t] = sum((gamma * lam) ** k * delta[t + k] for k in range(b - a - t))
  return adv


def test_gae_with_gamma_and_lambda_one_is_returns_to_go_minus_the_value():
  r, v, mask, spans = ragged()
  adv, ret = gae.advantages(r, v, mask, 1.0, 1.0)
  to_go = np.zeros_like(r)
  for i, (a, b) in enumerate(spans):
    to_go[i, a:b] = np.cumsum(r[i, a:b][::-1])[::-1]
  np.testing.assert_allclose(ret, to_go, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(adv, (to_go - v) * mask, rtol=1e-12, atol=1e-12)


def test_gae_with_lambda_zero_is_the_one_step_td_error():
  r, v, mask, spans = ragged(1)
  adv, ret = gae.advantages(r, v, mask, 0.9, 0.0)
  want = np.zeros_like(r)
  for i, (a, b) in enumerate(spans):
    nxt = np.append(v[i, a + 1:b], 0.0)  # no value past the completion's last token
    want[i, a:b] = r[i, a:b] + 0.9 * nxt - v[i, a:b]
  np.testing.assert_allclose(adv, want, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(ret, (want + v) * mask, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma,lam", [(0.97, 0.9), (0.5, 0.3), (1.0, 0.95)])
def test_gae_equals_the_discounted_sum_of_td_errors(gamma, lam):
  r, v, mask, spans = ragged(2)
  adv, ret = gae.advantages(r, v, mask, gamma, lam)
  want = direct_gae(r, v, spans, gamma, lam)
  np.testing.assert_allclose(adv, want, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(ret, (want + v) * mask, rtol=1e-12, atol=1e-12)
  assert not adv[mask == 0].any() and not ret[mask == 0].any()


def test_whiten_is_over_the_masked_entries_with_the_unbiased_variance():
  x, _, mask, _ = ragged(3)
  on = x[mask > 0]
  mean, var = on.mean(), on.var(ddof=1)
  np.testing.assert_allclose(gae.whiten(x, mask), np.where(mask > 0, (x - mean) / np.sqrt(var + 1e-8), 0),
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(gae.whiten(x, mask, shift_mean=False),
                             np.where(mask > 0, (x - mean) / np.sqrt(var + 1e-8) + mean, 0), rtol=1e-12, atol=1e-12)


def test_rewards_put_the_score_on_each_rows_last_token_and_skip_empty_rows():
  kl, _, mask, spans = ragged(4)
  scores = np.array([1.0, -2.0, 3.0, 0.5, 7.0])
  out = gae.rewards(scores, kl, mask, 0.1)
  want = -0.1 * kl * mask
  for i, (a, b) in enumerate(spans):
    if b > a:
      want[i, b - 1] += scores[i]
  np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
  assert not out[4].any()  # the empty row's score lands nowhere


def test_kl_estimators():
  lp, ref = np.array([-1.0, -0.2, -3.0]), np.array([-0.5, -0.9, -3.0])
  d = lp - ref
  np.testing.assert_allclose(gae.kl(lp, ref, "k1"), d, rtol=1e-12)
  np.testing.assert_allclose(gae.kl(lp, ref, "k3"), np.exp(-d) - 1 + d, rtol=1e-12)


# --- one update against TRL 1.12.0's PPOTrainer.train() ------------------------------------------------------------

N, L, C, PROMPT = 8, 6, 3, 4  # rows (TRL wants ≥ 8 to whiten rewards), completion length, TRL query, fmjax prompt
CASES = {
    "k1": dict(kl_coef=0.05, kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=0.95, cliprange=0.2,
               cliprange_value=0.2, vf_coef=0.1),
    "k3_whitened": dict(kl_coef=0.1, kl_estimator="k3", whiten_rewards=True, gamma=0.9, lam=0.8, cliprange=0.2,
                        cliprange_value=0.2, vf_coef=0.1),
    "k1_whitened_mc": dict(kl_coef=0.2, kl_estimator="k1", whiten_rewards=True, gamma=1.0, lam=1.0, cliprange=0.15,
                           cliprange_value=0.3, vf_coef=0.5),
    "k3": dict(kl_coef=0.03, kl_estimator="k3", whiten_rewards=False, gamma=0.99, lam=0.95, cliprange=0.1,
               cliprange_value=0.1, vf_coef=0.25),
}


def f32(x):
  return np.asarray(x, np.float32).astype(np.float64)


def rollout(seed, cfg):
  """N rows of L completion tokens (even rows end with EOS, odd rows have none), with ratios on both sides of the
  clip range and values that move past ε_v."""
  rng = np.random.default_rng(seed)
  responses = rng.integers(2, 4, (N, L))
  responses[::2, -1] = 1  # EOS (the reference script's id)
  old = rng.uniform(-3.0, -0.6, (N, L))
  log_ratio = rng.uniform(-0.5, 0.5, (N, L))
  for edge in (np.log1p(-cfg["cliprange"]), np.log1p(cfg["cliprange"])):  # keep ratios off the clip's edges
    near = np.abs(log_ratio - edge) < 0.01
    log_ratio[near] += 0.03
  values = rng.normal(size=(N, L))
  return {"queries": 100 + np.arange(N)[:, None] + np.zeros((1, C), np.int64), "responses": responses,
          "sampler_logps": f32(old), "ref_logps": f32(np.minimum(old + rng.normal(0, 0.4, (N, L)), -0.01)),
          "values": f32(values), "scores": f32(rng.normal(0, 2, N)), "new_logps": f32(old + log_ratio),
          "new_values": f32(values + rng.uniform(-0.5, 0.5, (N, L)))}


@pytest.fixture(scope="module")
def trl(tmp_path_factory):
  """{case: (inputs, TRL's outputs)}: every case in one subprocess (importing TRL takes seconds)."""
  path = trl_peer.trl_dir("1.12.0")  # CI reaches the package registry; an install failure fails these tests
  tmp = tmp_path_factory.mktemp("trl_ppo")
  inputs = {name: rollout(i, cfg) for i, (name, cfg) in enumerate(CASES.items())}
  with open(tmp / "cases.json", "w") as f:
    json.dump([{"name": name, "config": cfg} for name, cfg in CASES.items()], f)
  np.savez(tmp / "in.npz", **{f"{name}|{k}": v for name, x in inputs.items() for k, v in x.items()})
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, os.path.join(HERE, "trl_ppo_reference.py"), "cases.json", "in.npz",
                         "out.npz"], cwd=tmp, env={**env, "PYTHONPATH": path}, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = np.load(tmp / "out.npz")
  return {name: (inputs[name], {k.split("|", 1)[1]: out[k] for k in out.files if k.startswith(name + "|")})
          for name in CASES}


def fmjax_rows(x, seed=0):
  """The rollout as fmjax holds it: a PROMPT-token prompt (loss_mask 0, noise in every column) before the
  completion."""
  rng = np.random.default_rng(seed)
  pad = lambda a: np.concatenate([rng.normal(size=(N, PROMPT)), a], axis=1)  # noqa: E731
  mask = np.concatenate([np.zeros((N, PROMPT)), np.ones((N, L))], axis=1)
  return {"loss_mask": mask, "old_logps": pad(x["sampler_logps"]), "ref_logps": pad(x["ref_logps"]),
          "old_values": pad(x["values"]), "new_logps": pad(x["new_logps"]), "new_values": pad(x["new_values"])}


def fmjax_update(x, cfg, seed=0):
  """finish, then the token means of `losses` over the completion: what fmjax computes for this rollout."""
  opts = ppo.Options(**cfg)
  rows = fmjax_rows(x, seed)
  finished, metrics = ppo.finish(rows, x["scores"], opts)
  # float32 jax arrays, as in the head's jitted loss (numpy float64 operands would make `value − returns` a float64
  # difference beside a float32 `clipped − returns`, and an unclipped value could count as clipped by one ulp)
  j = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  per_token = ppo.losses(j(rows["new_logps"]), j(rows["old_logps"]), j(finished["advantages"]), j(rows["new_values"]),
                         j(rows["old_values"]), j(finished["returns"]), opts)
  mask = rows["loss_mask"]
  means = {k: float((np.asarray(v, np.float64) * mask).sum() / mask.sum()) for k, v in per_token.items()}
  return rows, finished, metrics, means, {k: np.asarray(v) for k, v in per_token.items()}


def close(got, want, what):
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("case", list(CASES))
def test_rewards_equal_trls(trl, case):
  x, want = trl[case]
  cfg = CASES[case]
  rows = fmjax_rows(x)
  mask = rows["loss_mask"]
  kl = gae.kl(rows["old_logps"], rows["ref_logps"], cfg["kl_estimator"]) * mask
  rewards = gae.rewards(x["scores"], kl, mask, cfg["kl_coef"])
  if cfg["whiten_rewards"]:  # TRL's rewards local is the whitened one then
    rewards = gae.whiten(rewards, mask, shift_mean=False)
  close(kl[:, PROMPT:], want["kl"], "kl")
  close(rewards[:, PROMPT:], want["rewards"], "rewards")
  assert not want["padding_mask"].any(), "the cross-check's rows must fill TRL's generation length"


@pytest.mark.parametrize("case", list(CASES))
def test_advantages_and_returns_equal_trls(trl, case):
  x, want = trl[case]
  _, finished, _, _, _ = fmjax_update(x, CASES[case])
  close(finished["advantages"][:, PROMPT:], want["advantages"], "advantages")
  close(finished["returns"][:, PROMPT:], want["returns"], "returns")


@pytest.mark.parametrize("case", list(CASES))
def test_losses_and_clip_fractions_equal_trls(trl, case):
  x, want = trl[case]
  cfg = CASES[case]
  _, finished, _, means, per_token = fmjax_update(x, cfg)
  for name, key in [("pg_loss", "loss/policy"), ("vf_loss", "loss/value"), ("pg_clipfrac", "policy/clipfrac"),
                    ("vf_clipfrac", "val/clipfrac"), ("approxkl", "policy/approxkl"), ("ratio", "val/ratio")]:
    close(means[key], want[name], f"{key} vs TRL's {name}")
  close(cfg["vf_coef"] * means["loss/value"] + means["loss/policy"], want["pg_loss"] + cfg["vf_coef"] * want["vf_loss"],
        "loss")
  # the case exercises both clips, and the policy clip in both directions, and no clip indicator is a near-tie
  # (which float32 rounding could flip on one side)
  assert 0 < want["pg_clipfrac"] < 1 and 0 < want["vf_clipfrac"] < 1, (want["pg_clipfrac"], want["vf_clipfrac"])
  clipped = per_token["policy/clipfrac"][:, PROMPT:] > 0
  ratio = per_token["val/ratio"][:, PROMPT:]
  assert (ratio[clipped] > 1 + cfg["cliprange"]).any() and (ratio[clipped] < 1 - cfg["cliprange"]).any()
  value, old_value, returns = x["new_values"], x["values"], finished["returns"][:, PROMPT:]
  moved = np.clip(value, old_value - cfg["cliprange_value"], old_value + cfg["cliprange_value"])
  assert (np.abs((moved - returns) ** 2 - (value - returns) ** 2)[moved != value] > 1e-4).all()
  assert (np.abs(finished["advantages"][:, PROMPT:]) > 1e-4).all()


@pytest.mark.parametrize("case", list(CASES))
def test_rollout_metrics_equal_trls(trl, case):
  x, want = trl[case]
  _, _, metrics, _, _ = fmjax_update(x, CASES[case])
  for key in ("objective/kl", "objective/non_score_reward", "objective/scores", "objective/rlhf_reward"):
    close(metrics[key], want[f"metric|{key}"], key)
  for name, key in [("pg_loss", "loss/policy_avg"), ("vf_loss", "loss/value_avg"),
                    ("pg_clipfrac", "policy/clipfrac_avg"), ("vf_clipfrac", "val/clipfrac_avg")]:
    close(want[f"metric|{key}"], want[name], f"TRL's logged {key} is its one micro-batch's {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_the_prompt_changes_nothing(case):
  x = rollout(0, CASES[case])
  _, a, metrics_a, means_a, _ = fmjax_update(x, CASES[case], seed=0)
  _, b, metrics_b, means_b, _ = fmjax_update(x, CASES[case], seed=1)  # other noise in the prompt's columns
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not a[k][:, :PROMPT].any(), k
  assert metrics_a == metrics_b and means_a == means_b
