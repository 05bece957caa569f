"""Heuristic quality filters (Gopher-style, Rae et al. 2021, appendix A) with configurable thresholds.

`check(text, cfg)` returns the name of the first rule that rejects the document, or None. Rules, in order (a
threshold of 0, or 1.0 for the ratio maxima, turns a rule off):
  min_chars / max_chars        length in characters
  min_words / max_words        length in whitespace-separated words
  min_alpha_ratio              letters / non-whitespace characters (Unicode letters; digits, punctuation and
                               symbols count against it): drops tables of numbers, base64 blobs, markup soup
  max_dup_line_ratio           non-empty lines (compared stripped) equal to an earlier line / non-empty lines
  max_repeated_ngram_ratio     Gopher's duplicate n-gram character fraction for n = `repeated_ngram_n` words: the
                               characters of words covered by a second or later occurrence of any word n-gram, over
                               the characters of all words (a word covered several times counts once), on the text
                               as normalized for dedup (NFKC, lowercase). Gopher drops a document above 0.15 for
                               n = 5 (0.10 for n = 10).
The n-gram statistic reuses the word hashes (CRC-32) that near dedup needs anyway and finds repeats with NumPy;
letters and spaces of ASCII text are counted by `bytes.translate`. The other statistics use the raw text.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from fmjax.curation import dedup
from fmjax.errors import UserError

RULES = ("min_chars", "max_chars", "min_words", "max_words", "min_alpha_ratio", "max_dup_line_ratio",
         "max_repeated_ngram_ratio")
_ASCII_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ASCII_SPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # what str.isspace() accepts below 128
_ASCII_RUN = re.compile(r"[\x00-\x7f]+")
_NGRAM_MULT = np.random.default_rng(7).integers(0, 2**64, 64, dtype=np.uint64, endpoint=False) | np.uint64(1)


@dataclasses.dataclass(frozen=True)
class QualityConfig:
  """Thresholds; 0 (or 1.0 for the ratio maxima) turns a rule off. Defaults follow Gopher where it has one."""
  min_chars: int = 200
  max_chars: int = 1_000_000
  min_words: int = 0
  max_words: int = 0
  min_alpha_ratio: float = 0.6
  max_dup_line_ratio: float = 0.3
  max_repeated_ngram_ratio: float = 0.15
  repeated_ngram_n: int = 5

  def __post_init__(self):
    for name in ("min_alpha_ratio", "max_dup_line_ratio", "max_repeated_ngram_ratio"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise UserError(f"{name}={getattr(self, name)} must be in [0, 1] (0 or 1.0 turns the rule off).")
    for name in ("min_chars", "max_chars", "min_words", "max_words"):
      if getattr(self, name) < 0:
        raise UserError(f"{name}={getattr(self, name)} must be >= 0 (0 turns the rule off).")
    if not 1 <= self.repeated_ngram_n <= 64:
      raise UserError(f"repeated_ngram_n={self.repeated_ngram_n} must be in [1, 64] (Gopher uses 5 to 10).")


def alpha_ratio(text: str) -> float:
  """Letters / non-whitespace characters (1.0 for a text without any)."""
  ascii_part = text.encode("ascii", "ignore")  # bytes.translate counts classes at C speed
  letters = len(ascii_part) - len(ascii_part.translate(None, _ASCII_LETTERS))
  non_space = len(ascii_part.translate(None, _ASCII_SPACE))
  if not text.isascii():
    other = _ASCII_RUN.sub("", text)
    letters += sum(map(str.isalpha, other))
    non_space += len(other) - sum(map(str.isspace, other))
  return letters / non_space if non_space else 1.0


def dup_line_ratio(text: str) -> float:
  """Fraction of non-empty lines (stripped) that repeat an earlier line."""
  lines = [s for s in (line.strip() for line in text.splitlines()) if s]
  return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def repeated_ngram_ratio(normalized: str, n: int, words: np.ndarray | None = None) -> float:
  """Characters of words covered by a second or later occurrence of a word n-gram / characters of all words, in a
  normalized text (`dedup.normalize`); `words` are its `dedup.word_hashes` if already known. Lengths are UTF-8
  bytes (characters, for ASCII)."""
  h = dedup.word_hashes(normalized) if words is None else words
  if len(h) <= n:
    return 0.0
  count = len(h) - n + 1
  acc = h[:count] * _NGRAM_MULT[0]
  for j in range(1, n):  # n-gram hash: its word hashes times random odd multipliers, mixed
    acc += h[j:j + count] * _NGRAM_MULT[j]
  _, first = np.unique(dedup.fmix64(acc), return_index=True)
  if len(first) == count:
    return 0.0
  repeat = np.ones(count, bool)
  repeat[first] = False
  starts = np.flatnonzero(repeat)
  # words i .. i+n-1 are covered by the repeat starting at i: +1 at i, -1 at i+n, running sum > 0
  delta = np.bincount(starts, minlength=len(h) + 1) - np.bincount(starts + n, minlength=len(h) + 1)
  cover = np.cumsum(delta)[:len(h)] > 0
  data = np.frombuffer(normalized.encode("utf-8"), np.uint8)
  lengths = np.diff(np.concatenate(([-1], np.flatnonzero(data == 32), [len(data)]))) - 1
  return float(lengths[cover].sum() / max(lengths.sum(), 1))


def check(text: str, cfg: QualityConfig, normalized: str | None = None, words: np.ndarray | None = None
          ) -> str | None:
  """The name of the first rule (see `RULES`) that rejects `text`, or None if it passes all.

  `normalized` (`dedup.normalize(text)`) and `words` (its `dedup.word_hashes`) save work if the caller has them.
  """
  if cfg.min_chars and len(text) < cfg.min_chars:
    return "min_chars"
  if cfg.max_chars and len(text) > cfg.max_chars:
    return "max_chars"
  if cfg.min_words or cfg.max_words:
    n_words = len(text.split())
    if cfg.min_words and n_words < cfg.min_words:
      return "min_words"
    if cfg.max_words and n_words > cfg.max_words:
      return "max_words"
  if cfg.min_alpha_ratio and alpha_ratio(text) < cfg.min_alpha_ratio:
    return "min_alpha_ratio"
  if cfg.max_dup_line_ratio < 1.0 and dup_line_ratio(text) > cfg.max_dup_line_ratio:
    return "max_dup_line_ratio"
  if cfg.max_repeated_ngram_ratio < 1.0 and cfg.max_repeated_ngram_ratio < repeated_ngram_ratio(
      dedup.normalize(text) if normalized is None else normalized, cfg.repeated_ngram_n, words):
    return "max_repeated_ngram_ratio"
  return None
