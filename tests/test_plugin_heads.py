"""Heads defined outside the package (tests/plugin_heads.py), with no edit to fmjax/: a head with its own option keys
set from the command line, and an actor-critic head with a value head over the trunk and its own rollout spec. Both
train through `python -m fmjax.main`, resume exactly after a stop, and compile ahead of time for a TPU slice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import plugin_heads
from fmjax import config_lib, objectives, spec
from fmjax.errors import UserError
from fmjax.model.token_stats import TokenStats
from fmjax.objectives import LossContext

CONFIG = "tests/plugin_config.py"


def _main(repo, env, head: str, workdir, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "fmjax.main", f"--config={CONFIG}:head={head}", f"--workdir={workdir}",
                         *flags], cwd=repo, capture_output=True, text=True, timeout=600, env=env)


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


def _straight_and_resumed(repo, env, tmp_path, head: str, *flags: str) -> dict[int, float]:
  """The losses of a straight 6-step run, checked equal to those of a run stopped after step 3 and resumed."""
  straight, split = tmp_path / f"{head}-straight", tmp_path / f"{head}-split"
  for args in ((straight,), (split, "--config.train.stop_after=3"), (split,)):
    proc = _main(repo, env, head, *args, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from step 3" in proc.stderr
  want = _losses(straight)
  assert sorted(want) == list(range(1, 7))
  assert _losses(split) == want  # bitwise: the same machine, the same programs
  return want


def test_an_outside_heads_options_are_checked_and_its_loss_matches_a_float64_reference():
  logits = np.random.default_rng(0).normal(size=(2, 3, 5))
  targets = np.array([[1, 2, 0], [4, 4, 3]])
  mask = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
  head = objectives.get({"name": "smoothed_lm", "smoothing": 0.3})
  ctx = LossContext(apply=lambda p, b: jnp.asarray(logits, jnp.float32))
  loss_sum, weight, metrics = head.loss(None, {"targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask)}, ctx)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  want = ((0.7 * nll - 0.3 * logp.mean(-1)) * mask).sum()
  np.testing.assert_allclose(float(loss_sum), want, rtol=1e-6)
  assert float(weight) == 4.0 and abs(float(metrics["nll"]) - (nll * mask).sum()) < 1e-5
  with pytest.raises(UserError, match=r"objective.smoothing=1.0 must be in \[0, 1\)"):
    objectives.get({"name": "smoothed_lm", "smoothing": 1.0})
  with pytest.raises(UserError, match=r"objective.beta is not an option of the head 'smoothed_lm' \(its options: "
                                      r"smoothing\)"):
    objectives.get({"name": "smoothed_lm", "beta": 0.1})


def test_the_actor_critic_loss_matches_a_float64_reference():
  rng = np.random.default_rng(1)
  logp, value, returns = rng.normal(size=(3, 2, 4))
  mask = np.array([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
  head = objectives.get({**objectives.section("reinforce_value"), "value_coef": 0.25})
  seen = {}

  def forward(params, inputs, temperature, extra, parts):
    seen["parts"] = parts
    return TokenStats(logp=jnp.asarray(logp, jnp.float32), logz=jnp.zeros((2, 4))), {
        "value": jnp.asarray(value, jnp.float32)}

  batch = {"loss_mask": jnp.asarray(mask), "returns": jnp.asarray(returns, jnp.float32)}
  loss_sum, weight, metrics = head.loss(None, batch, LossContext(apply=None, forward_fn=forward))
  want = ((-(returns - value) * logp + 0.25 * (value - returns) ** 2) * mask).sum()
  np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["value_loss"]), (((value - returns) ** 2) * mask).sum(), rtol=1e-5)
  assert float(weight) == 5.0 and seen["parts"] == ("value",)
  assert head.rollout.batch_columns == ("returns",) and head.layouts == ("rollouts",)
  np.testing.assert_array_equal(head.rollout.per_completion(np.array([0.5, 1.0]), 2)["returns"], [0.5, 1.0])


@pytest.mark.slow
def test_a_head_with_its_own_options_trains_from_the_command_line_resumes_and_refuses_a_wrong_key(
    repo, tmp_path, cpu_env):
  env = cpu_env(1)
  losses = _straight_and_resumed(repo, env, tmp_path, "smoothed_lm", "--config.objective.smoothing=0.2")
  assert losses[6] < losses[1]
  assert json.load(open(tmp_path / "smoothed_lm-straight" / "config.json"))["objective"] == {
      "name": "smoothed_lm", "smoothing": 0.2}
  proc = _main(repo, env, "smoothed_lm", tmp_path / "wrong", "--config.objective.smoothin=0.2")
  assert proc.returncode == 2 and not os.path.exists(tmp_path / "wrong")
  lines = [line for line in proc.stderr.splitlines() if line.startswith("fmjax: error:")]
  assert len(lines) == 1 and "'smoothin'" in lines[0] and "head 'smoothed_lm'" in lines[0] \
      and "has: smoothing" in lines[0], proc.stderr[-2000:]


@pytest.mark.slow
def test_an_actor_critic_head_trains_its_value_head_on_its_own_rollouts_and_resumes_exactly(repo, tmp_path, cpu_env):
  _straight_and_resumed(repo, cpu_env(1), tmp_path, "reinforce_value")
  rows = [json.loads(line) for line in open(tmp_path / "reinforce_value-straight" / "metrics.jsonl")]
  assert all("value_loss" in r and "reward" in r for r in rows)
  state = os.path.join(tmp_path, "reinforce_value-straight", "checkpoints", "6", "state")
  parts = ocp.PyTreeCheckpointer().restore(state)["params"]["parts"]
  assert np.abs(np.asarray(parts["value"]["kernel"])).max() > 0  # it starts at zero: the value head trained


@pytest.mark.parametrize("head", ["smoothed_lm", "reinforce_value"])
def test_outside_heads_compile_for_v5p_8(repo, head, v5p_8):
  from fmjax.train import aot

  topo, devices = v5p_8
  config = config_lib.load(os.path.join(repo, f"{CONFIG}:head={head}"))
  assert aot.analyse(config, topo, devices=devices, cost=False).verdict == "fits"
  if head == "reinforce_value":
    step = aot.plan(spec.resolve(config), devices, {})
    assert set(step.state.params["parts"]) == {plugin_heads.VALUE.name}
