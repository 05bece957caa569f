"""Online DPO (`online_dpo`): the judged pair's loss, gradient and metrics equal TRL 1.16's OnlineDPOTrainer
training_step run on stubs, for sigmoid and ipo and under gradient accumulation (the pair's rows in different
micro-batches); the judge's chosen selection; the options; the standalone smoke run."""

import collections
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config_lib, objectives
from fmjax.errors import UserError
from fmjax.model.token_stats import TokenStats
from fmjax.objectives import LossContext, online_dpo
from fmjax.train import rollout

PROMPT = 2  # tokens per prompt: completion token j of row i is at position PROMPT - 1 + j


def odpo_cfg(**kw):
  return config_lib.use_head(config_lib.base(), "online_dpo", **kw)


def judged_rows(scores, lengths, width, seed=0):
  """The rollout rows of pairs (rows 2k, 2k+1) with the judge's columns and a `row` id column."""
  rng = np.random.default_rng(seed)
  n = len(lengths)
  prompts = [rng.integers(2, 9, PROMPT) for _ in range(n // 2) for _ in range(2)]
  comps = [rng.integers(2, 9, k) for k in lengths]
  rows = rollout.rows(prompts, comps, np.ones(n, bool), width, online_dpo.judge(np.asarray(scores)))
  rows["row"] = np.broadcast_to(np.arange(n)[:, None], (n, width)).astype(np.int32)
  return {k: jnp.asarray(v) for k, v in rows.items()}


def stub_context(ref_BxT):
  """Per-token log-probs as the 'params' (the trained model's) and `ref_BxT` (the reference's), indexed by each row's
  id, so a micro-batch of any rows reads its own."""
  zeros = lambda x: jnp.zeros_like(x)  # noqa: E731
  stats = lambda params, inputs, temperature=1.0, extra=(): TokenStats(  # noqa: E731
      params[inputs["row"][:, 0]], zeros(inputs["loss_mask"]))
  ref = lambda inputs, temperature=1.0, extra=(): TokenStats(ref_BxT[inputs["row"][:, 0]],  # noqa: E731
                                                             zeros(inputs["loss_mask"]))
  return LossContext(apply=None, stats=stats, frozen_stats_fns={"reference": ref})


def accumulated(head, params, batch, ctx, n):
  """(loss, metrics) as the train step makes them with train.grad_accum = n: micro-batch i = rows i, i+n, ..."""
  batch = {**batch, **online_dpo.prepare(params, batch, ctx)}
  total, weight, sums = 0.0, 0.0, collections.Counter()
  for i in range(n):
    s, w, m = head.loss(params, {k: v[i::n] for k, v in batch.items()}, ctx)
    total, weight = total + s, weight + w
    sums.update({k: v for k, v in m.items()})
  return total / weight, {k: v / weight for k, v in sums.items()}


# --- TRL's own code ---------------------------------------------------------------------------------------------------

def trl_step(loss_type, beta, logp, ref, mask, scores, eos_rows, penalty):
  """TRL OnlineDPOTrainer.training_step on stubs: its completions are [first of each prompt; second of each], with
  per-token log-probs `logp` / `ref` [2P, C] and masks; `eos_rows` marks completions holding an EOS. Returns (loss,
  d loss / d logp, stats)."""
  torch = pytest.importorskip("torch")
  from trl.experimental.online_dpo.online_dpo_trainer import OnlineDPOTrainer

  t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
  n, C = logp.shape
  policy = t(logp).requires_grad_(True)
  ids = torch.full((n, C), 5, dtype=torch.long)
  ids[torch.tensor(eos_rows), C - 1] = 1  # EOS id 1
  calls = iter([policy, t(ref)])
  stub = types.SimpleNamespace(
      args=types.SimpleNamespace(use_vllm=False, missing_eos_penalty=penalty, loss_type=loss_type,
                                 torch_empty_cache_steps=None, optim="adamw_torch", n_gpu=1,
                                 gradient_accumulation_steps=1),
      _generate=lambda model, prompts, images=None: (torch.zeros(n, PROMPT, dtype=torch.long),
                                                     torch.ones(n, PROMPT, dtype=torch.long), ids,
                                                     torch.tensor(mask, dtype=torch.long), None),
      eos_token_ids=[1], _forward=lambda *a, **k: next(calls), ref_model=object(),
      processing_class=types.SimpleNamespace(batch_decode=lambda x, **k: ["c"] * len(x)),
      _calculate_rewards_from_functions=lambda **k: t(scores), reward_funcs=[object()], beta=beta,
      stats=collections.defaultdict(list),
      accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x, backward=lambda loss, **k: loss.backward()))
  loss = OnlineDPOTrainer.training_step(stub, types.SimpleNamespace(train=lambda: None),
                                        {"prompt": ["p"] * (n // 2)})
  return float(loss), policy.grad.numpy(), {k: v[0] for k, v in stub.stats.items()}


@pytest.mark.parametrize("grad_accum", [1, 2, 3])
@pytest.mark.parametrize("loss_type", online_dpo.LOSS_TYPES)
def test_loss_gradient_and_metrics_equal_trls_online_dpo_trainer(loss_type, grad_accum):
  """Pairs of different completion lengths, a tie (the first is chosen) and a completion without EOS (the driver
  subtracts missing_eos_penalty before the judge, as TRL does); under accumulation each pair's rows are split."""
  pytest.importorskip("trl")
  rng = np.random.default_rng(1)
  lengths, width, beta, penalty = (3, 5, 1, 4, 2, 5), 9, 0.1, 0.5
  P, C = len(lengths) // 2, max(lengths)
  raw = np.array([0.3, 0.7, 0.4, 0.4, 0.9, 0.2])  # pair 1 ties
  eos = np.array([True, True, True, True, True, False])  # the last completion hit the length limit
  fm_scores = raw - penalty * ~eos  # fmjax/train/rollout.py applies the penalty before per_completion
  batch = judged_rows(fm_scores, lengths, width)
  logp = jnp.asarray(-rng.uniform(0.1, 3, (len(lengths), width)), jnp.float32)
  ref = jnp.asarray(-rng.uniform(0.1, 3, (len(lengths), width)), jnp.float32)
  head = objectives.get(odpo_cfg(loss_type=loss_type, beta=beta))
  ctx = stub_context(ref)
  (loss, metrics), grad = jax.value_and_grad(lambda p: accumulated(head, p, batch, ctx, grad_accum), has_aux=True)(logp)

  trl_row = [2 * k for k in range(P)] + [2 * k + 1 for k in range(P)]  # TRL's completion i is fmjax row trl_row[i]
  take = lambda x: np.stack([np.asarray(x)[r, PROMPT - 1:PROMPT - 1 + C] for r in trl_row])  # noqa: E731
  mask = np.stack([(np.arange(C) < lengths[r]) for r in trl_row]).astype(np.float64)
  # TRL sums objective/kl and objective/entropy over padding too; zeros there keep its metrics the completions'
  want, want_grad, stats = trl_step(loss_type, beta, take(logp) * mask, take(ref) * mask, mask, raw[trl_row],
                                    [i for i, r in enumerate(trl_row) if eos[r]], penalty)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(take(grad) * mask, want_grad * mask, rtol=1e-4, atol=1e-7)
  assert float(jnp.sum(jnp.abs(grad) * (1 - batch["loss_mask"]))) == 0  # no gradient off the completions
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/scores",
            "objective/scores_margin", "objective/rlhf_reward"):
    np.testing.assert_allclose(float(metrics[k]), stats[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert 0 < float(metrics["rewards/accuracies"]) < 1  # the metrics are not trivially equal


def test_accumulated_gradient_of_a_real_forward_equals_the_pairs_loss():
  """With logits from a model (a table of token -> logits; the reference another), the per-row form with its
  prepared partner columns gives the gradient of Σ_pairs ℓ(pair) computed directly, whole pairs at a time."""
  V, width = 11, 9
  rng = np.random.default_rng(2)
  table, ref_table = (jnp.asarray(rng.normal(size=(V, V)), jnp.float32) for _ in range(2))
  batch = judged_rows([0.1, 0.5, 0.9, 0.2, 0.3, 0.3, 0.0, 1.0], (4, 2, 5, 5, 1, 3, 6, 2), width, seed=3)
  batch = {**batch, "tokens": batch["tokens"] % V, "targets": batch["targets"] % V}
  ctx = LossContext(apply=lambda p, inputs: p[inputs["tokens"]],
                    frozen={"reference": lambda inputs: ref_table[inputs["tokens"]]})
  cfg = odpo_cfg(beta=0.3)
  head = objectives.get(cfg)

  def direct(p):
    def sums(logits):
      lp = jax.nn.log_softmax(logits)
      lp = jnp.take_along_axis(lp, batch["targets"][..., None], -1)[..., 0]
      return jnp.sum(lp * batch["loss_mask"], 1).reshape(-1, 2)
    pol, ref = sums(p[batch["tokens"]]), sums(ref_table[batch["tokens"]])
    first = np.asarray(batch["chosen"]).max(1).reshape(-1, 2)[:, 0] > 0.5
    pick = lambda x, i: jnp.where(first, x[:, i], x[:, 1 - i])  # noqa: E731
    h = (pick(pol, 0) - pick(pol, 1)) - (pick(ref, 0) - pick(ref, 1))
    return jnp.mean(-jax.nn.log_sigmoid(0.3 * h))

  want, want_grad = jax.value_and_grad(direct)(table)
  for n in (1, 2, 4):
    loss, grad = jax.value_and_grad(lambda p: accumulated(head, p, batch, ctx, n)[0])(table)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-6)
  assert float(jnp.max(jnp.abs(want_grad))) > 1e-3


# --- the judge --------------------------------------------------------------------------------------------------------

def test_the_judge_chooses_the_higher_score_of_each_pair_and_the_first_on_a_tie():
  out = online_dpo.judge(np.array([0.2, 0.8, 0.5, 0.1, 0.4, 0.4, -1.0, -1.0]))
  assert out["chosen"].tolist() == [0, 1, 1, 0, 1, 0, 1, 0]
  np.testing.assert_array_equal(out["partner_score"], [0.8, 0.2, 0.1, 0.5, 0.4, 0.4, -1.0, -1.0])
  np.testing.assert_array_equal(out["score"], [0.2, 0.8, 0.5, 0.1, 0.4, 0.4, -1.0, -1.0])
  assert online_dpo.judge(np.zeros(6))["chosen"].tolist() == [1, 0] * 3  # all equal: every first
  with pytest.raises(ValueError, match="pairs"):
    online_dpo.judge(np.zeros(6), 3)


def test_equal_policy_and_reference_give_ln2_and_zero_rewards():
  """At the start the policy is the reference: DPO's loss is ln 2 and the implicit rewards are 0."""
  rng = np.random.default_rng(4)
  batch = judged_rows([1.0, 0.0, 0.0, 1.0], (2, 3, 4, 1), 7)
  logp = jnp.asarray(-rng.uniform(0.1, 3, (4, 7)), jnp.float32)
  head = objectives.get(odpo_cfg())
  loss, metrics = accumulated(head, logp, batch, stub_context(logp), 1)
  np.testing.assert_allclose(float(loss), np.log(2), rtol=1e-6)
  assert abs(float(metrics["rewards/margins"])) < 1e-6 and float(metrics["objective/kl"]) == 0
  np.testing.assert_allclose(float(metrics["objective/scores_margin"]), 1.0)


# --- options ----------------------------------------------------------------------------------------------------------

def test_the_head_declares_pairs_a_reference_and_the_judge():
  head = objectives.get(odpo_cfg(temperature=0.7, max_completion_length=12, missing_eos_penalty=1.0))
  r = head.rollout
  assert (r.group, r.temperature, r.max_completion_length, r.missing_eos_penalty) == (2, 0.7, 12, 1.0)
  assert (r.iterations, r.minibatches) == (1, 1)  # the prepared partner values are the step's params'
  assert [f.role for f in head.frozen] == ["reference"]
  assert set(online_dpo.PREPARED + online_dpo.JUDGED) <= set(head.columns)
  judged = objectives.get(odpo_cfg(rewards="model,sort_digits:0.5", reward_model="/x"))
  assert [f.role for f in judged.frozen] == ["reference", "reward_model"]
  assert objectives.section("online_dpo")["temperature"] == 0.9  # TRL's default


def test_options_are_checked():
  with pytest.raises(UserError, match="objective.loss_type"):
    objectives.resolve(odpo_cfg(loss_type="hinge"))
  with pytest.raises(UserError, match="objective.beta"):
    objectives.resolve(odpo_cfg(beta=0.0))
  with pytest.raises(UserError, match="sampler_correction is not an option"):  # both log-probs are the trainer's
    objectives.resolve({**objectives.section("online_dpo"), "sampler_correction": "token_truncate"})
  with pytest.raises(UserError, match="num_generations"):
    objectives.resolve(odpo_cfg(num_generations=4))


def test_the_configs_load(repo):
  for arg in ("smoke", "smoke,loss=ipo", "rlhf,smoke", "init_from=/tmp/x,rank=4"):
    c = config_lib.load(f"{repo}/configs/online_dpo.py:{arg}")
    assert c.objective.name == "online_dpo" and c.train.batch_size % 2 == 0
  assert config_lib.load(f"{repo}/configs/online_dpo.py:rlhf,smoke").objective.rewards == "model"


# --- the run ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_online_dpo_smoke_runs_standalone_and_its_reward_rises(repo, tmp_path, cpu_env):
  proc = subprocess.run([sys.executable, "-m", "fmjax.main", "--config=configs/online_dpo.py:smoke",
                         f"--workdir={tmp_path}"], cwd=repo, env=cpu_env(), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  reward = [r["reward"] for r in rows if "reward" in r]
  assert len(reward) >= 10 and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  assert np.mean(reward[-5:]) > np.mean(reward[:5])
  assert "rewards/accuracies" in rows[-1] and "objective/kl" in rows[-1]
