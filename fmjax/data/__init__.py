"""Data: sources, record formats, tokenizers and grain pipelines that emit the batch contract (see README)."""

from __future__ import annotations

import logging
import os
from typing import Any

from fmjax.data import formats, sp_tokenizer
from fmjax.data.byte_tokenizer import ByteTokenizer
from fmjax.data.pipeline import eval_batches, train_dataset, train_specs
from fmjax.data.sources import DataError, open_source
from fmjax.data.sp_tokenizer import SentencePieceTokenizer

__all__ = ["ByteTokenizer", "DataError", "SentencePieceTokenizer", "Tokenizer", "check_vocab", "documents",
           "eval_batches", "make_tokenizer", "open_source", "train_dataset", "train_specs"]

Tokenizer = ByteTokenizer | SentencePieceTokenizer


def make_tokenizer(data_cfg: Any) -> Tokenizer:
  """`bytes`, or `sentencepiece`: the model at `data.tokenizer_path`, or (path empty) a BPE model of
  `data.vocab_size` pieces trained on the train split of `data.tokenizer_source` (default: the training sources)
  and cached on first use (seconds)."""
  if data_cfg.tokenizer == "bytes":
    return ByteTokenizer()
  if data_cfg.tokenizer != "sentencepiece":
    raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r} is unknown; use 'bytes' or 'sentencepiece'.")
  if data_cfg.tokenizer_path:
    return SentencePieceTokenizer(data_cfg.tokenizer_path)
  specs = [data_cfg.tokenizer_source] if data_cfg.tokenizer_source else [s.source for s in train_specs(data_cfg)]
  if all(spec.startswith("prepared:") for spec in specs):  # tokenized data names its tokenizer
    return SentencePieceTokenizer(open_source(specs[0], "all").meta["tokenizer_path"])
  texts = [t for spec in specs if not spec.startswith("prepared:")
           for t in documents(spec, "train", data_cfg.field, data_cfg.tokenizer_train_chars)]
  if not any(texts):
    raise DataError(f"the sources {specs} hold no text to train a tokenizer on; set data.tokenizer_path or "
                    "data.tokenizer_source.")
  name = "+".join(specs).replace(":", "-").replace("/", "_").replace("*", "_")[:80]
  digest = sp_tokenizer.fingerprint(texts, data_cfg.vocab_size)
  path = os.path.join(sp_tokenizer.cache_dir(), f"{name}-bpe{data_cfg.vocab_size}-{digest}.model")
  if not os.path.isfile(path):
    logging.info("training a %d-piece tokenizer on %s -> %s", data_cfg.vocab_size, specs, path)
    sp_tokenizer.train(texts, data_cfg.vocab_size, path)
  return SentencePieceTokenizer(path)


def check_vocab(tokenizer: Tokenizer, model_vocab: int, multiple: int = 128) -> None:
  """The model's vocabulary must be the tokenizer's, padded up to a multiple of `multiple` (for sharding)."""
  padded = -(-tokenizer.vocab_size // multiple) * multiple
  if model_vocab != padded:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={model_vocab}; set "
                     f"model.vocab_size={padded} (the tokenizer's size padded to a multiple of {multiple}), or use "
                     "a tokenizer of that size (data.vocab_size / data.tokenizer_path).")


def documents(spec: str, split: str = "train", field: str = "text", max_chars: int = 0) -> list[str]:
  """The texts of source `spec` on side `split`, in order, up to `max_chars` characters in all (0 = no limit)."""
  out, total = [], 0
  records = open_source(spec, split)
  for i in range(len(records)):
    for text in formats.texts(records[i], field):
      out.append(text)
      total += len(text)
    if max_chars and total >= max_chars:
      break
  return out
