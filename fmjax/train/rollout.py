"""The one rollout driver of on-policy RL, run by the train loop before a step of a head that declares a rollout
(`objectives.Rollout`): sample G completions of each prompt with the CURRENT params (KV-cache decoding, one compiled
step: fmjax/sample.py), score them (reward functions on the host, the reward model on the device), give each its
head's per-completion columns (e.g. group advantages), and lay the completions out as one `rollouts` batch
(fmjax/data/layout.py) that the next `iterations` steps train on.

Every process draws the same global rollout (every process reads the same prompt stream; the sampling key is the
train state's, folded with the step), then keeps its own rows; so a run stopped at a rollout boundary and resumed repeats
it exactly. Checkpoints are taken at those boundaries only (every num_iterations steps).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import numpy as np

from fmjax import sample, sharding
from fmjax.data.chat import ChatTemplate
from fmjax.errors import UserError
from fmjax.objectives.base import REWARD_MODEL, Rollout
from fmjax.objectives.score import last_token_scores
from fmjax.rl import advantages, rewards
from fmjax.train import frozen as frozen_lib
from fmjax.train import preemption
from fmjax.train.state import full_params


def stop_ids(tokenizer: Any, chat_template: str) -> list[int]:
  """EOS, and the chat template's end-of-turn marker when it is one token."""
  stops = [int(tokenizer.eos_id)]
  end = tokenizer.encode(ChatTemplate(chat_template).footer.strip()) if ChatTemplate(chat_template).footer.strip() \
      else []
  if len(end) == 1 and int(end[0]) not in stops:
    stops.append(int(end[0]))
  return stops


def rows(prompts: list[np.ndarray], completions: list[np.ndarray], trained: np.ndarray, seq_len: int,
         per_completion: dict[str, np.ndarray] | None = None,
         per_token: dict[str, list[np.ndarray]] | None = None) -> dict[str, np.ndarray]:
  """The `rollouts` rows [N, seq_len]: prompt + completion as one sequence per row, loss on the completion's tokens
  (where `trained`); each column of `per_completion` ([N] values) holds its completion's value on the completion's
  tokens, and each of `per_token` (a [len(completion)] array per row, e.g. the sampler's log-probs) its values."""
  n = len(prompts)
  per_completion, per_token = per_completion or {}, per_token or {}
  out = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
  out.update({k: np.zeros((n, seq_len), np.float32) for k in ("loss_mask", *per_completion, *per_token)})
  for i, (p, c) in enumerate(zip(prompts, completions)):
    seq = np.concatenate([p, c])
    length, start = len(seq) - 1, len(p) - 1  # the targets from `start` on are the completion's tokens
    out["tokens"][i, :length], out["targets"][i, :length] = seq[:-1], seq[1:]
    out["segment_ids"][i, :length], out["positions"][i, :length] = 1, np.arange(length)
    out["loss_mask"][i, start:length] = float(trained[i])
    for k, values in per_completion.items():
      out[k][i, start:length] = values[i]
    for k, values in per_token.items():
      out[k][i, start:length] = values[i]
  return out


@functools.partial(jax.jit, static_argnums=0)
def _score(net, weights, tokens, segment_ids, positions):
  return last_token_scores(net.apply({"params": weights}, tokens, segment_ids, positions), segment_ids)[0][:, 1, 0]


def check(head_name: str, spec: Rollout, eval_every: int, checkpoint_every: int) -> None:
  """What an RL run cannot do, as one-line errors before any work."""
  if eval_every:
    raise UserError(f"objective.name={head_name!r} trains on rollouts, which have no held-out loss: set "
                    "eval.every_steps=0, and compare held-out rewards with tools/evaluate.py rewards.")
  if checkpoint_every % spec.iterations:
    raise UserError(f"checkpoint.every_steps={checkpoint_every} must be a multiple of objective.{spec.iterations_key}="
                    f"{spec.iterations}: checkpoints are taken where a rollout's optimizer steps end.")


class Driver:
  """Makes each rollout batch of a run (see the module docstring)."""

  def __init__(self, spec: Rollout, seq_len: int, chat_template: str, model: Any, tokenizer: Any, records: Any,
               stream: Any, mesh: Any, frozen_plan: frozen_lib.Plan):
    self.spec, self.seq_len, self.model, self.tokenizer, self.records, self.stream, self.mesh = (
        spec, seq_len, model, tokenizer, records, stream, mesh)
    self.group, self.iterations = int(spec.group), int(spec.iterations)
    self.functions = rewards.functions(spec.rewards)
    self.reward_net = frozen_plan.networks.get(REWARD_MODEL.role)
    self.stops = stop_ids(tokenizer, chat_template)
    self.cached: tuple[dict, dict] | None = None

  def boundary(self, step: int) -> bool:
    """Whether `step` ends a rollout's optimizer steps (checkpoints and stops happen only there)."""
    return step % self.iterations == 0

  def batch(self, state: Any, step: int) -> tuple[dict[str, jax.Array], dict[str, float]]:
    """The batch of `step` (1-based) and its rollout metrics (empty on steps that reuse the last rollout)."""
    if (step - 1) % self.iterations and self.cached is not None:
      return self.cached[0], {}
    jax.block_until_ready(state.params)  # the previous train step's time is the step's, not the rollout's
    t0 = time.perf_counter()
    position = self.stream.get_state()
    try:
      return self._rollout(state, step, t0)
    except preemption.Interrupted:  # stopped before its steps: a resume draws these prompts again
      self.stream.set_state(position)
      raise

  def _rollout(self, state: Any, step: int, t0: float) -> tuple[dict[str, jax.Array], dict[str, float]]:
    drawn = next(self.stream)  # the same global prompts on every process
    prompts = [ids[:n] for ids, n in zip(drawn["prompt_ids"], drawn["prompt_length"])]
    records = [self.records[int(i)] for i in drawn["index"]]
    repeated = [p for p in prompts for _ in range(self.group)]
    spec = self.spec
    params = full_params(state.params, state.base)
    ids, logps = sample.generate(self.model.cfg, self.model.adapter, params, repeated, int(spec.max_completion_length),
                                 temperature=float(spec.temperature), top_k=int(spec.top_k), top_p=float(spec.top_p),
                                 stop_ids=self.stops, rng=jax.random.fold_in(state.rng, step), with_logps=True)
    terminated = np.asarray([len(c) > 0 and int(c[-1]) in self.stops for c in ids])
    total, metrics = self._rewards(state, records, repeated, ids)
    trained = terminated | (not spec.mask_truncated)
    columns = {k: np.asarray(v) for k, v in spec.per_completion(total, self.group).items()}
    if sorted(columns) != sorted(spec.columns):
      raise UserError(f"the head's rollout declares the columns {list(spec.columns)} but its per_completion gave "
                      f"{sorted(columns)}; make them the same.")
    out = rows(repeated, ids, trained, self.seq_len, columns, {spec.sampler_logps: logps} if spec.sampler_logps else {})
    adapter = self.model.adapter
    for k in adapter.columns if adapter is not None else ():
      out[k] = np.stack([adapter.batch_columns({q: v[i] for q, v in out.items()})[k] for i in range(len(ids))])
    lengths, seconds = np.asarray([len(c) for c in ids]), time.perf_counter() - t0
    groups = total.reshape(-1, self.group)
    metrics.update({
        "reward": float(total.mean()),
        "reward_std": float(groups.std(axis=1, ddof=1).mean()) if self.group > 1 else 0.0,
        "frac_reward_zero_std": advantages.zero_std_fraction(total, self.group),
        "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()), "completions/terminated": float(terminated.mean()),
        "rollout_seconds": seconds, "rollout_tokens_per_sec": float(lengths.sum()) / max(seconds, 1e-9)})
    n, (pi, pc) = len(ids), sharding.data_shard(self.mesh)
    mine = {k: v[pi * n // pc:(pi + 1) * n // pc] for k, v in out.items()}
    self.cached = (sharding.global_batch(mine, self.mesh), metrics)
    return self.cached

  def _rewards(self, state: Any, records: list[dict], prompts: list[np.ndarray],
               ids: list[np.ndarray]) -> tuple[np.ndarray, dict[str, float]]:
    """(each completion's weighted reward, per-function metrics)."""
    # ids past the tokenizer (the model's vocabulary is padded) name no piece: they decode to nothing
    vocab = self.tokenizer.vocab_size
    texts = [self.tokenizer.decode([int(t) for t in c if int(t) not in self.stops and int(t) < vocab]) for c in ids]
    total, metrics = np.zeros(len(ids)), {}
    for name, weight, fn in self.functions:
      values = self._model_scores(state, prompts, ids) if fn is None else self._call(name, fn, records, texts)
      metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = float(values.mean()), _std(values)
      total += weight * values
    return total, metrics

  def _call(self, name: str, fn: Any, records: list[dict], texts: list[str]) -> np.ndarray:
    prompts = [r["prompt"] for r in records for _ in range(self.group)]
    keys = [k for k in records[0] if k not in ("prompt", "_where")]
    fields = {k: [r.get(k) for r in records for _ in range(self.group)] for k in keys}
    # a stop signal ends the wait on a blocked reward function; the loop saves the last step's state
    return np.asarray(rewards.call(name, fn, prompts, texts, fields, float(self.spec.reward_timeout),
                                   preemption.signalled, preemption.Interrupted), np.float64)

  def _model_scores(self, state: Any, prompts: list[np.ndarray], ids: list[np.ndarray]) -> np.ndarray:
    if self.reward_net is None:
      raise UserError("objective.rewards names 'model' but no reward model was built; set objective.reward_model.")
    return score_completions(self.reward_net, state.frozen[REWARD_MODEL.role], prompts, ids,
                             int(self.tokenizer.eos_id), self.seq_len)


def score_completions(net: Any, weights: Any, prompts: list[np.ndarray], ids: list[np.ndarray], eos_id: int,
                      width: int) -> np.ndarray:
  """A reward model's score of each prompt + completion (token ids), read as its training pairs are: a final EOS is
  not part of the scored sequence. Rows are `width` tokens (longer ones keep their end)."""
  tokens, seg = np.zeros((len(ids), width), np.int32), np.zeros((len(ids), width), np.int32)
  for i, (p, c) in enumerate(zip(prompts, ids)):
    c = c[:-1] if len(c) and int(c[-1]) == eos_id else c
    seq = np.concatenate([p, c])[-width:]
    tokens[i, :len(seq)], seg[i, :len(seq)] = seq, 1
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
  return np.asarray(_score(net, weights, tokens, seg, positions), np.float64)


def _std(values: np.ndarray) -> float:
  return float(values.std(ddof=1)) if len(values) > 1 else 0.0


