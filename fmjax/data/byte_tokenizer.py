"""UTF-8 byte tokenizer: no training, no files, every string round-trips."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
  """ids 0 = PAD, 1 = BOS, 2 = EOS, 3 + b = byte b."""

  pad_id, bos_id, eos_id = 0, 1, 2
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

  def decode(self, ids) -> str:
    """Text of the byte ids; special ids and ids past the bytes (a padded model vocabulary) decode to nothing."""
    data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
    return data.decode("utf-8", errors="replace")
