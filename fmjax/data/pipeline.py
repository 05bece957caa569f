"""grain pipelines from sources to global batches (the batch contract in the README).

Training, per data shard (data.shards of them; process p of P reads shards p·S/P … (p+1)·S/P - 1), per source:
  records ─ the shard's records (every S-th) ─ seeded shuffle, reshuffled every epoch ─ repeat
  ─ encode (tokenize + format; in data.workers processes per source when > 0) ─ pack ─ mix sources by step ─ batch
  (train.batch_size / S rows); a process's rows of a global batch are its shards' rows in shard order. So the global
  batches depend on S, not on how many processes read them: the same config on any number of hosts that divides S
  trains on the same batches (S = 0 means one shard per process).
Packing: `text` examples are concatenated in order and cut into rows of train.seq_len (concat-then-split); a
document cut at a row's end continues at position 0 of the next row, so no token is dropped or repeated. With
data.text_packing='stream' the same stream fills each row as ONE segment (positions 0..T-1, attention across the
documents' BOS/EOS boundaries): documents joined into long ones, for long-context training. Other formats
(prompt/completion, chat, preference) are never cut: first-fit packs whole examples into data.packing_bins open rows
at a time and pads the rest (an example longer than a row is handled by data.overlong). In every row `segment_ids`
number the examples 1..k (0 = padding) and `positions` restart at 0 per example; attention never crosses segments and
the loss mask is 0 on padding. The iterator's `get_state()` is a small dict that orbax saves with the train state.

Evaluation packs the held-out records of each named eval source in order, identically on every process, into at most
eval.batches global batches (the last one padded with empty rows), and each process keeps its rows.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any, Iterator

import grain
from absl import flags
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset, ZipIterDataset

from fmjax.data import formats, layout, mixture
from fmjax.data.layout import Layout
from fmjax.data.sources import DataError, PreparedSource, open_source
from fmjax.errors import UserError

MIXTURE_KEYS = ("source", "weight", "format", "field")
TEXT_PACKING = ("documents", "stream")  # data.text_packing (see the module docstring)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  name: str
  source: str
  format: str = "auto"
  field: str = "text"
  weight: str = "1"


def train_specs(data_cfg: Any) -> list[SourceSpec]:
  """`data.mixture` entries (name → source, weight, format, field), or the single `data.source`."""
  if not data_cfg.mixture:
    return [SourceSpec("default", data_cfg.source, data_cfg.format, data_cfg.field)]
  specs = []
  for name, entry in data_cfg.mixture.items():
    unknown = set(entry) - set(MIXTURE_KEYS)
    if unknown or "source" not in entry:
      raise UserError(f"data.mixture.{name} has keys {sorted(entry)}; it needs 'source' and may set "
                      f"{MIXTURE_KEYS[1:]}.")
    specs.append(SourceSpec(name, entry["source"], entry.get("format", data_cfg.format),
                            entry.get("field", data_cfg.field), str(entry.get("weight", "1"))))
  return specs


def eval_specs(eval_cfg: Any, data_cfg: Any) -> list[tuple[SourceSpec, str]]:
  """(spec, split) per eval source: `eval.sources` (name → source, read whole; an embedded corpus → its held-out
  split), else each training source's held-out split."""
  if eval_cfg.sources:
    return [(SourceSpec(name, spec, data_cfg.format, data_cfg.field),
             "validation" if spec.startswith("embedded:") else "all") for name, spec in eval_cfg.sources.items()]
  return [(s, "validation") for s in train_specs(data_cfg)]


def _open(spec: SourceSpec, data_cfg: Any, split: str, tokenizer: Any, seq_len: int, num_labels: int = 0):
  """(records, encoder, format) of one source; `num_labels`: the model's classes (classification labels)."""
  records = open_source(spec.source, split, data_cfg.holdout, data_cfg.tfds_data_dir)
  base = getattr(records, "parent", records)
  if len(records) == 0:  # open_source refuses an empty train side; this is the held-out side
    raise DataError(f"eval source {spec.name!r} ({spec.source}, {split}) holds no records; raise data.holdout, name "
                    "eval.sources explicitly, or set eval.every_steps=0.")
  if isinstance(base, PreparedSource):
    base.check_tokenizer(tokenizer)
    fmt = _stream_ok(base.format, spec, data_cfg)
    encode = _Fit(seq_len if fmt != "text" else 0, data_cfg.overlong)
  else:
    fmt = _stream_ok(spec.format if spec.format != "auto" else formats.detect(records[0], spec.field), spec, data_cfg)
    encode = formats.Encoder(fmt, tokenizer, spec.field, seq_len if fmt != "text" else 0, data_cfg.overlong,
                             data_cfg.chat_template, num_labels)
    encode(base[0])  # a missing field or bad record shows up now (the file's first, held out or not), not later
    encode(records[0])
  if fmt == "preference" and (all(k in records[0] for k in formats.REF_KEYS) or "chosen_ref_logps" in records[0]):
    fmt = "preference+ref"  # precomputed reference log-probs travel with the pairs
  return records, encode, fmt


def _stream_ok(fmt: str, spec: SourceSpec, data_cfg: Any) -> str:
  """`fmt`, which data.text_packing='stream' requires to be `text` (other examples are never cut)."""
  if data_cfg.text_packing == "stream" and fmt != "text":
    raise UserError(f"data.text_packing='stream' joins text documents, but source {spec.name!r} ({spec.source}) holds "
                    f"{fmt} records, which are never cut; set data.text_packing='documents'.")
  return fmt


class _Fit:
  """Applies the over-long policy to prepared examples."""

  def __init__(self, max_len: int, overlong: str):
    self.max_len, self.overlong = max_len, overlong

  def __call__(self, record: dict) -> dict | None:
    where = record.pop("_where", "record")
    return formats.fit(record, self.max_len, self.overlong, where)


def _pack(ds: grain.IterDataset, fmt: str, seq_len: int, bins: int, seed: int, columns=None,
          stream: bool = False) -> grain.IterDataset:
  keys = [p + k for p in formats.sequence_keys(fmt) for k in formats.features(fmt)]
  lengths = {k: seq_len for k in keys}
  if fmt == "text":
    packed = _JsonRestorable(ConcatThenSplitIterDataset(ds, length_struct=lengths))
  else:
    packed = FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=bins, seed=seed,
                                     shuffle_bins=False)
  return packed.map(_Contract(formats.sequence_keys(fmt), columns, stream))


class _JsonRestorable(grain.IterDataset):
  """A concat-then-split packer whose state survives a checkpoint. grain's checkpoint handler stores states as JSON,
  which turns the packer's "no remainder" sentinel (-1, -1) into a list that no longer equals it, so a packer
  restored at a row that ended with a document would read one document too many; this turns them back into tuples."""

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonRestorableIterator(iter(self._parent))


class _JsonRestorableIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    slices = state.get("remainder_slices", {})
    self._parent.set_state({**state, "remainder_slices": {k: tuple(v) for k, v in slices.items()}})


class _Contract:
  """Renames grain's packing outputs to the batch contract's keys and dtypes, and adds the per-token columns of the
  run's parameterisation (`columns(row) -> dict`, from each packed row's own segments). `stream`: the row's tokens
  (concat-then-split, so padding only ends a stream's last row) become one segment at positions 0..T-1."""

  def __init__(self, prefixes: tuple[str, ...], columns=None, stream: bool = False):
    self.prefixes, self.columns, self.stream = prefixes, columns, stream

  def __call__(self, row: dict) -> dict[str, np.ndarray]:
    out = {}
    for p in self.prefixes:
      seg = row[p + "tokens_segment_ids"].astype(np.int32)
      positions = row[p + "tokens_positions"].astype(np.int32)
      if self.stream:
        seg = (seg > 0).astype(np.int32)
        positions = np.arange(len(seg), dtype=np.int32) * seg
      out[p + "tokens"] = row[p + "tokens"].astype(np.int32)
      out[p + "targets"] = row[p + "targets"].astype(np.int32)
      out[p + "loss_mask"] = (row[p + "loss_mask"] * (seg > 0)).astype(np.float32)
      out[p + "segment_ids"] = seg
      out[p + "positions"] = positions
      for extra in formats.PER_EXAMPLE:
        if p + extra in row:
          out[p + extra] = (row[p + extra] * (seg > 0)).astype(np.float32)
      if self.columns is not None:
        side = {k: out[p + k] for k in layout.SEQUENCE}
        out.update({p + k: v for k, v in self.columns(side).items()})
    return out


def _rows(records, encode, fmt: str, data_cfg: Any, seq_len: int, seed: int, shard: int, shards: int,
          train: bool, columns=None) -> grain.IterDataset:
  ds = grain.MapDataset.source(records)
  if shards > 1:
    ds = ds[shard::shards]
    if len(ds) == 0:
      raise DataError(f"data shard {shard} of {shards} got no records; the source has {len(records)}. Lower "
                      "data.shards.")
  if train:
    ds = ds.shuffle(seed).repeat()
  examples = ds.map(encode).to_iter_dataset()
  if train and data_cfg.workers:  # tokenize in worker processes; pack and mix here, so steps map to rows exactly
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use their defaults
      flags.FLAGS.mark_as_parsed()
    examples = examples.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.workers),
                                    worker_init_fn=functools.partial(exit_with_parent, os.getpid()))
  stream = fmt == "text" and data_cfg.text_packing == "stream"
  return _pack(examples, fmt, seq_len, data_cfg.packing_bins, seed, columns, stream)


def exit_with_parent(parent: int, worker_index: int = 0, worker_count: int = 1) -> None:
  """A data worker's init: the worker kills itself once `parent` (the trainer) is gone, so a trainer killed with
  SIGKILL leaves no workers behind, nor multiprocessing's resource tracker (it exits once every process holding its
  pipe has). A thread polls the parent's pid rather than prctl(PR_SET_PDEATHSIG): that signal follows the *thread*
  that started the worker, one of grain's prefetch threads, which ends whenever the pipeline's state is set."""
  if os.name != "posix":  # Windows: getppid() does not change when the parent dies
    return

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)

  threading.Thread(target=watch, name="fmjax-exit-with-parent", daemon=True).start()


def _columns(adapter: Any):
  """The row -> per-token columns function of the run's parameterisation, or None when it reads none."""
  return adapter.batch_columns if adapter is not None and adapter.columns else None


def shard_range(data_cfg: Any, batch: int, process_index: int, process_count: int) -> range:
  """The data shards process `process_index` reads (see the module docstring)."""
  shards = data_cfg.shards or process_count
  if not data_cfg.shards and batch % process_count:
    raise UserError(f"train.batch_size={batch} must be divisible by the process count {process_count}.")
  if shards % process_count or batch % shards:
    raise UserError(f"data.shards={shards} must be a multiple of the process count {process_count} and divide "
                    f"train.batch_size={batch}; change data.shards (0 = one per process).")
  per_process = shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def train_dataset(data_cfg: Any, train_cfg: Any, tokenizer: Any, process_index: int = 0, process_count: int = 1,
                  adapter: Any = None, num_labels: int = 0) -> tuple[grain.IterDataset, Layout]:
  """This process's rows of every training batch, batched (train.batch_size / process_count rows each: those of its
  data shards), and the batches' layout. `adapter`: the run's parameterisation, whose per-token columns the rows get;
  `num_labels`: the model's classes (classification labels)."""
  seq_len, batch = train_cfg.seq_len, train_cfg.batch_size
  mine = shard_range(data_cfg, batch, process_index, process_count)
  shards = data_cfg.shards or process_count
  per_shard = batch // shards
  specs = train_specs(data_cfg)
  opened, layouts = [], set()
  for spec in specs:
    records, encode, fmt = _open(spec, data_cfg, "train", tokenizer, seq_len, num_labels)
    layouts.add(layout.of_format(fmt))
    opened.append((records, encode, fmt))
  if len(layouts) > 1:
    kinds = sorted(f"{x.name}{'+' if x.columns else ''}{'+'.join(x.columns)}" for x in layouts)
    raise UserError(f"data.mixture mixes sources whose batches have different keys ({kinds}: preference or not, "
                    f"with or without precomputed ref_*_logps) in {[s.name for s in specs]}. Mix sources of one kind.")
  columns = _columns(adapter)
  batched = []
  for shard in mine:
    streams = [_rows(records, encode, fmt, data_cfg, seq_len, data_cfg.seed + 1000 * k, shard, shards, train=True,
                     columns=columns) for k, (records, encode, fmt) in enumerate(opened)]
    if len(streams) == 1:
      rows = streams[0]
    else:
      schedules = [mixture.Schedule(s.weight, f"data.mixture.{s.name}.weight") for s in specs]
      rows = mixture.StepMixIterDataset(streams, schedules, per_shard, data_cfg.seed, shard)
    batched.append(rows.batch(per_shard, drop_remainder=True))
  out = batched[0] if len(batched) == 1 else ZipIterDataset(batched).map(_concat)
  return out, layout.with_adapter(layouts.pop(), adapter)


def _concat(parts: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
  """One batch from the same step's batches of several shards, in shard order."""
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def eval_batches(eval_cfg: Any, data_cfg: Any, train_cfg: Any, tokenizer: Any, process_index: int = 0,
                 process_count: int = 1, adapter: Any = None,
                 num_labels: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
  """Name → this process's rows of each fixed held-out global batch of that eval source."""
  seq_len, batch = train_cfg.seq_len, train_cfg.batch_size
  local = batch // process_count
  columns = _columns(adapter)
  out = {}
  for spec, split in eval_specs(eval_cfg, data_cfg):
    records, encode, fmt = _open(spec, data_cfg, split, tokenizer, seq_len, num_labels)
    rows = _take(iter(_rows(records, encode, fmt, data_cfg, seq_len, 0, 0, 1, train=False, columns=columns)),
                 eval_cfg.batches * batch)
    if not rows:
      raise DataError(f"eval source {spec.name!r} ({spec.source}, {split}) holds no examples; raise data.holdout or "
                      "name eval.sources explicitly.")
    while len(rows) % batch:
      rows.append({k: np.zeros_like(v) for k, v in rows[0].items()})
    out[spec.name] = [{k: np.stack([r[k] for r in rows[i + process_index * local: i + (process_index + 1) * local]])
                       for k in rows[0]} for i in range(0, len(rows), batch)]
  return out


def _take(it: Iterator, n: int) -> list:
  out = []
  for row in it:
    out.append(row)
    if len(out) == n:
      break
  return out
