"""The prompt stream of an RL run: records with a `prompt` (a string or chat messages), shuffled, repeated and
tokenized; its position is checkpointed with the run."""

from __future__ import annotations

from typing import Any

import grain.python as grain
import numpy as np

from fmjax.data import formats
from fmjax.data.sources import WHERE, DataError, open_source
from fmjax.errors import UserError
from fmjax.objectives.base import Rollout


def prompt_width(seq_len: int, spec: Rollout) -> int:
  """Longest prompt in tokens: the row length minus the completion's."""
  width = seq_len - spec.max_completion_length
  if width < 2:
    raise UserError(f"train.seq_len={seq_len} leaves no room for a prompt beside the head's completions of up to "
                    f"{spec.max_completion_length} tokens; raise train.seq_len or lower the completion length.")
  return width


def prompts_per_step(rows: int, spec: Rollout) -> int:
  """Prompts of one rollout: its `minibatches` × train.batch_size rows hold the head's `group` completions of
  each."""
  group = spec.group
  if rows % group:
    count = f"objective.{spec.group_key}={group}" if spec.group_key else f"{group}"
    raise UserError(f"train.batch_size={rows} must be a multiple of {count} (the rows of a rollout are the "
                    f"{group} completions of each prompt).")
  return rows // group * int(spec.minibatches)


class _Prompt:
  """Record -> {prompt_ids [width] (right-padded), prompt_length, index}, or None for an over-long prompt under
  data.overlong='drop'."""

  def __init__(self, encoder: formats.Encoder, width: int, overlong: str):
    self.encoder, self.width, self.overlong = encoder, width, overlong

  def __call__(self, item: tuple[int, dict]) -> dict | None:
    index, record = item
    ids = self.encoder.prompt_ids(record)
    if len(ids) > self.width:
      if self.overlong == "drop":
        return None
      raise DataError(f"{record.get(WHERE, 'record')}: a prompt of {len(ids)} tokens exceeds train.seq_len − "
                      f"objective.max_completion_length = {self.width}; raise train.seq_len, or set "
                      "data.overlong='drop' to skip such prompts.")
    out = np.zeros(self.width, np.int32)
    out[:len(ids)] = ids
    return {"prompt_ids": out, "prompt_length": np.int32(len(ids)), "index": np.int64(index)}


def open_records(data_cfg: Any, split: str = "train") -> Any:
  """The prompt records (random access: the rollout reads each prompt's other fields for reward functions)."""
  return open_source(data_cfg.source, split, data_cfg.holdout, data_cfg.tfds_data_dir)


def dataset(data_cfg: Any, rows: int, seq_len: int, spec: Rollout, tokenizer: Any,
            records: Any) -> grain.IterDataset:
  """The prompts of each rollout, batched: prompts_per_step of them (`rows` = train.batch_size). Every process reads
  the same stream, so each draws the same global rollout (and keeps its own rows of it) whatever the process count."""
  per_step = prompts_per_step(rows, spec)
  if "prompt" not in records[0]:
    raise DataError(f"{records[0].get(WHERE, 'record')}: an RL run reads prompt records ({{'prompt': str or "
                    f"messages, ...}}); this one has {sorted(k for k in records[0] if k != WHERE)}.")
  encoder = formats.Encoder("prompt_completion", tokenizer, chat_template=data_cfg.chat_template)
  ds = grain.MapDataset.range(len(records)).map(lambda i: (i, records[i])).shuffle(data_cfg.seed).repeat()
  out = ds.map(_Prompt(encoder, prompt_width(seq_len, spec), data_cfg.overlong)).to_iter_dataset()
  return out.filter(lambda r: r is not None).batch(per_step, drop_remainder=True)
