"""Exact and near (MinHash + LSH) deduplication: the keys and checks that the Beam stages group and compare by.

Both work on `normalize(text)`: NFKC, lowercase, runs of whitespace collapsed to one space.

Exact: an 8-byte BLAKE2b `digest` of the normalized text; documents are grouped by it (`fmjax.curation.stages`).

Near: MinHash over word shingles (`shingle_size` consecutive whitespace-separated words of the normalized text).
  * shingle hashes: each word is hashed once (CRC-32); a shingle is the sum of its word hashes times random odd 64-bit
    multipliers (one per position), mixed (MurmurHash3 fmix64) and cut to 32 bits; a document with fewer words than
    `shingle_size` is one shingle.
  * permutations: multiply-add-shift, h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 with random 64-bit a_i (odd), b_i,
    a 2-independent family for 32-bit keys (Dietzfelbinger 1996) that needs no modulo; all `num_perm` of them are
    one (num_perm, shingles) array operation.
  * LSH (`Bands`): the first bands * rows signature values, split into `bands` bands of `rows`; each band is hashed
    to a 64-bit key and documents sharing a key are candidates. `lsh_params` picks (bands, rows) by the standard
    rule (minimise the weighted false-positive and false-negative areas under the S-curve 1 - (1 - s^rows)^bands
    around the threshold) with weights 0.1 / 0.9: every candidate is verified, so a false positive costs one
    signature comparison while a false negative is a missed duplicate. 128 perms at 0.8 give 14 bands of 9 rows (a
    pair at Jaccard 0.8 / 0.85 / 0.9 becomes a candidate with probability 0.87 / 0.97 / 0.999).
  * verification: a candidate pair is an edge only if the estimated Jaccard of the two signatures is >= threshold.
    Signatures travel as their low 8 bits (b-bit minwise hashing, Li & Koenig 2010): two values agree with
    probability J + (1 - J) / 256, and the estimate corrects for that, at the same variance.
  * `components` of the verified edges: one document (the first in input order) is kept per component.
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
import zlib

import numpy as np
from fmjax.errors import UserError

_U64 = np.uint64
_M1, _M2 = _U64(0xFF51AFD7ED558CCD), _U64(0xC4CEB9FE1A85EC53)  # MurmurHash3 fmix64 constants
_S33, _S32 = _U64(33), _U64(32)
_SIG_BITS = 8  # bits of each signature value kept for verification
_CHUNK = 4096  # shingles per MinHash block: (num_perm, _CHUNK) uint64 = 4 MiB at 128 perms


def normalize(text: str) -> str:
  """NFKC, lowercase, whitespace runs collapsed to single spaces, stripped: the text both deduplicators compare."""
  return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def word_hashes(normalized: str) -> np.ndarray:
  """CRC-32 (as uint64) of each word of a normalized text (words are separated by single spaces)."""
  return np.fromiter(map(zlib.crc32, normalized.encode("utf-8").split(b" ")), _U64)


def fmix64(x: np.ndarray) -> np.ndarray:
  """MurmurHash3's 64-bit finaliser of a uint64 array (wrapping arithmetic): makes linear combinations look random."""
  x = x ^ (x >> _S33)
  x *= _M1
  x ^= x >> _S33
  x *= _M2
  x ^= x >> _S33
  return x


def digest(normalized: str) -> int:
  """64-bit BLAKE2b digest of an already normalized text: the exact-dedup key."""
  return int.from_bytes(hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.1, fn_weight: float = 0.9) -> tuple[int, int]:
  """(bands, rows), bands * rows <= num_perm, minimising fp_weight * FP + fn_weight * FN, where FP is the area under
  the candidate probability 1 - (1 - s^rows)^bands for s in [0, threshold] and FN the area above it on [threshold,
  1] (the rule of Leskovec et al., Mining of Massive Datasets, ch. 3, as in datasketch)."""
  if not 0.0 < threshold < 1.0:
    raise UserError(f"near-dedup threshold={threshold} must be in (0, 1), e.g. 0.8.")
  if num_perm < 2:
    raise UserError(f"num_perm={num_perm} must be >= 2 (128 is typical).")
  lo = (np.arange(400) + 0.5) / 400 * threshold  # midpoint rule on each side
  hi = threshold + (np.arange(400) + 0.5) / 400 * (1.0 - threshold)
  best = None
  for bands in range(1, num_perm + 1):
    for rows in range(1, num_perm // bands + 1):
      fp = np.mean(1.0 - (1.0 - lo**rows) ** bands) * threshold
      fn = np.mean((1.0 - hi**rows) ** bands) * (1.0 - threshold)
      cost = fp_weight * fp + fn_weight * fn
      if best is None or cost < best[0]:
        best = (cost, bands, rows)
  return best[1], best[2]


class MinHasher:
  """MinHash signatures (uint32, `num_perm` values) of word shingles of a normalized text; see the module doc."""

  def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 1):
    if num_perm < 2 or shingle_size < 1:
      raise UserError(f"num_perm={num_perm} must be >= 2 and shingle_size={shingle_size} >= 1.")
    self.num_perm, self.shingle_size = num_perm, shingle_size
    rng = np.random.default_rng(seed)
    draw = lambda n: rng.integers(0, 2**64, n, dtype=_U64, endpoint=False)  # noqa: E731
    self.word_mult = draw(shingle_size) | _U64(1)
    self.a, self.b = draw(num_perm)[:, None] | _U64(1), draw(num_perm)[:, None]

  def shingles(self, words: np.ndarray) -> np.ndarray:
    """32-bit hashes (as uint64) of the `shingle_size`-word shingles, in text order (repeats kept), from the word
    hashes of `word_hashes`."""
    k = self.shingle_size
    n = max(len(words) - k + 1, 1)
    acc = words[:n] * self.word_mult[0]
    for j in range(1, min(k, len(words))):
      acc += words[j:j + n] * self.word_mult[j]
    return fmix64(acc) >> _S32

  def signature(self, normalized: str | None = None, words: np.ndarray | None = None) -> np.ndarray:
    """The MinHash signature (uint32, `num_perm` values) of a normalized text, or of its `word_hashes`."""
    x = self.shingles(word_hashes(normalized) if words is None else words)
    if len(x) <= _CHUNK:
      h = self.a * x
      h += self.b
      sig = h.min(axis=1)
    else:  # bounded scratch for very long documents
      sig = np.full(self.num_perm, np.iinfo(np.uint64).max, _U64)
      for start in range(0, len(x), _CHUNK):
        h = self.a * x[start:start + _CHUNK]
        h += self.b
        np.minimum(sig, h.min(axis=1), out=sig)
    return (sig >> _S32).astype(np.uint32)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
  """Estimated Jaccard similarity of two full MinHash signatures: the fraction of equal values."""
  return float(np.mean(sig_a == sig_b))


class Bands:
  """LSH over MinHash signatures: band keys to group candidates by, and b-bit verification of a candidate pair."""

  def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1):
    self.threshold = threshold
    self.bands, self.rows = lsh_params(threshold, num_perm)
    rng = np.random.default_rng(seed + 1)
    self._row_mult = rng.integers(0, 2**64, self.rows, dtype=_U64, endpoint=False) | _U64(1)
    self._band_salt = rng.integers(0, 2**64, self.bands, dtype=_U64, endpoint=False)

  def keys(self, sig: np.ndarray) -> list[int]:
    """One 64-bit key per band (the band index is mixed in, so all bands can share one grouping)."""
    bands = sig[:self.bands * self.rows].reshape(self.bands, self.rows).astype(_U64)
    return fmix64((bands * self._row_mult).sum(axis=1, dtype=_U64) + self._band_salt).tolist()

  @staticmethod
  def low_bits(sig: np.ndarray) -> bytes:
    """The low 8 bits of each signature value: what travels with a document for verification."""
    return (sig & ((1 << _SIG_BITS) - 1)).astype(np.uint8).tobytes()

  @staticmethod
  def jaccard(low_a: bytes, low_b: bytes) -> float:
    """Estimated Jaccard of two documents from their `low_bits`, corrected for chance agreement of 8-bit values."""
    a, b = np.frombuffer(low_a, np.uint8), np.frombuffer(low_b, np.uint8)
    chance = 1.0 / (1 << _SIG_BITS)
    return float(((a == b).mean() - chance) / (1.0 - chance))


def components(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Connected components of an undirected graph given as an (E, 2) int64 array of node ids.

  Returns (nodes, roots): every node that has an edge, and the smallest node id of its component. Min-label
  propagation with pointer jumping, all NumPy: memory is a few int64 arrays of the edge set's size.
  """
  edges = np.asarray(edges, np.int64).reshape(-1, 2)
  nodes, inverse = np.unique(edges, return_inverse=True)
  u, v = inverse.reshape(-1, 2).T
  label = np.arange(len(nodes))
  while True:
    low = np.minimum(label[u], label[v])
    new = label.copy()
    np.minimum.at(new, u, low)
    np.minimum.at(new, v, low)
    new = new[new]  # pointer jumping: a label's own label is at most as large
    while not np.array_equal(new, new[new]):
      new = new[new]
    if np.array_equal(new, label):
      return nodes, nodes[label]  # np.unique sorted the ids, so the smallest index is the smallest id
    label = new
