"""Perplexity and bits per byte of a model over texts, each scored as BOS + text + EOS.

A text longer than `seq_len` is split as in Hugging Face's perplexity guide: windows of `seq_len` inputs start
every `stride` tokens, and each window scores only the targets no earlier window scored. `stride = seq_len` gives
non-overlapping windows; a smaller stride gives each token more context at the cost of more windows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from fmjax.evaluation import scoring
from fmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """Token-weighted totals over every text."""

  documents: int  # texts scored
  tokens: int  # predicted tokens (with one EOS per text when `eos`)
  bytes: int  # UTF-8 bytes of the texts
  nll_sum: float  # Σ −log p over predicted tokens (nats)
  nll: float  # nll_sum / tokens
  perplexity: float  # exp(nll)
  bits_per_byte: float  # nll_sum / ln 2 / bytes (the EOS terms included)


def windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, end, first scored) for the targets [0, length) of one text: inputs [begin, end) predict targets
  [begin, end), of which [first scored, end) are scored. Every target is scored exactly once."""
  out, scored = [], 0
  for begin in range(0, length, stride):
    end = min(begin + seq_len, length)
    out.append((begin, end, scored))
    scored = end
    if end == length:
      break
  return out


def perplexity(model: Any, texts: Sequence[str], seq_len: int = 1024, stride: int = 0, batch_size: int = 8,
               eos: bool = True) -> PerplexityResult:
  """Scores `texts` under `model` (an `fmjax.api.Model`) in batches of `batch_size` windows of `seq_len` tokens;
  `stride` 0 means `seq_len` (non-overlapping windows). `eos=False` leaves out each text's EOS (as
  lm-evaluation-harness does for whole-document likelihoods)."""
  stride = stride or seq_len
  if not 0 < stride <= seq_len:
    raise UserError(f"stride={stride} must lie in (0, seq_len={seq_len}]; a larger stride skips tokens.")
  if not texts:
    raise UserError("no texts to score.")
  tok = model.tokenizer
  inputs, targets, skip = [], [], []
  for text in texts:
    seq = np.concatenate([[tok.bos_id], tok.encode(text)] + ([[tok.eos_id]] if eos else [])).astype(np.int32)
    for begin, end, scored in windows(len(seq) - 1, seq_len, stride):
      inputs.append(seq[begin:end])
      targets.append(seq[begin + 1:end + 1])
      skip.append(scored - begin)
  nll_sum, tokens = 0.0, 0
  for (logp, _), k in zip(scoring.logprobs(model, inputs, targets, batch_size, seq_len), skip):
    nll_sum -= float(np.sum(logp[k:], dtype=np.float64))
    tokens += len(logp) - k
  if not tokens:
    raise UserError("the texts hold no tokens to score (all empty, and eos=False).")
  n_bytes = sum(len(t.encode("utf-8")) for t in texts)
  nll = nll_sum / tokens
  return PerplexityResult(len(texts), tokens, n_bytes, nll_sum, nll, math.exp(nll),
                          nll_sum / math.log(2) / n_bytes if n_bytes else math.nan)
