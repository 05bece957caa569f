"""Held-out rewards of a policy: its completions of prompt records (greedy, or sampled) scored by reward functions
and/or a reward model, exactly as an RL rollout scores them (fmjax/train/rollout.py), so a base and its RL run compare
on prompts neither trained on."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from fmjax import sample
from fmjax.data import chat, formats
from fmjax.errors import UserError
from fmjax.rl import rewards as rewards_lib
from fmjax.train import rollout


@dataclasses.dataclass
class RewardResult:
  prompts: int
  means: dict[str, float]  # reward function (or 'model') -> mean over the completions
  total: float  # the weighted sum's mean
  mean_length: float  # completion tokens
  terminated: float  # fraction that ended with a stop id
  examples: list[tuple[str, str, float]]  # (prompt, completion, total reward) of the first few


def evaluate(model: Any, records: Sequence[dict], spec: str, reward_model: Any = None, max_new_tokens: int = 32,
             temperature: float = 0.0, seed: int = 0, batch_size: int = 32) -> RewardResult:
  """`model` (fmjax.load) completes each record's `prompt`; `spec` is objective.rewards' 'name[:weight],...'
  ('model' needs `reward_model`, an fmjax.load of a reward-model run)."""
  functions = rewards_lib.functions(spec)
  encoder = formats.Encoder("prompt_completion", model.tokenizer, chat_template=model.chat_template)
  stops = rollout.stop_ids(model.tokenizer, model.chat_template)
  prompts = [encoder.prompt_ids(dict(r)) for r in records]
  ids: list[np.ndarray] = []
  for start in range(0, len(prompts), batch_size):
    ids += sample.generate(model.config, model.adapter, model.params, prompts[start:start + batch_size],
                           max_new_tokens, temperature=temperature, stop_ids=stops,
                           rng=jax.random.PRNGKey(seed + start))
  vocab = model.tokenizer.vocab_size
  texts = [model.tokenizer.decode([int(t) for t in c if int(t) not in stops and int(t) < vocab]) for c in ids]
  means, total = {}, np.zeros(len(ids))
  for name, weight, fn in functions:
    if fn is None:
      if reward_model is None:
        raise UserError("the rewards name 'model': pass the reward model (--reward_model=DIR).")
      width = max(len(p) for p in prompts) + max_new_tokens
      values = rollout.score_completions(reward_model.module, reward_model.params, prompts, ids,
                                         int(model.tokenizer.eos_id), width)
    else:
      fields = {k: [r.get(k) for r in records] for k in records[0] if k not in ("prompt", "_where")}
      values = np.asarray(rewards_lib.call(name, fn, [r["prompt"] for r in records], texts, fields))
    means[name] = float(np.mean(values))
    total += weight * values
  lengths = [len(c) for c in ids]
  examples = [(_text(r["prompt"]), t, float(v)) for r, t, v in list(zip(records, texts, total))[:4]]
  return RewardResult(len(records), means, float(total.mean()), float(np.mean(lengths)),
                      float(np.mean([len(c) > 0 and int(c[-1]) in stops for c in ids])), examples)


def _text(prompt: Any) -> str:
  return prompt if isinstance(prompt, str) else " / ".join(chat.content_text(m["content"], "prompt") for m in prompt)
