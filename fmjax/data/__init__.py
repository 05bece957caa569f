"""Data: corpora, tokenizers and batch pipelines that emit the batch contract (see README)."""

from __future__ import annotations

from typing import Any

from fmjax.data import embedded
from fmjax.data.byte_tokenizer import ByteTokenizer
from fmjax.data.packing import PackedStream


def make_tokenizer(data_cfg: Any) -> ByteTokenizer:
  if data_cfg.tokenizer != "bytes":
    raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r} is not available; use 'bytes'.")
  return ByteTokenizer()


def _documents(config: Any, tokenizer: ByteTokenizer, split: str) -> list:
  kind, _, name = config.data.source.partition(":")
  if kind != "embedded":
    raise ValueError(f"data.source={config.data.source!r}: only 'embedded:<corpus>' sources exist so far, e.g. "
                     "'embedded:prose'.")
  return [tokenizer.encode(text) for text in embedded.load(name, split)]


def make_train_stream(config: Any, tokenizer: ByteTokenizer, process_index: int = 0,
                      process_count: int = 1) -> PackedStream:
  """The packed training stream over the train split of `config.data.source` (`embedded:<corpus>`)."""
  return PackedStream(_documents(config, tokenizer, "train"), config.train.batch_size, config.train.seq_len,
                      config.data.seed, tokenizer.bos_id, tokenizer.eos_id, process_index, process_count)


def make_eval_batches(config: Any, tokenizer: ByteTokenizer, process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
  """A fixed list of up to `config.eval.batches` held-out batches (this process's rows), never repeating a token."""
  stream = PackedStream(_documents(config, tokenizer, "validation"), config.train.batch_size, config.train.seq_len,
                        0, tokenizer.bos_id, tokenizer.eos_id, process_index, process_count)
  n = min(config.eval.batches, stream.rows_per_epoch // config.train.batch_size)
  return [stream.batch(i) for i in range(n)]
