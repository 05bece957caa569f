"""What every fmjax tokenizer (byte, sentencepiece, Hugging Face) shares: its identity.

A leaf module (no fmjax imports), so sources, prepared data, the train loop and checkpoints can all name the
tokenizer their data or weights were made with. Building a tokenizer from a config is `fmjax.data.make_tokenizer`.
"""

from __future__ import annotations

import hashlib
from typing import Any


def tokenizer_id(tokenizer: Any) -> str:
  """Identifies a tokenizer by its kind and, for a model file, the file's bytes."""
  path = getattr(tokenizer, "path", None)
  if path is None:
    return f"{type(tokenizer).__name__}:{tokenizer.vocab_size}"
  if hasattr(tokenizer, "fingerprint"):
    return f"hf:{tokenizer.fingerprint()}"
  with open(path, "rb") as f:
    return f"sentencepiece:{hashlib.sha256(f.read()).hexdigest()[:16]}"
