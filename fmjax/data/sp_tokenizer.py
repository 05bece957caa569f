"""SentencePiece BPE tokenizer with byte fallback: training, caching and loading.

Fixed ids: 0 = PAD, 1 = UNK, 2 = BOS, 3 = EOS, then the chat markers reserved for chat fine-tuning, one id each. Normalisation
is the identity, whitespace is kept as is and no dummy-prefix space is added, so every string round-trips exactly
(code indentation included) and concatenated pieces of a chat template encode the same wherever they stand;
characters outside the learned pieces fall back to UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from typing import Iterable

import numpy as np
import sentencepiece as spm

from fmjax.data import cache
from fmjax.errors import UserError

CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TRAINER_VERSION = 3  # bump whenever `train`'s settings change, so cached models are retrained
# sentencepiece's default max_sentence_length: it silently skips longer lines, so a corpus of one long line (a
# minified file, a dump without newlines) left it nothing to learn from. `train` cuts them into pieces this long.
MAX_SENTENCE_BYTES = 4192


class SentencePieceTokenizer:
  """Encodes text to int32 ids without BOS/EOS (the pipelines add them)."""

  def __init__(self, model_path: str):
    if not os.path.isfile(model_path):
      state = "is a directory, not a .model file" if os.path.isdir(model_path) else "does not exist"
      raise FileNotFoundError(f"tokenizer model {model_path!r} {state}; give a .model file, or train one with "
                              f"`python tools/train_tokenizer.py --output=FILE.model`.")
    self.path = model_path
    try:
      self.sp = spm.SentencePieceProcessor(model_file=model_path)
    except (RuntimeError, OSError) as e:  # "could not parse ModelProto": some other file
      raise UserError(f"tokenizer {model_path!r} is not a sentencepiece .model file; train one with `python "
                      "tools/train_tokenizer.py --input=SOURCE --output=FILE.model`, or give a Hugging Face "
                      "tokenizer.json.") from e
    self.vocab_size = self.sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
    if min(self.pad_id, self.bos_id, self.eos_id) < 0:
      raise UserError(f"tokenizer {model_path!r} lacks a PAD, BOS or EOS id; retrain it with "
                      "tools/train_tokenizer.py.")

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.sp.encode(text), np.int32)

  def __getstate__(self) -> dict:  # grain workers get the path and load the model themselves
    return {"path": self.path}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["path"])

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def save(self, directory: str) -> None:
    """Copies the model file into `directory` as tokenizer.model."""
    target = os.path.join(directory, "tokenizer.model")
    if os.path.abspath(self.path) != os.path.abspath(target):
      shutil.copyfile(self.path, target)


def split_long(line: str, limit: int = MAX_SENTENCE_BYTES) -> list[str]:
  """`line` cut into pieces of at most `limit` UTF-8 bytes, each ending after a space where one falls in the
  piece's second half (so words stay whole), else at a character boundary."""
  if 4 * len(line) <= limit:  # a character is at most 4 bytes: most lines need no encoding
    return [line]
  data = line.encode()
  if len(data) <= limit:
    return [line]
  pieces, start = [], 0
  while start < len(data):
    end = min(start + limit, len(data))
    if end < len(data):
      while data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back off to the character's first byte
        end -= 1
      space = data.rfind(b" ", start + limit // 2, end)
      end = space + 1 if space >= 0 else end
    pieces.append(data[start:end].decode())
    start = end
  return pieces


def train(texts: Iterable[str], vocab_size: int, output: str) -> str:
  """Trains a BPE model on `texts` (split into lines, and lines longer than MAX_SENTENCE_BYTES into pieces) and
  writes it atomically to `output`; returns `output`."""
  lines = (piece for text in texts for line in text.split("\n") if line.strip() for piece in split_long(line))
  writer = tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(output)) or ".", delete=False)
  try:
    try:  # rare characters (outside 99.95% coverage) are left to byte fallback
      spm.SentencePieceTrainer.train(
          sentence_iterator=lines, model_writer=writer, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
          character_coverage=0.9995, pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=list(CHAT_MARKERS),
          normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
          split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=MAX_SENTENCE_BYTES,
          num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
      most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(e))
      if most:  # sentencepiece's own words name neither the text nor the setting
        raise UserError(f"the tokenizer's training text is too small for vocab_size={vocab_size}: it yields at most "
                        f"{most.group(1)} pieces; lower the vocabulary size (data.vocab_size, or train_tokenizer.py "
                        f"--vocab_size) to {most.group(1)} or less, or train on more text.") from e
      raise UserError(f"training a tokenizer of vocab_size={vocab_size} failed: {e}") from e
    writer.close()
    os.chmod(writer.name, 0o644)  # a temporary file is private; a tokenizer is not
    os.replace(writer.name, output)  # concurrent trainers of the same model never see a half-written file
  finally:
    if os.path.exists(writer.name):
      os.unlink(writer.name)
  return output


def fingerprint(texts: list[str], vocab_size: int) -> str:
  """Identifies a trained model by trainer version, vocabulary size and the exact training text."""
  h = hashlib.sha256(f"{TRAINER_VERSION}:{vocab_size}".encode())
  for text in texts:
    h.update(text.encode())
    h.update(b"\0")
  return h.hexdigest()[:12]


def cache_dir() -> str:
  """Where auto-trained tokenizers live: $FMJAX_CACHE/tokenizers, default ~/.cache/fmjax/tokenizers."""
  return cache.cache_dir("tokenizers")
