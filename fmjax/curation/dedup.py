"""Exact and near (MinHash + LSH) deduplication with compact indexes.

Both deduplicators work on `normalize(text)`: NFKC, lowercase, runs of whitespace collapsed to one space.

Exact: an 8-byte BLAKE2b digest of the normalized text, kept in an open-addressing table (8-byte key, 4-byte value,
load <= 0.7): about 17-34 bytes per indexed document.

Near: MinHash over word shingles (`shingle_size` consecutive whitespace-separated words of the normalized text).
  * shingle hashes: each word is hashed once (CRC-32); a shingle is the sum of its word hashes times random odd 64-bit
    multipliers (one per position), mixed (MurmurHash3 fmix64) and cut to 32 bits; a document with fewer words than
    `shingle_size` is one shingle.
  * permutations: multiply-add-shift, h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 with random 64-bit a_i (odd), b_i,
    a 2-independent family for 32-bit keys (Dietzfelbinger 1996) that needs no modulo; all `num_perm` of them are
    one (num_perm, shingles) array operation.
  * LSH: the first bands * rows signature values, split into `bands` bands of `rows`; each band is hashed to 64 bits
    and indexed (band hash -> first kept document with it) in one open-addressing table. `lsh_params` picks (bands,
    rows) by the standard rule (minimise the weighted false-positive and false-negative areas under the S-curve
    1 - (1 - s^rows)^bands around the threshold) with weights 0.1 / 0.9: every LSH candidate is verified, so a false
    positive costs one signature comparison while a false negative is a missed duplicate. 128 perms at 0.8 give
    14 bands of 9 rows (a pair at Jaccard 0.8 / 0.85 / 0.9 becomes a candidate with probability 0.87 / 0.97 / 0.999).
  * verification: a candidate is a near duplicate only if the estimated Jaccard of the two signatures is >=
    threshold. Kept signatures are stored as their low 8 bits (b-bit minwise hashing, Li & Koenig 2010): two
    values agree with probability J + (1 - J) / 256, and the estimate corrects for that, at the same variance.

Memory per kept document (128 perms, 14 bands): num_perm bytes of signature + about 12 bytes / load per band in the
LSH table (load 0.35-0.7 as the table doubles) -> about 0.4-0.65 KB with the exact index; nothing else grows with
the input.
"""

from __future__ import annotations

import array
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


class HashTable:
  """Map uint64 key -> uint32 value by open addressing (linear probing); the first insert of a key wins.

  Keys must already be well-mixed hashes (the slot is the key's low bits). Key 0 marks an empty slot, so a key 0 is
  stored as 1. Storage is two `array.array`s (8 + 4 bytes a slot): scalar probes read Python ints directly, and
  growing (doubling when the load would pass `max_load`) re-inserts through NumPy views of the same memory.
  """

  def __init__(self, capacity: int = 1 << 12, max_load: float = 0.7):
    if capacity & (capacity - 1) or capacity < 8:
      raise UserError(f"capacity={capacity} must be a power of two >= 8.")
    self.max_load, self.size = max_load, 0
    self._alloc(capacity)

  def _alloc(self, capacity: int) -> None:
    self.keys = array.array("Q", [0]) * capacity
    self.values = array.array("I", [0]) * capacity
    self.mask, self.limit = capacity - 1, int(self.max_load * capacity)

  @property
  def nbytes(self) -> int:
    """Bytes of the two slot arrays."""
    return len(self.keys) * 12

  def __len__(self) -> int:
    return self.size

  def get(self, key: int) -> int | None:
    """The value of one key, or None."""
    i = self._slot(key or 1)
    return self.values[i] if self.keys[i] else None

  def put(self, key: int, value: int) -> None:
    """Inserts one key unless present."""
    if self.size >= self.limit:
      self._grow(self.size + 1)
    key = key or 1
    i = self._slot(key)
    if not self.keys[i]:
      self.keys[i], self.values[i] = key, value
      self.size += 1

  def _slot(self, key: int) -> int:
    """The slot holding `key` (non-zero), or the empty slot where it would go (linear probing)."""
    keys, mask = self.keys, self.mask
    i = key & mask
    while keys[i] != key and keys[i] != 0:
      i = (i + 1) & mask
    return i

  def _grow(self, needed: int) -> None:
    old_keys = np.frombuffer(self.keys, _U64)
    used = old_keys != 0
    keys, values = old_keys[used], np.frombuffer(self.values, np.uint32)[used]
    capacity = len(self.keys)
    while needed > self.max_load * capacity:
      capacity *= 2
    del old_keys, used  # views of the old arrays
    self._alloc(capacity)
    self.size = 0
    for start in range(0, len(keys), 1 << 16):  # in chunks, so the scratch arrays stay small
      self._insert_absent(keys[start:start + (1 << 16)], values[start:start + (1 << 16)])

  def _insert_absent(self, keys: np.ndarray, values: np.ndarray) -> None:
    # Each round, every pending key tries its current slot; of the keys that find it empty the first claims it and
    # the rest move on. A key only ever passes occupied slots, so later linear-probing lookups still find it.
    table_keys, table_values = np.frombuffer(self.keys, _U64), np.frombuffer(self.values, np.uint32)
    slots = (keys & _U64(self.mask)).astype(np.int64)
    pending = np.arange(len(keys))
    while pending.size:
      empty = pending[table_keys[slots[pending]] == 0]
      _, first = np.unique(slots[empty], return_index=True)
      won = empty[first]
      table_keys[slots[won]], table_values[slots[won]] = keys[won], values[won]
      self.size += len(won)
      lost = np.ones(len(keys), bool)
      lost[won] = False
      pending = pending[lost[pending]]
      slots[pending] = (slots[pending] + 1) & self.mask


class ExactDeduper:
  """Remembers 8-byte digests of normalized texts; each maps to a caller-chosen uint32 (e.g. the kept doc's index)."""

  def __init__(self):
    self.table = HashTable()

  @staticmethod
  def digest(normalized: str) -> int:
    """64-bit BLAKE2b digest of an already normalized text."""
    return int.from_bytes(hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).digest(), "little")

  def get(self, digest: int) -> int | None:
    """The value stored with `digest`, or None if this text was not seen."""
    return self.table.get(digest)

  def add(self, digest: int, value: int) -> None:
    """Remembers `digest` (the first value stored for a digest stays)."""
    self.table.put(digest, value)

  @property
  def nbytes(self) -> int:
    """Bytes held by the digest table."""
    return self.table.nbytes


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


class NearDeduper:
  """MinHash + LSH index of kept documents; `query` finds the most similar kept document above the threshold.

  Kept documents are numbered 0, 1, ... in the order of `add`. Memory per kept document: see the module doc.
  """

  def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle_size: int = 5, seed: int = 1):
    self.threshold = threshold
    self.bands, self.rows = lsh_params(threshold, num_perm)
    self.hasher = MinHasher(num_perm, shingle_size, seed)
    rng = np.random.default_rng(seed + 1)
    self._row_mult = rng.integers(0, 2**64, self.rows, dtype=_U64, endpoint=False) | _U64(1)
    self._band_salt = rng.integers(0, 2**64, self.bands, dtype=_U64, endpoint=False)
    self.table = HashTable(1 << 14)
    self._block = 1 << 12  # signatures per storage block, so the store grows without copying
    self._sigs: list[np.ndarray] = []
    self.size = 0

  def signature(self, normalized: str | None = None, words: np.ndarray | None = None) -> np.ndarray:
    """The MinHash signature of a normalized text, or of its `word_hashes`."""
    return self.hasher.signature(normalized, words)

  def band_keys(self, sig: np.ndarray) -> np.ndarray:
    """One 64-bit key per band (the band index is mixed in, so all bands share one table)."""
    bands = sig[:self.bands * self.rows].reshape(self.bands, self.rows).astype(_U64)
    return fmix64((bands * self._row_mult).sum(axis=1, dtype=_U64) + self._band_salt)

  def query(self, sig: np.ndarray) -> tuple[int | None, float]:
    """(index of the most similar kept document with estimated Jaccard >= threshold, or None; the best estimate
    among the LSH candidates, 0.0 if none)."""
    found = {self.table.get(key) for key in self.band_keys(sig).tolist()} - {None}
    return self._verify(sig, found) if found else (None, 0.0)

  def add(self, sig: np.ndarray) -> int:
    """Indexes a kept document's signature; returns its index."""
    index = self._store(sig)
    for key in self.band_keys(sig).tolist():
      self.table.put(key, index)
    return index

  def query_or_add(self, sig: np.ndarray) -> tuple[int | None, float]:
    """`query`, then `add` if no near duplicate was found, probing each band's slot once for both."""
    table = self.table
    keys, values, mask = table.keys, table.values, table.mask
    found, free = set(), []
    for key in self.band_keys(sig).tolist():
      key = key or 1
      i = key & mask
      while True:
        k = keys[i]
        if k == key:
          found.add(values[i])
          break
        if k == 0:
          free.append((i, key))
          break
        i = (i + 1) & mask
    best = 0.0
    if found:
      original, best = self._verify(sig, found)
      if original is not None:
        return original, best
    index = self._store(sig)
    if table.size + len(free) > table.limit:  # the table grows: the free slots found above move
      for _, key in free:
        table.put(key, index)
    else:
      for i, key in free:
        if keys[i] == 0:
          keys[i], values[i] = key, index
          table.size += 1
        else:  # an earlier band of this document took the slot
          table.put(key, index)
    return None, best

  def _verify(self, sig: np.ndarray, candidates: set[int]) -> tuple[int | None, float]:
    """The candidate with the highest estimated Jaccard (b-bit corrected) if >= threshold, and that estimate."""
    cands = sorted(candidates)
    stored = np.stack([self._sigs[c // self._block][c % self._block] for c in cands])
    low = (sig & ((1 << _SIG_BITS) - 1)).astype(np.uint8)
    chance = 1.0 / (1 << _SIG_BITS)
    est = ((stored == low).mean(axis=1) - chance) / (1.0 - chance)
    best = int(np.argmax(est))
    return (cands[best] if est[best] >= self.threshold else None), float(est[best])

  def _store(self, sig: np.ndarray) -> int:
    index = self.size
    if index % self._block == 0:
      self._sigs.append(np.zeros((self._block, self.hasher.num_perm), np.uint8))
    self._sigs[-1][index % self._block] = sig & ((1 << _SIG_BITS) - 1)
    self.size += 1
    return index

  @property
  def nbytes(self) -> int:
    """Bytes held by the band table and the stored signatures."""
    return self.table.nbytes + sum(s.nbytes for s in self._sigs)
