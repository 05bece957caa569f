"""Hugging Face tokenizers (`tokenizer.json`) as fmjax tokenizers, so imported models train on their own vocabulary.

The special ids come from the `tokenizer_config.json` beside the file (`bos_token`, `eos_token`, `pad_token`), else
from the model's `config.json`. Models without a BOS token (Qwen) get their EOS (`<|endoftext|>`, the document
separator of their pre-training) in its place; a missing pad token is EOS too (padding never carries loss).
"""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np

from fmjax import checks
from fmjax.errors import UserError

CONFIG = "tokenizer_config.json"


def _token(value) -> str | None:
  """A special token as written in tokenizer_config.json: a string, or {"content": str, ...}."""
  return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
  """Encodes text to int32 ids without special tokens (the pipelines add BOS/EOS)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
      state = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
      raise FileNotFoundError(f"tokenizer file {path!r} {state}; give a Hugging Face tokenizer.json (from "
                              "`tools/convert_hf.py import`, or in a model's directory).")
    self.path = path
    try:
      self.tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for any unreadable file
      raise UserError(f"{path!r} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:200]}); give the "
                      "tokenizer.json of a model directory (or `tools/convert_hf.py import`'s copy).") from e
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    directory = os.path.dirname(path)
    names = {}
    if os.path.isfile(os.path.join(directory, CONFIG)):
      settings = checks.json_object(os.path.join(directory, CONFIG))
      names = {k: _token(settings.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
    ids = {k: self.tok.token_to_id(v) if v else None for k, v in names.items()}
    model_config = os.path.join(directory, "config.json")
    if os.path.isfile(model_config):
      hf = checks.json_object(model_config)
      for key in ("bos_token", "eos_token", "pad_token"):
        value = hf.get(f"{key}_id")
        if ids.get(key) is None and value is not None:
          ids[key] = value[0] if isinstance(value, list) else value
    if ids.get("eos_token") is None:
      raise UserError(f"{path}: no EOS token (set eos_token in {os.path.join(directory, CONFIG)}).")
    self.eos_id = int(ids["eos_token"])
    self.bos_id = int(ids["bos_token"]) if ids.get("bos_token") is not None else self.eos_id
    self.pad_id = int(ids["pad_token"]) if ids.get("pad_token") is not None else self.eos_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def __getstate__(self) -> dict:  # grain workers get the path and load the file themselves
    return {"path": self.path}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["path"])

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for name in (self.path, os.path.join(os.path.dirname(self.path), CONFIG)):
      if os.path.isfile(name):
        with open(name, "rb") as f:
          h.update(f.read())
    return h.hexdigest()[:16]

  def save(self, directory: str) -> None:
    """Copies tokenizer.json (and its tokenizer_config.json) into `directory`."""
    for name in (self.path, os.path.join(os.path.dirname(self.path), CONFIG)):
      target = os.path.join(directory, "tokenizer.json" if name == self.path else CONFIG)
      if os.path.isfile(name) and os.path.abspath(name) != os.path.abspath(target):
        shutil.copyfile(name, target)
