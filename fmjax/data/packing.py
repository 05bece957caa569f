"""Packing documents into fixed-length rows with segment ids, positions and a loss mask.

Documents (each BOS + tokens + EOS) are concatenated in a seeded order per epoch; row r covers stream positions
[r·T, r·T + T] so no token is dropped between rows. Within a row, `segment_ids` number the documents 1..k, `positions`
restart at 0 where a document starts (a document continued from the previous row restarts at 0 too), and `loss_mask`
is 1 only where the target token belongs to the same document as the input token.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


class PackedStream:
  """Deterministic, resumable stream of packed global batches; each process materialises only its rows."""

  def __init__(self, docs: Sequence[np.ndarray], batch_size: int, seq_len: int, seed: int, bos_id: int,
               eos_id: int, process_index: int = 0, process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f"train.batch_size={batch_size} must be divisible by the process count {process_count}.")
    self.docs = [np.concatenate([[bos_id], d, [eos_id]]).astype(np.int32) for d in docs]
    total = sum(len(d) for d in self.docs)
    self.rows_per_epoch = (total - 1) // seq_len
    if self.rows_per_epoch < batch_size:
      raise ValueError(f"the corpus has {total} tokens, fewer than one batch of {batch_size}×{seq_len}; "
                       "use a smaller train.batch_size or train.seq_len, or more data.")
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.local_rows = batch_size // process_count
    self.first_row = process_index * self.local_rows
    self.step = 0
    self._epoch, self._stream, self._doc_ids = -1, None, None

  def _load_epoch(self, epoch: int) -> None:
    if epoch == self._epoch:
      return
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))
    self._stream = np.concatenate([self.docs[i] for i in order])
    self._doc_ids = np.concatenate([np.full(len(self.docs[i]), j, np.int32) for j, i in enumerate(order)])
    self._epoch = epoch

  def _row(self, global_row: int) -> dict[str, np.ndarray]:
    epoch, r = divmod(global_row, self.rows_per_epoch)
    self._load_epoch(epoch)
    T = self.seq_len
    window = slice(r * T, r * T + T + 1)
    ids, docs = self._stream[window], self._doc_ids[window]
    seg = docs[:T] - docs[0] + 1
    starts = np.flatnonzero(np.diff(seg, prepend=0))
    positions = np.arange(T) - starts[np.searchsorted(starts, np.arange(T), side="right") - 1]
    return dict(tokens=ids[:T], targets=ids[1:], loss_mask=(docs[1:] == docs[:T]).astype(np.float32),
                segment_ids=seg.astype(np.int32), positions=positions.astype(np.int32))

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`."""
    base = step * self.batch_size + self.first_row
    rows = [self._row(base + i) for i in range(self.local_rows)]
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.batch(self.step)
    self.step += 1
    return out

  def get_state(self) -> dict[str, int]:
    return {"step": self.step}

  def set_state(self, state: dict[str, int]) -> None:
    self.step = int(state["step"])
