"""Data: corpora, tokenizers and batch pipelines that emit the batch contract (see README)."""

from __future__ import annotations

import logging
import os
from typing import Any

from fmjax.data import embedded, sp_tokenizer
from fmjax.data.byte_tokenizer import ByteTokenizer
from fmjax.data.sp_tokenizer import SentencePieceTokenizer
from fmjax.data.packing import PackedStream


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def make_tokenizer(data_cfg: Any) -> Tokenizer:
  """`bytes`, or `sentencepiece`: the model at `data.tokenizer_path`, or (path empty) a BPE model of
  `data.vocab_size` pieces trained on the train split of `data.source` and cached on first use (seconds)."""
  if data_cfg.tokenizer == "bytes":
    return ByteTokenizer()
  if data_cfg.tokenizer != "sentencepiece":
    raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r} is unknown; use 'bytes' or 'sentencepiece'.")
  if data_cfg.tokenizer_path:
    return SentencePieceTokenizer(data_cfg.tokenizer_path)
  texts = documents(data_cfg.source, "train")
  name = data_cfg.source.replace(":", "-").replace("/", "_")
  digest = sp_tokenizer.fingerprint(texts, data_cfg.vocab_size)
  path = os.path.join(sp_tokenizer.cache_dir(), f"{name}-bpe{data_cfg.vocab_size}-{digest}.model")
  if not os.path.isfile(path):
    logging.info("training a %d-piece tokenizer on %s -> %s", data_cfg.vocab_size, data_cfg.source, path)
    sp_tokenizer.train(texts, data_cfg.vocab_size, path)
  return SentencePieceTokenizer(path)


def check_vocab(tokenizer: Tokenizer, model_vocab: int, multiple: int = 128) -> None:
  """The model's vocabulary must be the tokenizer's, padded up to a multiple of `multiple` (for sharding)."""
  padded = -(-tokenizer.vocab_size // multiple) * multiple
  if model_vocab != padded:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={model_vocab}; set "
                     f"model.vocab_size={padded} (the tokenizer's size padded to a multiple of {multiple}), or use "
                     "a tokenizer of that size (data.vocab_size / data.tokenizer_path).")


def documents(source: str, split: str) -> list[str]:
  """Texts of `source` (`embedded:<corpus>`) for `split`."""
  kind, _, name = source.partition(":")
  if kind != "embedded":
    raise ValueError(f"data.source={source!r}: only 'embedded:<corpus>' sources exist so far, e.g. "
                     "'embedded:prose'.")
  return embedded.load(name, split)


def _encoded(config: Any, tokenizer: Tokenizer, split: str) -> list:
  return [tokenizer.encode(text) for text in documents(config.data.source, split)]


def make_train_stream(config: Any, tokenizer: Tokenizer, process_index: int = 0,
                      process_count: int = 1) -> PackedStream:
  """The packed training stream over the train split of `config.data.source` (`embedded:<corpus>`)."""
  return PackedStream(_encoded(config, tokenizer, "train"), config.train.batch_size, config.train.seq_len,
                      config.data.seed, tokenizer.bos_id, tokenizer.eos_id, process_index, process_count)


def make_eval_batches(config: Any, tokenizer: Tokenizer, process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
  """A fixed list of up to `config.eval.batches` held-out batches (this process's rows), never repeating a token."""
  stream = PackedStream(_encoded(config, tokenizer, "validation"), config.train.batch_size, config.train.seq_len,
                        0, tokenizer.bos_id, tokenizer.eos_id, process_index, process_count)
  n = min(config.eval.batches, stream.rows_per_epoch // config.train.batch_size)
  return [stream.batch(i) for i in range(n)]
