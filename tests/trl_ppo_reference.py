"""Runs TRL 1.12.0's own `PPOTrainer.train()` (trl/experimental/ppo/ppo_trainer.py, the last TRL with one) for one
update on given rollouts and writes what it computed. A subprocess of tests/test_ppo.py, with PYTHONPATH set to
tests/trl_peer.trl_dir() so that this TRL, not the installed newer one, is imported:

  python tests/trl_ppo_reference.py CASES.json INPUTS.npz OUTPUTS.npz

CASES.json: a list of {"name", "config": {PPOConfig fields: kl_coef, kl_estimator, cliprange, ...}}. INPUTS.npz,
per case (keys "<name>|<array>"): queries [N,C] (int, no pad, distinct rows), responses [N,L] (int, no pad; an EOS
only at L-1), and float [N,L] sampler_logps, ref_logps, values (V_old), new_logps, new_values, and scores [N].
OUTPUTS.npz, per case: rewards, advantages, returns, kl, values, logprobs, ref_logprobs, padding_mask [N,L] and
scores [N] (train()'s own tensors), the scalars pg_loss, vf_loss, pg_clipfrac, vf_clipfrac, approxkl, ratio (its
*_stats tensors, one micro-batch each) and "<name>|metric|<key>" for each metric it logs.

The stubs. The trainer is made with object.__new__ (no __init__: no real models, no Accelerator) and given the
attributes train() reads; the batch-size arithmetic of __init__ is repeated so that there is one update of one
epoch, one mini-batch, one micro-batch. The models are stubs that answer TRL's real code, which runs unchanged:
batch_generation/generate (the policy's `generate` returns the responses and, as `scores`, logits whose
log_softmax at the response token is the sampler log-prob), forward (the reference's logits, and the policy+value
model's (logits, values) during the update), get_reward (a `score` head: the value model's per-position values,
the reward model's score at every position), truncate_response, first_true_indices, masked_whiten, masked_mean.
Logits over a 4-token vocabulary (0 pad, 1 EOS) are [l at the token, log((1 − eᴸ)/3) elsewhere] so their
log_softmax at the token is l; the reference and training logits are multiplied by (temperature + 1e-7) because
train() divides them by it (temperature = 1). Stubs find a row by its query, since the update permutes rows.
Only `unwrap_model_for_generation` is replaced in the module's namespace (it would unwrap an accelerate model).
TRL 1.12.0 imports as it is with the installed transformers 5.x and accelerate: nothing is stubbed in sys.modules.

Capturing: train() ends each update with `self.log(metrics)` while its locals (rewards after any whitening,
advantages after whitening, returns, kl, the *_stats) are still alive; `log` is an instance attribute here that
reads them from its caller's frame (asserted to be train()). This needs no copy or patch of TRL's arithmetic, and a
renamed local fails loudly (KeyError) rather than silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import types

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import trl  # noqa: E402
from transformers import TrainerControl  # noqa: E402
from trl.experimental.ppo import PPOConfig  # noqa: E402
from trl.experimental.ppo import ppo_trainer as M  # noqa: E402

PAD, EOS, VOCAB = 0, 1, 4
CAPTURED = ("rewards", "advantages", "returns", "kl", "values", "logprobs", "ref_logprobs", "padding_mask", "scores")
STATS = {"pg_loss": "pg_loss_stats", "vf_loss": "vf_loss_stats", "pg_clipfrac": "pg_clipfrac_stats",
         "vf_clipfrac": "vf_clipfrac_stats", "approxkl": "approxkl_stats", "ratio": "ratio_stats"}


def logits_for(logps: np.ndarray, tokens: np.ndarray, scale: float = 1.0) -> torch.Tensor:
  """[N,L,VOCAB] float32 logits whose log_softmax (after division by `scale`) at `tokens` is `logps`."""
  logps = np.asarray(logps, np.float64)
  rest = np.log(-np.expm1(logps) / (VOCAB - 1))
  out = np.repeat(rest[..., None], VOCAB, axis=-1)
  np.put_along_axis(out, tokens[..., None], logps[..., None], axis=-1)
  return torch.tensor(out * scale, dtype=torch.float32)


class Rows:
  """Finds each row of a [B, C+…] token tensor among the case's queries (the update permutes rows)."""

  def __init__(self, queries: np.ndarray):
    self.queries = torch.tensor(queries)

  def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
    c = self.queries.shape[1]
    hits = (tokens[:, None, :c] == self.queries[None]).all(-1)  # [B, N]
    assert (hits.sum(1) == 1).all(), "each row's query must match exactly one case query"
    return hits.int().argmax(1)


def at_response(per_token: torch.Tensor, context: int) -> torch.Tensor:
  """[B,L,…] → [B,C+L,…] placed at positions C−1 … C+L−2 (what predicts response token t), zero elsewhere."""
  b, length = per_token.shape[:2]
  out = torch.zeros((b, context + length) + per_token.shape[2:], dtype=per_token.dtype)
  out[:, context - 1: context + length - 1] = per_token
  return out


class ScoreModel:
  """A value or reward model for TRL's get_reward: a backbone that passes the tokens on and a `score` head."""
  base_model_prefix = "backbone"

  def __init__(self, rows: Rows, per_position):
    self.rows, self.per_position = rows, per_position

  def backbone(self, input_ids, **_):
    return types.SimpleNamespace(hidden_states=[input_ids])

  def score(self, input_ids):
    return self.per_position(self.rows(input_ids), input_ids.shape[1])[..., None]


class PolicyAndValue:
  """TRL's PolicyAndValueWrapper: `.policy`, `.value_model`, and called, (policy output, values [B,T,1])."""

  def __init__(self, policy, value_model, call):
    self.policy, self.value_model, self._call = policy, value_model, call

  def __call__(self, **kwargs):
    return self._call(**kwargs)

  def train(self):
    return self


def run_case(cfg: dict, x: dict, workdir: str) -> dict:
  queries, responses = x["queries"], x["responses"]
  n, c = queries.shape
  length = responses.shape[1]
  assert not (queries == PAD).any() and not (responses == PAD).any(), "the cross-check needs rows without padding"
  args = PPOConfig(output_dir=workdir, report_to="none", bf16=False, use_cpu=True, seed=0, temperature=1.0,
                   stop_token="eos", missing_eos_penalty=None, num_ppo_epochs=1, num_mini_batches=1,
                   per_device_train_batch_size=n, gradient_accumulation_steps=1, total_episodes=n,
                   local_rollout_forward_batch_size=n, response_length=length, num_sample_generations=0, **cfg)
  scale = args.temperature + 1e-7
  rows = Rows(queries)
  resp = torch.tensor(responses)

  # What PPOTrainer.__init__ derives (one process).
  args.world_size = 1
  args.local_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
  args.micro_batch_size = args.per_device_train_batch_size
  args.batch_size = args.local_batch_size
  args.mini_batch_size = M.exact_div(args.batch_size, args.num_mini_batches)
  args.local_mini_batch_size = M.exact_div(args.local_batch_size, args.num_mini_batches)
  if args.whiten_rewards:
    assert args.local_mini_batch_size >= 8, "TRL asserts ≥ 8 rows per mini-batch to whiten rewards"
  args.num_total_batches = int(np.ceil(args.total_episodes / args.batch_size))
  assert args.num_total_batches == 1

  def generate(input_ids, attention_mask, generation_config, return_dict_in_generate, output_scores):
    logits = logits_for(x["sampler_logps"], responses)[rows(input_ids)]
    return types.SimpleNamespace(sequences=torch.cat([input_ids, resp[rows(input_ids)]], 1),
                                 scores=tuple(logits.unbind(1)))

  def reference(input_ids, **_):
    return types.SimpleNamespace(logits=at_response(logits_for(x["ref_logps"], responses, scale), c)[rows(input_ids)])

  def policy_and_value(input_ids, **_):
    r = rows(input_ids)
    logits = at_response(logits_for(x["new_logps"], responses, scale), c)[r]
    values = at_response(torch.tensor(x["new_values"], dtype=torch.float32), c)[r]
    return types.SimpleNamespace(logits=logits), values[..., None]

  old_values = torch.tensor(x["values"], dtype=torch.float32)
  scores = torch.tensor(x["scores"], dtype=torch.float32)
  policy = types.SimpleNamespace(generate=generate)
  value_model = ScoreModel(rows, lambda r, t: at_response(old_values, c)[r])
  reward_model = ScoreModel(rows, lambda r, t: scores[r][:, None].expand(-1, t))
  model = PolicyAndValue(policy, value_model, policy_and_value)

  trainer = object.__new__(M.PPOTrainer)
  captured = {}

  def log(metrics):
    frame = sys._getframe(1)
    assert frame.f_code is M.PPOTrainer.train.__code__, "self.log was expected to be called by train()"
    local = frame.f_locals
    captured.update({k: local[k].detach().double().numpy() for k in CAPTURED})
    for name, stat in STATS.items():
      assert local[stat].numel() == 1, f"{stat} has {local[stat].numel()} entries; the case must have one micro-batch"
      captured[name] = local[stat].double().numpy().reshape(())
    captured.update({f"metric|{k}": np.float64(v) for k, v in metrics.items()})

  accelerator = types.SimpleNamespace(
      device=torch.device("cpu"), print=lambda *a, **k: None, unwrap_model=lambda m: m,
      accumulate=lambda m: contextlib.nullcontext(), backward=lambda loss: None, gather_for_metrics=lambda t: t)
  handler = types.SimpleNamespace(**{f"on_{e}": (lambda args, state, control: control)
                                     for e in ("train_begin", "step_end", "save", "train_end")})
  trainer.__dict__.update(
      args=args, accelerator=accelerator, model=model, ref_model=reference, reward_model=reward_model,
      processing_class=types.SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS), stop_token_id=EOS,
      dataloader=[{"input_ids": torch.tensor(queries)}], train_dataset_len=n, is_deepspeed_enabled=False,
      optimizer=types.SimpleNamespace(step=lambda: None, zero_grad=lambda: None),
      lr_scheduler=types.SimpleNamespace(get_last_lr=lambda: [0.0], step=lambda: None),
      state=M.OnlineTrainerState(), control=TrainerControl(), callback_handler=handler, log=log)
  trainer.train()
  assert captured, "train() never logged"
  return captured


@contextlib.contextmanager
def _unwrap_model_for_generation(model, accelerator, **_):
  yield model


def main(cases_path: str, inputs_path: str, outputs_path: str) -> None:
  assert trl.__version__ == "1.12.0", f"expected trl 1.12.0 on PYTHONPATH, got {trl.__version__} at {trl.__file__}"
  M.unwrap_model_for_generation = _unwrap_model_for_generation
  torch.manual_seed(0)
  np.random.seed(0)
  with open(cases_path) as f:
    cases = json.load(f)
  inputs = np.load(inputs_path)
  out = {}
  with tempfile.TemporaryDirectory() as workdir:
    for case in cases:
      name = case["name"]
      x = {k.split("|", 1)[1]: inputs[k] for k in inputs.files if k.startswith(name + "|")}
      out.update({f"{name}|{k}": v for k, v in run_case(case["config"], x, workdir).items()})
  np.savez(outputs_path, **out)


if __name__ == "__main__":
  main(*sys.argv[1:])
