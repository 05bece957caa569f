"""On-policy RL runs in the loop: rollouts from the current params (the sampler's log-probs, caching over μ steps),
gradient accumulation, LoRA policies, held-out reward evaluation, exact resume after a stop or SIGTERM, two
processes drawing the one-process rollout, and the standalone smoke run."""

import os

import jax
import numpy as np
import pytest

from fmjax import config_lib
from fmjax.model.token_stats import from_logits
from fmjax.rl import rewards
import from_config


def checksum(prompts, completions, **fields):
  """Varied rewards for a random policy's completions (sort_digits would give nearly all 0: no advantage)."""
  return [sum(map(ord, c)) % 7 / 7 for c in completions]


rewards.register("checksum", checksum)


def tiny(repo, **overrides):
  """A grpo run from random weights on the sort task with the byte tokenizer: no pre-training, seconds to build."""
  c = config_lib.load(f"{repo}/configs/grpo.py:smoke")
  c.objective.rewards = "checksum"
  c.init_from.bootstrap, c.data.tokenizer, c.data.tokenizer_source, c.model.vocab_size = "", "bytes", "", 384
  c.train.steps, c.train.batch_size, c.train.seq_len = 4, 8, 40
  c.objective.num_generations, c.objective.max_completion_length = 2, 6
  c.checkpoint.every_steps, c.log.every_steps = 2, 1
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def test_the_samplers_log_probs_are_the_training_forwards(repo):

  exp = from_config.build(tiny(repo, **{"objective.temperature": 0.7, "objective.sampler_correction": "token_mask"}),
                          devices=jax.devices()[:1])
  batch, made = exp.batch(exp.state, 1)
  assert made["completions/mean_length"] > 0 and "rewards/checksum/mean" in made
  logits = exp.run.model.apply({"params": exp.state.params}, batch["tokens"], batch["segment_ids"], batch["positions"])
  logp = from_logits(logits, batch["targets"], 0.7).logp
  mask = np.asarray(batch["loss_mask"]) > 0
  assert mask.sum() >= 8
  np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(batch["sampler_logps"])[mask], atol=1e-5)
  exp.rollout.steps = 2  # step 2 of a 2-step rollout trains on the same batch; step 3 draws a new one
  assert exp.batch(exp.state, 2) == (batch, {}) and exp.batch(exp.state, 3)[0] is not batch


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gradient_accumulation_equals_the_full_batch(repo, loss_type):
  from fmjax import sharding

  params = {}
  batch = None
  for accum in (1, 4):
    c = tiny(repo, **{"train.grad_accum": accum, "objective.loss_type": loss_type, "optimizer.name": "sgd",
                      "optimizer.schedule": "constant", "optimizer.lr": 1.0, "optimizer.clip_norm": 0.0,
                      "optimizer.weight_decay": 0.0, "optimizer.warmup_steps": 0})
    exp = from_config.build(c, devices=jax.devices()[:2])
    if batch is None:
      batch = jax.device_get(exp.batch(exp.state, 1)[0])
    state, _ = exp.run.step(exp.state, sharding.global_batch(batch, exp.run.mesh))
    params[accum] = jax.device_get(state.params)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
  a, b = flat(params[1]), flat(params[4])
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-6


@pytest.mark.slow
def test_an_rl_run_stopped_between_rollouts_resumes_to_the_straight_runs_params(repo, tmp_path):
  import fmjax
  from fmjax.train import loop

  over = {"objective.num_iterations": 2, "objective.kl_coef": 0.05}
  loop.train(tiny(repo, **over), str(tmp_path / "straight"))
  import json
  rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "straight" / "metrics.jsonl"))}
  assert rows[1]["kl"] < 1e-7 < 1e-4 < rows[3]["kl"]  # the reference is the starting policy: no KL before an update
  assert "reward" in rows[1] and "reward" not in rows[2]  # step 2 trains on step 1's rollout (μ = 2)
  loop.train(tiny(repo, **over, **{"train.stop_after": 1}), str(tmp_path / "split"))
  assert os.listdir(tmp_path / "split" / "checkpoints") == ["2"]  # the stop waits for the rollout's last step
  loop.train(tiny(repo, **over), str(tmp_path / "split"))
  for a, b in zip(jax.tree.leaves(fmjax.load(str(tmp_path / "straight")).params),
                  jax.tree.leaves(fmjax.load(str(tmp_path / "split")).params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


SIGTERM_REWARD = '''
import os, signal
calls = 0
def reward(prompts, completions, **fields):
  global calls
  calls += 1
  if calls == 3 and os.environ.get("SIGTERM_AT_3"):
    os.kill(os.getpid(), signal.SIGTERM)  # during step 3's rollout
  return [sum(map(ord, c)) % 7 / 7 for c in completions]  # varied rewards for a random policy
'''


@pytest.mark.slow
def test_sigterm_during_a_rollout_saves_and_the_rerun_resumes_exactly(repo, tmp_path, cpu_env):
  import subprocess
  import sys

  import fmjax

  (tmp_path / "my_reward.py").write_text(SIGTERM_REWARD)
  flags = ["--config.init_from.bootstrap=", "--config.data.tokenizer=bytes", "--config.data.tokenizer_source=",
           "--config.model.vocab_size=384",
           "--config.train.steps=4", "--config.train.batch_size=8", "--config.train.seq_len=40",
           "--config.objective.num_generations=2", "--config.objective.max_completion_length=6",
           "--config.checkpoint.every_steps=10", "--config.objective.rewards=my_reward:reward"]
  env = {**cpu_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

  def run(workdir, **extra):
    return subprocess.run([sys.executable, "-m", "fmjax.main", f"--config={repo}/configs/grpo.py:smoke", *flags,
                           f"--workdir={workdir}"], env={**env, **extra}, cwd=repo, capture_output=True, text=True,
                          timeout=300)

  straight = run(tmp_path / "straight")
  assert straight.returncode == 0, straight.stderr[-2000:]
  stopped = run(tmp_path / "split", SIGTERM_AT_3="1")
  assert stopped.returncode == 0, stopped.stderr[-2000:]
  assert "saved step 3" in stopped.stderr and os.listdir(tmp_path / "split" / "checkpoints") == ["3"]
  resumed = run(tmp_path / "split")
  assert resumed.returncode == 0 and "resuming from step 3" in resumed.stderr, resumed.stderr[-2000:]
  first = fmjax.load(str(tmp_path / "split"), step=3).params
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
      jax.tree.leaves(first), jax.tree.leaves(fmjax.load(str(tmp_path / "split")).params)))  # step 4 trained
  for a, b in zip(jax.tree.leaves(fmjax.load(str(tmp_path / "straight")).params),
                  jax.tree.leaves(fmjax.load(str(tmp_path / "split")).params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_held_out_rewards_score_greedy_completions_like_a_rollout():
  from fmjax import sample
  from fmjax.api import Model
  from fmjax.data import ByteTokenizer, formats, open_source
  from fmjax.evaluation import rewards as evaluation
  from fmjax.model import ModelConfig, Transformer, init_params
  from fmjax.rl import tasks

  cfg = ModelConfig(vocab_size=384)
  model = Model(cfg, init_params(cfg, jax.random.PRNGKey(3)), ByteTokenizer())
  records = [open_source("embedded:sort", "validation")[i] for i in range(6)]
  result = evaluation.evaluate(model, records, "sort_exact,sort_digits:0.5", max_new_tokens=5)
  enc = formats.Encoder("prompt_completion", model.tokenizer)
  apply = lambda p, t, s, q: Transformer(cfg).apply({"params": p}, t, s, q)  # noqa: E731
  outs = sample.greedy(apply, model.params, [enc.prompt_ids(r) for r in records], 5, stop_ids=[2])
  texts = [model.tokenizer.decode([i for i in o if i != 2]) for o in outs]
  prompts = [r["prompt"] for r in records]
  exact, digits = tasks.sort_exact(prompts, texts), tasks.sort_digits(prompts, texts)
  assert result.prompts == 6 and result.means == pytest.approx({"sort_exact": np.mean(exact),
                                                                "sort_digits": np.mean(digits)})
  assert result.total == pytest.approx(np.mean(exact) + 0.5 * np.mean(digits))
  assert result.mean_length == pytest.approx(np.mean([len(o) for o in outs]))


def test_a_lora_policy_rolls_out_over_its_base_and_its_reference_is_the_base(repo):

  exp = from_config.build(tiny(repo, **{"lora.rank": 4, "objective.kl_coef": 0.05}), devices=jax.devices()[:1])
  assert "reference" not in exp.state.frozen and exp.state.base is not None  # no second copy of the weights
  state, metrics = exp.run.step(exp.state, exp.batch(exp.state, 1)[0])
  assert float(metrics["kl"]) < 1e-7  # LoRA's B starts at 0: the policy is the base
  for step in (2, 3):
    state, metrics = exp.run.step(state, exp.batch(state, step)[0])
  assert float(metrics["kl"]) > 1e-6 and jax.tree.leaves(state.params)  # the adapters moved off the base


@pytest.mark.slow
def test_grpo_smoke_runs_standalone_pretrain_sft_then_rl(repo, tmp_path, cpu_env):
  import json
  import subprocess
  import sys

  proc = subprocess.run([sys.executable, "-m", "fmjax.main", "--config=configs/grpo.py:smoke",
                         f"--workdir={tmp_path}"], cwd=repo, env=cpu_env(), capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.path.isdir(tmp_path / "base" / "base" / "checkpoints")  # pre-training, then SFT on the task, then RL
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 21))
  for r in rows:
    assert -1 <= r["reward"] <= 1 and 0 <= r["completions/terminated"] <= 1 and r["rollout_seconds"] > 0
    split = r["rollout_seconds_per_step"] + r["train_seconds_per_step"]  # the step's time, in two parts
    assert r["train_seconds_per_step"] > 0 and split == pytest.approx(32 * 48 / r["tokens_per_sec"], rel=1e-6)
  assert "| reward " in proc.stderr


TINY_FLAGS = ["--config.init_from.bootstrap=", "--config.data.tokenizer=bytes", "--config.data.tokenizer_source=",
              "--config.model.vocab_size=384", "--config.train.steps=2", "--config.train.batch_size=8",
              "--config.train.seq_len=40", "--config.objective.num_generations=2",
              "--config.objective.max_completion_length=6", "--config.log.peak_flops=1e9",
              "--config.objective.rewards=sort_digits,my_reward:reward"]


@pytest.mark.slow
def test_two_processes_draw_the_one_process_rollout(repo, tmp_path, cpu_env):
  """2 processes × 2 devices sample the same global rollout and keep their own rows: step 1's rollout metrics equal
  a 1-process run's on 4 devices."""
  import json
  import socket
  import subprocess
  import sys

  (tmp_path / "my_reward.py").write_text(SIGTERM_REWARD)
  env = {**cpu_env(2), "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  base = [sys.executable, "-m", "fmjax.main", f"--config={repo}/configs/grpo.py:smoke", *TINY_FLAGS]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  one = subprocess.run([*base, f"--workdir={tmp_path / 'one'}"], cwd=repo,
                       env={**cpu_env(4), "PYTHONPATH": env["PYTHONPATH"]}, capture_output=True, text=True,
                       timeout=300)
  assert one.returncode == 0, one.stderr[-2000:]
  logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(2)]  # a full pipe would stall a collective
  procs = [subprocess.Popen([*base, f"--workdir={tmp_path / 'two'}", f"--coordinator_address=localhost:{port}",
                             "--num_processes=2", f"--process_id={i}", "--distributed_timeout=300"], cwd=repo,
                            env=env, stdout=subprocess.DEVNULL, stderr=logs[i]) for i in range(2)]
  codes = [p.wait(timeout=400) for p in procs]
  assert codes == [0, 0], (tmp_path / "process_0.log").read_text()[-2000:]
  rows = {name: json.loads(open(tmp_path / name / "metrics.jsonl").readline()) for name in ("one", "two")}
  for key in ("reward", "rewards/my_reward:reward/mean", "rewards/sort_digits/mean", "completions/mean_length",
              "completions/terminated"):
    assert rows["two"][key] == rows["one"][key], key
  assert rows["two"]["loss"] == pytest.approx(rows["one"]["loss"], rel=1e-5, abs=1e-7)
