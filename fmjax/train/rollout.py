"""The one rollout driver of on-policy RL, run by the train loop before a step of a head that declares a rollout
(`objectives.Rollout`): sample G completions of each prompt with the CURRENT params (KV-cache decoding, one compiled
step: fmjax/sample.py), score them (reward functions on the host, the reward model on the device), give each its
head's per-completion columns (e.g. group advantages), and lay the completions out as one `rollouts` batch
(fmjax/data/layout.py) that the next `iterations` × `minibatches` steps train on, one minibatch each. A head's
`prepare` runs on the device over the rollout under the params that sampled it (a critic's values, the trainer's own
log-probs), its `finish` on the host over the whole rollout (GAE, whitening).

Every process draws the same global rollout (every process reads the same prompt stream; the sampling key is the
train state's, folded with the step), then keeps its own rows of each minibatch; so a run stopped at a rollout
boundary and resumed repeats it exactly. Checkpoints are taken at those boundaries only.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

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
  if checkpoint_every % spec.steps:
    per = f"objective.{spec.iterations_key}={spec.iterations}" + (
        f" × objective.{spec.minibatches_key}={spec.minibatches}" if spec.minibatches > 1 else "")
    raise UserError(f"checkpoint.every_steps={checkpoint_every} must be a multiple of {per}: checkpoints are taken "
                    "where a rollout's optimizer steps end.")


class Driver:
  """Makes each rollout batch of a run (see the module docstring)."""

  def __init__(self, spec: Rollout, seq_len: int, chat_template: str, model: Any, tokenizer: Any, records: Any,
               stream: Any, mesh: Any, frozen_plan: frozen_lib.Plan, batch_size: int, rules: tuple = ()):
    self.spec, self.seq_len, self.model, self.tokenizer, self.records, self.stream, self.mesh = (
        spec, seq_len, model, tokenizer, records, stream, mesh)
    self.group, self.steps, self.batch_size, self.rules = int(spec.group), spec.steps, int(batch_size), rules
    self.functions = rewards.functions(spec.rewards)
    self.reward_net = frozen_plan.networks.get(REWARD_MODEL.role)
    self.stops = stop_ids(tokenizer, chat_template)
    self.rows: dict[str, np.ndarray] = {}  # the rollout being trained on, global, on the host
    self.start = 0  # the step that drew it
    self.whole: dict[str, jax.Array] | None = None  # with one minibatch: the rollout as one global batch
    self._prepare = None
    if spec.prepare is not None:
      context = frozen_lib.make_context(model, frozen_plan)
      self._prepare = jax.jit(lambda params, base, frozen, batch: spec.prepare(params, batch, context(base, frozen)))

  def boundary(self, step: int) -> bool:
    """Whether `step` ends a rollout's optimizer steps (checkpoints and stops happen only there)."""
    return step % self.steps == 0

  def batch(self, state: Any, step: int) -> tuple[dict[str, jax.Array], dict[str, float]]:
    """The batch of `step` (1-based) and its rollout metrics (empty on steps that reuse the last rollout)."""
    k = (step - 1) % self.steps
    if k and self.rows:
      return self._minibatch(k), {}
    jax.block_until_ready(state.params)  # the previous train step's time is the step's, not the rollout's
    t0 = time.perf_counter()
    position = self.stream.get_state()
    try:
      metrics = self._rollout(state, step, t0)
    except preemption.Interrupted:  # stopped before its steps: a resume draws these prompts again
      self.stream.set_state(position)
      raise
    return self._minibatch(k), metrics

  def _minibatch(self, k: int) -> dict[str, jax.Array]:
    """Minibatch k of the rollout's steps: with one minibatch, the whole rollout; else pass k // minibatches takes
    the rows in an order drawn for that pass (from the rollout's step: a resume draws the same), in batch-size runs."""
    n, minibatches = len(self.rows["tokens"]), int(self.spec.minibatches)
    if minibatches == 1:
      if self.whole is None:
        self.whole = self._global(self.rows)
      return self.whole
    order = np.random.default_rng([self.start, k // minibatches]).permutation(n)
    part = k % minibatches
    return self._global({c: v[np.sort(order[part * self.batch_size:(part + 1) * self.batch_size])]
                         for c, v in self.rows.items()})

  def _global(self, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global rows as one global batch: each process passes its own share."""
    n, (pi, pc) = len(rows["tokens"]), sharding.data_shard(self.mesh)
    return sharding.global_batch({k: v[pi * n // pc:(pi + 1) * n // pc] for k, v in rows.items()}, self.mesh)

  def _prepared(self, state: Any, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The head's `prepare` columns of the global rollout rows, a train batch at a time, back on every host."""
    out: dict[str, list[np.ndarray]] = {c: [] for c in self.spec.prepared}
    for start in range(0, len(rows["tokens"]), self.batch_size):
      chunk = self._global({k: v[start:start + self.batch_size] for k, v in rows.items()})
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        columns = self._prepare(state.params, state.base, state.frozen, chunk)
      _check_columns("prepare", self.spec.prepared, columns)
      for c, v in columns.items():
        out[c].append(np.asarray(multihost_utils.process_allgather(v, tiled=True), np.float32))
    return {c: np.concatenate(v) for c, v in out.items()}

  def _rollout(self, state: Any, step: int, t0: float) -> dict[str, float]:
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
    total = total - float(spec.missing_eos_penalty) * ~terminated
    trained = terminated | (not spec.mask_truncated)
    columns = {k: np.asarray(v) for k, v in spec.per_completion(total, self.group).items()}
    _check_columns("per_completion", spec.columns, columns)
    out = rows(repeated, ids, trained, self.seq_len, columns, {spec.sampler_logps: logps} if spec.sampler_logps else {})
    adapter = self.model.adapter
    for k in adapter.columns if adapter is not None else ():
      out[k] = np.stack([adapter.batch_columns({q: v[i] for q, v in out.items()})[k] for i in range(len(ids))])
    if self._prepare is not None:
      out.update(self._prepared(state, out))
    if spec.finish is not None:
      finished, more = spec.finish(out, total)
      _check_columns("finish", spec.finished, finished)
      out.update({k: np.asarray(v, np.float32) for k, v in finished.items()})
      metrics.update({k: float(v) for k, v in more.items()})
    lengths, seconds = np.asarray([len(c) for c in ids]), time.perf_counter() - t0
    groups = total.reshape(-1, self.group)
    metrics.update({
        "reward": float(total.mean()),
        "reward_std": float(groups.std(axis=1, ddof=1).mean()) if self.group > 1 else 0.0,
        "frac_reward_zero_std": advantages.zero_std_fraction(total, self.group),
        "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()), "completions/terminated": float(terminated.mean()),
        "rollout_seconds": seconds, "rollout_tokens_per_sec": float(lengths.sum()) / max(seconds, 1e-9)})
    self.rows, self.start, self.whole = out, step, None
    return metrics

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


def _check_columns(hook: str, declared: tuple[str, ...], given: Any) -> None:
  """A head's rollout hook must give exactly the columns its Rollout declares for it."""
  if sorted(given) != sorted(declared):
    raise UserError(f"the head's rollout declares the columns {list(declared)} for its {hook} but it gave "
                    f"{sorted(given)}; make them the same.")


def _std(values: np.ndarray) -> float:
  return float(values.std(ddof=1)) if len(values) > 1 else 0.0


