"""Batch layouts: the keys a batch holds, the contract between the data pipeline and the loss heads.

  text      one packed row per example: tokens, targets, loss_mask, segment_ids, positions
  pairs     two packed rows per preference pair, the same five keys prefixed `chosen_` and `rejected_`
  unpaired  one packed row per labelled response, plus `label` (+1 desirable / −1 undesirable)
  labelled  one packed row per classified sequence, plus `label` (its class id)
  rollouts  one row per sampled completion (prompt + completion; loss_mask on the completion), plus the per-token
            columns the head's rollout declares (e.g. `advantages`, the completion's advantage, `sampler_logps`, the
            sampler's log-probs, `old_logps`, the trainer's under the params that sampled); made by
            fmjax/train/rollout.py from prompt records, never packed
Per-example columns (`ref_logps`, `label`) travel as per-token arrays holding the value at each example's first
position, so they stay right under packing; a parameterisation's columns are per-token int32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fmjax.errors import UserError

NAMES = ("text", "pairs", "unpaired", "labelled", "rollouts")
_INT32 = ("tokens", "targets", "segment_ids", "positions")  # the other sequence key, loss_mask, is float32
SEQUENCE = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str = "text"  # text | pairs | unpaired | labelled | rollouts
  columns: tuple[str, ...] = ()  # per-example columns besides the five sequence keys: float32 unless in int_columns
  int_columns: tuple[str, ...] = ()  # those of `columns` that are int32 (a parameterisation's)

  @property
  def sides(self) -> tuple[str, ...]:
    """Key prefixes of the rows an example is packed into."""
    return ("chosen_", "rejected_") if self.name == "pairs" else ("",)

  @property
  def rows_per_example(self) -> int:
    """Rows of a batch that one example fills and trains (tokens/s and MFU count them all)."""
    return len(self.sides)

  def dtypes(self) -> dict[str, np.dtype]:
    """Key -> dtype of a batch."""
    return {side + k: np.dtype(np.int32 if k in _INT32 + self.int_columns else np.float32) for side in self.sides
            for k in SEQUENCE + self.columns}


def of_format(fmt: str) -> Layout:
  """The layout a record format packs into (fmjax/data/formats.py; `preference+ref` carries reference log-probs)."""
  if fmt.startswith("preference"):
    return Layout("pairs", ("ref_logps",) if fmt.endswith("+ref") else ())
  if fmt in ("unpaired", "classification"):
    return Layout("unpaired" if fmt == "unpaired" else "labelled", ("label",))
  return Layout("text")


def for_head(layouts: tuple[str, ...], columns: tuple[str, ...], data_format: str = "auto") -> Layout:
  """The layout a head trains on when the data is not opened (the AOT planner): the one `data.format` names if the
  head takes it, else the head's first, with the columns the head needs."""
  name = of_format(data_format).name if data_format != "auto" else layouts[0]
  base = of_format({"pairs": "preference", "unpaired": "unpaired", "labelled": "classification"}.get(name, "text"))
  return Layout(name if name in layouts else layouts[0], tuple(dict.fromkeys(base.columns + columns)))


def with_adapter(data: Layout, adapter) -> Layout:
  """The layout plus the per-token int32 columns the run's parameterisation reads."""
  extra = tuple(c for c in (adapter.columns if adapter is not None else ()) if c not in data.columns)
  return dataclasses.replace(data, columns=data.columns + extra, int_columns=data.int_columns + extra) if extra \
      else data


def check(data: Layout, head_name: str, layouts: tuple[str, ...], columns: tuple[str, ...]) -> None:
  """The data's layout must be one the head trains on, with the columns it reads."""
  if data.name not in layouts:
    raise UserError(f"objective.name={head_name!r} trains on {' or '.join(layouts)} batches but the data yields "
                    f"{data.name} batches; point data.source at {_RECORDS[layouts[0]]} records or choose a head for "
                    f"{data.name} data.")
  missing = [c for c in columns if c not in data.columns]
  if missing:
    raise UserError(f"objective.name={head_name!r} needs the per-example columns {missing} in the data, which has "
                    f"{list(data.columns) or 'none'}; for ref_logps write them with tools/precompute_ref_logps.py, "
                    "or set objective.reference='model'.")


_RECORDS = {"text": "text / prompt-completion / chat", "pairs": "preference (prompt, chosen, rejected)",
            "unpaired": "unpaired (prompt, completion, label)", "labelled": "classification (text, label)",
            "rollouts": "prompt"}
