"""PPO and online DPO runs in the loop: the rollout's prepared columns are the trainer's own passes under the
sampling params, minibatches cover the rollout once per epoch, a run stopped between rollouts resumes bitwise (PPO
with a value head over the trunk, with a separate critic, under LoRA; online DPO full and LoRA), and 2 processes × 2
devices train as 1 × 4. Their arithmetic against TRL: tests/test_ppo.py, tests/test_online_dpo.py."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config_lib
from test_rl_runs import checksum  # noqa: F401  (registers the 'checksum' reward: varied rewards for a random policy)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


SHAPES = {  # per config: optimizer steps per rollout, and a tiny shape
    "ppo": {"objective.num_ppo_epochs": 2, "objective.num_mini_batches": 2, "train.steps": 8,
            "checkpoint.every_steps": 4},
    "online_dpo": {"train.steps": 4, "checkpoint.every_steps": 2}}


def tiny(repo, config="ppo", **overrides):
  """A run of configs/<config>.py from random weights on the sort task with the byte tokenizer: no pre-training,
  seconds to build."""
  c = config_lib.load(f"{repo}/configs/{config}.py:smoke")
  c.init_from.bootstrap, c.data.tokenizer, c.data.tokenizer_source, c.model.vocab_size = "", "bytes", "", 384
  c.train.batch_size, c.train.seq_len = 8, 40
  c.objective.max_completion_length, c.objective.rewards, c.log.every_steps = 6, "checksum", 1
  for key, value in {**SHAPES[config], **overrides}.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.mark.parametrize("critic", ["trunk", "separate"])
def test_a_rollouts_prepared_columns_are_the_trainers_passes_and_minibatches_cover_it(repo, critic):
  from fmjax.objectives.base import PARTS
  from fmjax.rl import gae
  from fmjax.train import frozen
  import from_config

  exp = from_config.build(tiny(repo, **{"objective.critic": critic}), devices=jax.devices()[:1])
  batch, made = exp.batch(exp.state, 1)
  assert {"objective/kl", "val/explained_variance", "val/returns", "reward"} <= set(made)
  rows = exp.rollout.rows
  assert len(rows["tokens"]) == 16  # minibatches × train.batch_size
  mask = rows["loss_mask"] > 0
  assert mask.sum() >= 8
  # the trainer's log-probs under the sampling params, at the sampling temperature, and the critic's values
  ctx = frozen.make_context(exp.run.model, exp.run.frozen_plan)(exp.state.base, exp.state.frozen)
  whole = {k: np.asarray(v) for k, v in rows.items()}
  stats, parts = ctx.forward(exp.state.params, whole, float(exp.run.spec.options.temperature),
                             parts=(exp.run.head.parts[0].name,))
  np.testing.assert_allclose(np.asarray(stats.logp)[mask], rows["old_logps"][mask], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(parts[exp.run.head.parts[0].name])[mask], rows["old_values"][mask],
                             rtol=1e-5, atol=1e-6)
  assert np.all(rows["ref_logps"][mask] == rows["old_logps"][mask])  # the reference is the starting policy
  assert PARTS in exp.state.params
  # returns = the (unwhitened) GAE advantages + the values; the advantages trained on are those whitened
  np.testing.assert_allclose(rows["advantages"], gae.whiten(rows["returns"] - rows["old_values"], mask), atol=1e-5)
  assert np.all(rows["returns"][~mask] == 0) and np.std(rows["returns"][mask]) > 0
  # minibatch k of an epoch: batch_size rows; each epoch's minibatches hold every row once
  for epoch in range(2):
    seen = []
    for part in range(2):
      mb = exp.rollout._minibatch(epoch * 2 + part)
      assert mb["tokens"].shape == (8, 40)
      seen += [bytes(np.asarray(r)) for r in np.asarray(mb["tokens"])]
    assert sorted(seen) == sorted(bytes(r) for r in rows["tokens"])
  assert exp.batch(exp.state, 2)[1] == {}  # steps 2-4 train on step 1's rollout; step 5 draws a new one
  assert "reward" in exp.batch(exp.state, 5)[1]


RUNS = [("ppo", {}), ("ppo", {"objective.critic": "separate"}), ("ppo", {"lora.rank": 4}), ("online_dpo", {}),
        ("online_dpo", {"lora.rank": 4})]


@pytest.mark.slow
@pytest.mark.parametrize("config,variant", RUNS)
def test_a_run_stopped_between_rollouts_resumes_to_the_straight_runs_params(repo, tmp_path, config, variant):
  import fmjax
  from fmjax.train import loop

  loop.train(tiny(repo, config, **variant), str(tmp_path / "straight"))
  rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "straight" / "metrics.jsonl"))}
  every = 4 if config == "ppo" else 1  # ppo: 2 epochs × 2 minibatches per rollout
  assert all(("reward" in rows[s]) == ((s - 1) % every == 0) for s in rows)
  if config == "ppo":
    assert rows[1]["objective/kl"] == 0 != rows[5]["objective/kl"]  # the reference is the starting policy (k1: ±)
    assert {"loss/value", "val/explained_variance", "policy/approxkl", "val/clipfrac"} <= set(rows[5])
  else:
    assert {"rewards/accuracies", "rewards/margins", "objective/kl"} <= set(rows[2])
  loop.train(tiny(repo, config, **variant, **{"train.stop_after": 1}), str(tmp_path / "split"))
  assert os.listdir(tmp_path / "split" / "checkpoints") == [str(every)]  # a stop waits for the rollout's last step
  loop.train(tiny(repo, config, **variant), str(tmp_path / "split"))
  straight, split = fmjax.load(str(tmp_path / "straight")).params, fmjax.load(str(tmp_path / "split")).params
  assert ("parts" in straight) == (config == "ppo")
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(split)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ppo", "online_dpo"])
def test_two_processes_train_as_one(repo, tmp_path, cpu_env, config):
  """2 processes × 2 devices sample the one global rollout, keep their own rows of each minibatch and train as one
  process on 4 devices: every logged step's rollout metrics and loss are the 1-process run's."""
  import socket
  import subprocess
  import sys

  flags = [f"--config.{k}={v}" for k, v in {"init_from.bootstrap": "", "data.tokenizer": "bytes",
                                             "data.tokenizer_source": "", "model.vocab_size": 384,
                                             "train.batch_size": 8, "train.seq_len": 40,
                                             "objective.max_completion_length": 6, "log.peak_flops": 1e9,
                                             "objective.rewards": "sort_digits,checksum_module:checksum",
                                             **SHAPES[config], "train.steps": 5 if config == "ppo" else 2}.items()]
  (tmp_path / "checksum_module.py").write_text("def checksum(prompts, completions, **fields):\n"
                                               "  return [sum(map(ord, c)) % 7 / 7 for c in completions]\n")
  path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
  base = [sys.executable, "-m", "fmjax.main", f"--config={repo}/configs/{config}.py:smoke", *flags]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  one = subprocess.run([*base, f"--workdir={tmp_path / 'one'}"], cwd=repo, env={**cpu_env(4), "PYTHONPATH": path},
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-2000:]
  logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(2)]  # a full pipe would stall a collective
  procs = [subprocess.Popen([*base, f"--workdir={tmp_path / 'two'}", f"--coordinator_address=localhost:{port}",
                             "--num_processes=2", f"--process_id={i}", "--distributed_timeout=300"], cwd=repo,
                            env={**cpu_env(2), "PYTHONPATH": path}, stdout=subprocess.DEVNULL, stderr=logs[i])
           for i in range(2)]
  codes = [p.wait(timeout=400) for p in procs]
  assert codes == [0, 0], (tmp_path / "process_0.log").read_text()[-2000:]
  rows = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("one", "two")}
  assert len(rows["one"]) == len(rows["two"]) >= 2
  rollout_keys = ("reward", "completions/mean_length", "objective/scores") + (
      ("val/explained_variance", "val/returns") if config == "ppo" else ())
  for a, b in zip(rows["one"], rows["two"]):
    for key in rollout_keys:
      if key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), a["step"]
  assert "reward" in rows["one"][-1] and rows["one"][-1]["step"] > 1  # a second rollout, after an update


@pytest.mark.parametrize("penalty", ["reward", "loss"])
def test_the_kl_penalty_is_in_the_reward_or_in_the_loss(penalty):
  """'reward': −β·kl_t in each token's reward, none in the loss; 'loss': the rewards are the scores alone and β·k3 to
  the reference (grpo's term) joins the token mean, with its gradient. Float64 references."""
  from fmjax import objectives
  from fmjax.model.token_stats import TokenStats
  from fmjax.objectives import LossContext, ppo
  from fmjax.rl import gae

  rng = np.random.default_rng(3)
  B, T, beta = 3, 6, 0.3
  mask = (np.arange(T)[None] >= np.array([[1], [2], [3]])).astype(np.float64)
  old, ref, logp = rng.normal(-1, 0.3, (3, B, T))
  values, new_values = rng.normal(size=(2, B, T))
  head_cfg = objectives.resolve({**objectives.section("ppo"), "kl_coef": beta, "kl_penalty": penalty})
  scores = rng.normal(size=B)
  rows = {"loss_mask": mask, "old_logps": old, "ref_logps": ref, "old_values": values}
  finished, metrics = ppo.finish(rows, scores, head_cfg)
  kl_coef = beta if penalty == "reward" else 0.0
  adv, returns = gae.advantages(gae.rewards(scores, (old - ref) * mask, mask, kl_coef), values, mask, 1.0, 0.95)
  np.testing.assert_allclose(finished["returns"], returns, rtol=1e-12)
  assert metrics["objective/kl"] == pytest.approx(((old - ref) * mask).sum(1).mean())  # logged either way
  head = objectives.get({**objectives.section("ppo"), "kl_coef": beta, "kl_penalty": penalty})
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  batch = {"loss_mask": f32(mask), "old_logps": f32(old), "ref_logps": f32(ref), "old_values": f32(values),
           "advantages": f32(finished["advantages"]), "returns": f32(finished["returns"])}

  def forward(params, inputs, temperature, extra, parts):
    return TokenStats(logp=f32(logp), logz=jnp.zeros((B, T)), entropy=jnp.zeros((B, T))), {parts[0]: f32(new_values)}

  loss_sum, weight, _ = head.loss(None, batch, LossContext(apply=None, forward_fn=forward))
  ratio, a = np.exp(logp - old), finished["advantages"]
  policy = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2))
  clipped = np.clip(new_values, values - 0.2, values + 0.2)
  value = 0.5 * np.maximum((new_values - finished["returns"]) ** 2, (clipped - finished["returns"]) ** 2)
  k3 = np.exp(ref - logp) - (ref - logp) - 1
  want = policy + 0.1 * value + (beta * k3 if penalty == "loss" else 0.0)
  np.testing.assert_allclose(float(loss_sum), (want * mask).sum(), rtol=1e-5)
  assert float(weight) == mask.sum()


@pytest.mark.slow
def test_a_separate_critic_starts_from_a_reward_models_run_or_the_policys_start(repo, tmp_path):
  """critic_init=a reward model's run: every critic weight is that run's (its score head too); with none, the run the
  policy starts from, at the policy's step, gives every weight but the score head, which it lacks."""
  import fmjax
  from fmjax.data import tokenizers
  from fmjax.train import init_from, loop
  import from_config

  def tiny_run(config, workdir, **over):
    c = config_lib.load(f"{repo}/configs/{config}")
    c.init_from.bootstrap, c.data.tokenizer, c.data.tokenizer_source, c.model.vocab_size = "", "bytes", "", 384
    c.train.steps, c.train.batch_size, c.train.seq_len, c.checkpoint.every_steps = 2, 8, 40, 2
    c.eval.every_steps, c.eval.at_start, c.data.source = 0, False, "embedded:sort_pairs"
    c.optimizer.warmup_steps = 0
    for key, value in over.items():
      c[key.split(".")[0]][key.split(".")[1]] = value
    loop.train(c, str(tmp_path / workdir))
    return str(tmp_path / workdir), fmjax.load(str(tmp_path / workdir)).params

  rm_dir, rm = tiny_run("reward.py:smoke", "rm")
  lm_dir, _ = tiny_run("sft.py:smoke", "lm", **{"data.source": "embedded:sort", "train.steps": 4})
  lm = fmjax.load(lm_dir, step=2).params  # the step the policy starts from, not the run's newest
  def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

  for source, critic_init, want in ((lm_dir, rm_dir, rm), (lm_dir, "", lm)):
    exp = from_config.build(tiny(repo, **{"objective.critic": "separate", "objective.critic_init": critic_init}),
                            devices=jax.devices()[:1])
    fresh = flat(exp.state.params["parts"]["critic"]["net"])
    state = init_from.start_parts(exp.state, exp.run.state_shardings, exp.run.frozen_plan.parts, source, 2,
                                  {"id": tokenizers.tokenizer_id(exp.run.tokenizer)})
    got, theirs = flat(state.params["parts"]["critic"]["net"]), flat(want)
    for path, value in got.items():
      if path in theirs:
        np.testing.assert_array_equal(value, theirs[path], err_msg=path)
      else:  # the language model has no score head: the critic's stays as initialised
        assert "score" in path and not critic_init
        np.testing.assert_array_equal(value, fresh[path])
    score = [p for p in got if "score" in p]
    assert score and sum(p in theirs for p in got) == len(got) - (0 if critic_init else len(score))
