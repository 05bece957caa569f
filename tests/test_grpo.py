"""On-policy RL: advantages, the clipped surrogate with k3 KL under each normaliser (float64 formulas, TRL's own
loss code), the sampler's log-probs, gradient accumulation, and RL runs stopped and resumed."""

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
from fmjax.objectives import grpo
from fmjax.rl import advantages, rewards, rollout

V = 11


def grpo_cfg(**kw):
  c = config_lib.base().objective
  c.name = "grpo"
  for k, v in kw.items():
    c[k] = v
  return c


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
  rows = rollout.rows(prompts, comps, [np.zeros(k, np.float32) for k in lengths], adv, np.ones(n, bool), width)
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

def trl_loss(loss_type, logp, old, ref, adv, mask, beta, eps_low, eps_high, max_len):
  torch = pytest.importorskip("torch")
  from trl.trainer.grpo_trainer import GRPOTrainer

  t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
  B, C = logp.shape
  stub = types.SimpleNamespace(
      _get_per_token_logps_and_entropies=lambda *a, **k: (t(logp), torch.zeros(B, C, dtype=torch.float64), None),
      top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
      args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
      loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
      vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
      current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
      aux_loss_enabled=False, _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
      accelerator=types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x))
  inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
            "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": t(mask),
            "advantages": t(adv), "old_per_token_logps": t(old), "ref_per_token_logps": t(ref),
            "num_items_in_batch": t(mask).sum()}
  return float(GRPOTrainer._compute_loss(stub, None, inputs))


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_the_loss_equals_trls_grpo_trainer_loss(loss_type):
  pytest.importorskip("trl")
  rng = np.random.default_rng(5)
  B, C = 6, 7
  logp, ref = -rng.uniform(0.1, 3, (B, C)), -rng.uniform(0.1, 3, (B, C))
  old = logp + rng.normal(scale=0.3, size=(B, C))  # ratios on both sides of the clip range
  adv = rng.normal(size=B)
  mask = (np.arange(C)[None] < rng.integers(1, C + 1, B)[:, None]).astype(np.float64)
  cfg = grpo_cfg(kl_coef=0.04, epsilon_low=0.2, epsilon_high=0.28, num_iterations=2, loss_type=loss_type)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  per_token, _ = grpo.policy_loss(f32(logp), f32(old), f32(ref), f32(np.repeat(adv[:, None], C, 1)), f32(mask), cfg)
  total, weight = grpo.normalise(per_token, f32(mask), jnp.ones(B), loss_type, C)
  want = trl_loss(loss_type, logp, old, ref, adv, mask, 0.04, 0.2, 0.28, C)
  np.testing.assert_allclose(float(total / weight), want, rtol=2e-6)


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


def test_sort_rewards():
  from fmjax.rl import tasks
  p = "Sort: 3 1 2\n"
  assert tasks.sort_exact([p, p], ["1 2 3", "1 3 2"]) == [1.0, 0.0]
  np.testing.assert_allclose(tasks.sort_digits([p, p, p], ["1 2 3", "1 3 2", "1 2 3 4 5"]), [1.0, 1 / 3, 0.8])


# --- rollouts in the loop -------------------------------------------------------------------------------------------

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
  from fmjax.train import experiment

  exp = experiment.build(tiny(repo, **{"objective.temperature": 0.7}), devices=jax.devices()[:1])
  batch, made = exp.batch(exp.state, 1)
  assert made["completions/mean_length"] > 0 and "rewards/checksum/mean" in made
  logits = exp.model.apply({"params": exp.state.params}, batch["tokens"], batch["segment_ids"], batch["positions"])
  logp, _ = grpo.token_logps(logits, batch["targets"], 0.7)
  mask = np.asarray(batch["loss_mask"]) > 0
  assert mask.sum() >= 8
  np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(batch["old_logps"])[mask], atol=1e-5)
  exp.rollout.iterations = 2  # step 2 of a 2-step rollout trains on the same batch; step 3 draws a new one
  assert exp.batch(exp.state, 2) == (batch, {}) and exp.batch(exp.state, 3)[0] is not batch


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gradient_accumulation_equals_the_full_batch(repo, loss_type):
  from fmjax import sharding
  from fmjax.train import experiment

  params = {}
  batch = None
  for accum in (1, 4):
    c = tiny(repo, **{"train.grad_accum": accum, "objective.loss_type": loss_type, "optimizer.name": "sgd",
                      "optimizer.schedule": "constant", "optimizer.lr": 1.0, "optimizer.clip_norm": 0.0,
                      "optimizer.weight_decay": 0.0, "optimizer.warmup_steps": 0})
    exp = experiment.build(c, devices=jax.devices()[:2])
    if batch is None:
      batch = jax.device_get(exp.batch(exp.state, 1)[0])
    state, _ = exp.step(exp.state, sharding.global_batch(batch, exp.mesh))
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
  from fmjax.train import experiment

  exp = experiment.build(tiny(repo, **{"lora.rank": 4, "objective.kl_coef": 0.05}), devices=jax.devices()[:1])
  assert "reference" not in exp.state.frozen and "base" in exp.state.frozen  # no second copy of the weights
  state, metrics = exp.step(exp.state, exp.batch(exp.state, 1)[0])
  assert float(metrics["kl"]) < 1e-7  # LoRA's B starts at 0: the policy is the base
  for step in (2, 3):
    state, metrics = exp.step(state, exp.batch(state, step)[0])
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
