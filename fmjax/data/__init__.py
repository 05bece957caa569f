"""Data: sources, record formats, tokenizers and grain pipelines that emit the batch contract (see README)."""

from __future__ import annotations

import logging
import os
from typing import Any

from fmjax.data import formats, sp_tokenizer
from fmjax.data.byte_tokenizer import ByteTokenizer
from fmjax.data.hf_tokenizer import HFTokenizer
from fmjax.data.pipeline import eval_batches, train_dataset, train_specs
from fmjax.data.sources import WHERE, DataError, open_source
from fmjax.data.sp_tokenizer import SentencePieceTokenizer
from fmjax.errors import UserError

__all__ = ["ByteTokenizer", "DataError", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "check_vocab",
           "documents", "eval_batches", "make_tokenizer", "no_text_error", "open_source", "run_tokenizer_file",
           "tokenizer_from_file", "train_dataset", "train_specs"]

Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer
RUN_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # the copy a run directory carries, by kind


def run_tokenizer_file(workdir: str) -> str:
  """The tokenizer file run directory `workdir` carries (sentencepiece `tokenizer.model` or Hugging Face
  `tokenizer.json`); '' when it has none (the byte tokenizer)."""
  for name in RUN_TOKENIZER_FILES:
    if os.path.isfile(os.path.join(workdir, name)):
      return os.path.join(workdir, name)
  return ""


def make_tokenizer(data_cfg: Any) -> Tokenizer:
  """`bytes`; `hf`: the Hugging Face tokenizer.json at `data.tokenizer_path`; or `sentencepiece`: the model at
  `data.tokenizer_path` (a path ending in .json is read as a Hugging Face tokenizer), or (path empty) a BPE model of
  `data.vocab_size` pieces trained on the train split of `data.tokenizer_source` (default: the training sources)
  and cached on first use (seconds)."""
  if data_cfg.tokenizer == "bytes":
    return ByteTokenizer()
  if data_cfg.tokenizer not in ("sentencepiece", "hf"):
    raise UserError(f"data.tokenizer={data_cfg.tokenizer!r} is unknown; use 'sentencepiece', 'hf' or 'bytes'.")
  if data_cfg.tokenizer == "hf" and not data_cfg.tokenizer_path:
    raise UserError("data.tokenizer='hf' needs data.tokenizer_path=PATH/tokenizer.json.")
  if data_cfg.tokenizer_path:
    return tokenizer_from_file(data_cfg.tokenizer_path, key="data.tokenizer_path")
  specs = [data_cfg.tokenizer_source] if data_cfg.tokenizer_source else [s.source for s in train_specs(data_cfg)]
  if all(spec.startswith("prepared:") for spec in specs):  # tokenized data names its tokenizer
    return SentencePieceTokenizer(open_source(specs[0], "all").meta["tokenizer_path"])
  texts = [t for spec in specs if not spec.startswith("prepared:")
           for t in documents(spec, "train", data_cfg.field, data_cfg.tokenizer_train_chars, data_cfg.holdout)]
  if not any(texts):
    raise no_text_error(next(s for s in specs if not s.startswith("prepared:")), data_cfg.field)
  name = "+".join(specs).replace(":", "-").replace("/", "_").replace("*", "_")[:80]
  digest = sp_tokenizer.fingerprint(texts, data_cfg.vocab_size)
  path = os.path.join(sp_tokenizer.cache_dir(), f"{name}-bpe{data_cfg.vocab_size}-{digest}.model")
  if not os.path.isfile(path):
    logging.info("training a %d-piece tokenizer on %s -> %s", data_cfg.vocab_size, specs, path)
    sp_tokenizer.train(texts, data_cfg.vocab_size, path)
  return SentencePieceTokenizer(path)


def tokenizer_from_file(path: str, key: str = "") -> SentencePieceTokenizer | HFTokenizer:
  """A Hugging Face tokenizer for a `.json` file, else a sentencepiece model; `key` (e.g. data.tokenizer_path) is
  the setting that named the file, for the error when it is missing or not a tokenizer."""
  if os.path.isdir(path):
    raise UserError(_directory_error(path, key or "the tokenizer path"))
  if key and not os.path.isfile(path):
    raise UserError(f"{key}={path!r} does not exist; give a sentencepiece .model (train one with `python "
                    f"tools/train_tokenizer.py --input=SOURCE --output={path}`) or a Hugging Face tokenizer.json, or "
                    f"leave {key} empty to train a tokenizer on the training data.")
  try:
    return HFTokenizer(path) if path.endswith(".json") else SentencePieceTokenizer(path)
  except UserError as e:
    if not key:
      raise
    raise UserError(f"{key}: {str(e).rstrip('.')}; or leave {key} empty to train a tokenizer on the training "
                    "data.") from e


def _directory_error(path: str, key: str) -> str:
  """What to say when `key` names directory `path` instead of a tokenizer file: the tokenizer files in it, if any."""
  inside = [n for n in RUN_TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
  inside += sorted(n for n in os.listdir(path) if n.endswith(".model") and n not in inside)
  if inside:
    fix = f"set {key}={os.path.join(path, inside[0])}" + (
        f" (it also holds {', '.join(inside[1:4])})" if len(inside) > 1 else "")
  else:
    fix = (f"it holds no .model or tokenizer.json file: set {key} to a sentencepiece .model (train one with `python "
           "tools/train_tokenizer.py --input=SOURCE --output=FILE.model`) or a Hugging Face tokenizer.json")
  return f"{key}={path!r} is a directory, not a tokenizer file; {fix}."


def no_text_error(spec: str, field: str, set_field: str = "--config.data.field") -> UserError:
  """The error for source `spec` whose records hold no text in `field` (nor prompt/completion/messages/chosen/
  rejected): it names the first record's place and keys, and the fix (`set_field`=KEY, or another format)."""
  try:
    first = open_source(spec, "all")[0]
  except UserError as e:  # the source itself cannot be read: that is the error
    return e
  keys = sorted(k for k in first if k != WHERE)
  text_key = next((k for k in keys if isinstance(first[k], str)), "KEY")
  config = set_field.startswith("--config.")
  return DataError(f"{first.get(WHERE, spec)}: the records of {spec!r} hold no text: no field {field!r} "
                   f"({set_field.removeprefix('--config.')}) and no prompt/completion, messages or chosen/rejected; "
                   f"the first record has keys {keys}. If {text_key!r} holds the text, set {set_field}={text_key}"
                   + ("; else set data.format to the records' format (and shape them as it expects)." if config
                      else "."))


def check_vocab(tokenizer: Tokenizer, model_vocab: int, multiple: int = 128) -> None:
  """The model's vocabulary must be the tokenizer's, padded up to a multiple of `multiple` (for sharding); an
  imported model's (Hugging Face tokenizer) only needs to hold every id: its checkpoint fixes the padding."""
  if isinstance(tokenizer, HFTokenizer):
    if model_vocab < tokenizer.vocab_size:
      raise UserError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but model.vocab_size="
                      f"{model_vocab}; use the model this tokenizer came with.")
    return
  padded = -(-tokenizer.vocab_size // multiple) * multiple
  if model_vocab != padded:
    raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={model_vocab}; set "
                    f"model.vocab_size={padded} (the tokenizer's size padded to a multiple of {multiple}), or use "
                    "a tokenizer of that size (data.vocab_size / data.tokenizer_path).")


def documents(spec: str, split: str = "train", field: str = "text", max_chars: int = 0, holdout: float = 0.1,
              holdout_key: str = "data.holdout") -> list[str]:
  """The texts of source `spec` on side `split` of its `holdout` split (set by `holdout_key`), in order, up to
  `max_chars` characters in all (0 = no limit)."""
  out, total = [], 0
  records = open_source(spec, split, holdout, holdout_key=holdout_key)
  for i in range(len(records)):
    for text in formats.texts(records[i], field):
      out.append(text)
      total += len(text)
    if max_chars and total >= max_chars:
      break
  return out
