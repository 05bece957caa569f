"""Preference accuracy: how often a model finds the chosen response of a pair likelier than the rejected one.

Pairs ({"prompt"?, "chosen", "rejected"}: strings or chat messages) are rendered exactly as training renders them
(`fmjax.data.formats.Encoder`, with the model's chat template): BOS + prompt + response + EOS. A response's
log-probability is the sum over its loss-bearing tokens (the response, its end marker under a chat template, and
EOS) given the prompt, as in preference training. With a reference model, a response's implicit reward is its
log-ratio log π(y|x) − log π_ref(y|x) (β = 1; multiply by β for training's `rewards/margins`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from fmjax.data import formats
from fmjax.evaluation import scoring
from fmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class PreferenceResult:
  """Means over pairs; ties count as wrong."""

  pairs: int  # pairs scored
  accuracy: float  # fraction with log π(chosen) > log π(rejected)
  logp_chosen: float  # mean log π(chosen | prompt)
  logp_rejected: float  # mean log π(rejected | prompt)
  reward_accuracy: float | None = None  # with a reference: fraction with a positive reward margin
  reward_margin: float | None = None  # with a reference: mean log-ratio(chosen) − log-ratio(rejected)


def response_logps(model: Any, records: Sequence[dict], batch_size: int = 8) -> np.ndarray:
  """[pairs, 2] float64: the summed log-probabilities of each record's chosen and rejected response."""
  encode = formats.Encoder("preference", model.tokenizer, chat_template=model.chat_template)
  inputs, targets, masks = [], [], []
  for record in records:
    example = encode(record)
    for side in ("chosen_", "rejected_"):
      inputs.append(example[side + "tokens"])
      targets.append(example[side + "targets"])
      masks.append(example[side + "loss_mask"])
  rows = scoring.logprobs(model, inputs, targets, batch_size)
  sums = [np.sum(logp * mask, dtype=np.float64) for (logp, _), mask in zip(rows, masks)]
  return np.asarray(sums, np.float64).reshape(-1, 2)


def preference_accuracy(model: Any, records: Sequence[dict], reference: Any = None,
                        batch_size: int = 8) -> PreferenceResult:
  """Scores preference `records` under `model` and, if given, a `reference` model (each with its own tokenizer
  and chat template)."""
  if not records:
    raise UserError("no preference pairs to score.")
  policy = response_logps(model, records, batch_size)
  result = PreferenceResult(len(policy), float(np.mean(policy[:, 0] > policy[:, 1])), float(np.mean(policy[:, 0])),
                            float(np.mean(policy[:, 1])))
  if reference is None:
    return result
  ratios = policy - response_logps(reference, records, batch_size)
  margins = ratios[:, 0] - ratios[:, 1]
  return dataclasses.replace(result, reward_accuracy=float(np.mean(margins > 0)), reward_margin=float(np.mean(margins)))
