"""Random-access record sources: embedded corpora, tfds datasets, local files, prepared (tokenized) ArrayRecords.

A source spec is one string:
  `embedded:NAME`               a zero-download corpus: `prose`, `code` (text), `instruct` (chat records;
                                `instruct/TASK` for one task: explain, summarize, name), `preference` (pairs),
                                `topics` (text classification: fmjax/data/topics.py), `sort` (a verifiable
                                RL task: fmjax/rl/tasks.py), `sort_pairs` (preference pairs on it)
  `tfds:NAME[/CONFIG][:SPLIT]`  a tfds dataset read through `tfds.data_source` (ArrayRecord; SPLIT default `train`)
  `prepared:DIR`                records tokenized once by `tools/prepare_data.py` (see `PreparedSource`)
  a glob of files               `.txt` (one document per file), `.jsonl` (one record per line), `.parquet` (one
                                record per row), `.array_record` (one JSON object per record)
Every source is a sequence of records (dicts); each record carries `_where`, e.g. `data/a.jsonl:12`, so errors
name the file and line. `split(source, "train"|"validation", holdout)` holds out a fixed fraction of records, chosen
by a hash of the record index (embedded corpora use their own key-based split), so the two sides never share a record.
"""

from __future__ import annotations

import copy
import glob
import json
import os
from typing import Any, Sequence

import numpy as np

from fmjax.data import embedded, instruct, topics
from fmjax.data.tokenizers import tokenizer_id
from fmjax.errors import UserError

EMBEDDED = ("code", "instruct", "preference", "prose", "sort", "sort_pairs", "topics")
FILE_KINDS = (".txt", ".jsonl", ".parquet", ".array_record")
WHERE = "_where"  # key of a record's location, for error messages


class DataError(UserError):
  """Bad input data: the message names the file/line/field and the fix."""


def json_record(raw: bytes, where: str, fix: str) -> dict:
  """Parses one JSON object, or fails naming `where` and the fix."""
  try:
    record = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{where}: not a JSON object ({e}); {fix}.") from e
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; {fix}.")
  record[WHERE] = where
  return record


class EmbeddedSource:
  """A zero-download corpus split by record key (see `fmjax.data.embedded` and `fmjax.data.instruct`): `{"text"}`
  records for `prose` and `code`, `{"messages", "task"}` records for `instruct`, pairs for `preference`, `{"text",
  "label"}` for `topics`; each is named by its key."""

  def __init__(self, name: str, split: str):
    corpus, _, task = name.partition("/")
    if corpus not in EMBEDDED or (task and corpus != "instruct"):
      raise UserError(f"data source 'embedded:{name}' is unknown; embedded corpora: {list(EMBEDDED)}.")
    self.name = name
    if corpus == "instruct":
      if task and task not in instruct.TASKS:
        raise UserError(f"data source 'embedded:{name}': task {task!r} is unknown; tasks: {list(instruct.TASKS)}.")
      self.records = [(k, r) for k, r in instruct.load_records(split) if not task or r["task"] == task]
    elif corpus == "preference":
      self.records = instruct.preference_records(split)
    elif corpus == "topics":
      self.records = topics.load_records(split)
    elif corpus in ("sort", "sort_pairs"):
      from fmjax.rl import tasks  # the task's records and its reward functions live together
      self.records = (tasks.load_records if corpus == "sort" else tasks.preference_records)(split)
    else:
      self.records = [(key, {"text": text}) for key, text in embedded.load_records(name, split)]

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict:
    key, record = self.records[i]
    return {**copy.deepcopy(record), WHERE: f"embedded:{self.name}[{key}]"}  # callers may edit their record


class TextFiles:
  """`.txt` files, one document each."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    path = self.paths[i]
    try:
      with open(path, encoding="utf-8") as f:
        return {"text": f.read(), WHERE: path}
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not UTF-8 text ({e}); convert it or drop it from the glob.") from e


class JsonlFiles:
  """`.jsonl` files, one JSON object per non-empty line; line offsets are indexed once (8 bytes per line)."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    offsets, owners, lines = [], [], []
    for k, path in enumerate(self.paths):
      with open(path, "rb") as f:
        pos = 0
        for n, line in enumerate(f, start=1):
          if line.strip():
            offsets.append(pos)
            owners.append(k)
            lines.append(n)
          pos += len(line)
    self.offsets = np.asarray(offsets, np.int64)
    self.owners = np.asarray(owners, np.int32)
    self.lines = np.asarray(lines, np.int64)

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, i: int) -> dict:
    path = self.paths[self.owners[i]]
    where = f"{path}:{self.lines[i]}"
    with open(path, "rb") as f:
      f.seek(int(self.offsets[i]))
      line = f.readline()
    return json_record(line, where, "fix or remove that line (`tools/curate.py` rewrites a corpus as clean JSONL)")


class ParquetFiles:
  """`.parquet` files, one record per row; row groups are read on demand and the last one is kept."""

  def __init__(self, paths: Sequence[str]):
    import pyarrow.parquet as pq

    self.paths = list(paths)
    self.groups = []  # (path index, row group, first row of the group, rows)
    starts = []
    total = 0
    for k, path in enumerate(self.paths):
      meta = pq.ParquetFile(path).metadata
      for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        self.groups.append((k, g, total, rows))
        starts.append(total)
        total += rows
    self.starts, self.total = np.asarray(starts, np.int64), total
    self._cached: tuple[int, list[dict]] | None = None

  def __len__(self) -> int:
    return self.total

  def __getitem__(self, i: int) -> dict:
    import pyarrow.parquet as pq

    g = int(np.searchsorted(self.starts, i, side="right") - 1)
    if self._cached is None or self._cached[0] != g:
      k, group, _, _ = self.groups[g]
      self._cached = (g, pq.ParquetFile(self.paths[k]).read_row_group(group).to_pylist())
    k, _, start, _ = self.groups[g]
    return {**self._cached[1][i - start], WHERE: f"{self.paths[k]}:row {i - start}"}

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_cached": None}


class ArrayRecordFiles:
  """`.array_record` files whose records are UTF-8 JSON objects."""

  def __init__(self, paths: Sequence[str]):
    from array_record.python import array_record_data_source, array_record_module

    self.paths = list(paths)
    self.ds = array_record_data_source.ArrayRecordDataSource(self.paths)
    counts = []
    for path in self.paths:
      reader = array_record_module.ArrayRecordReader(path)
      counts.append(reader.num_records())
      reader.close()
    self.starts = np.cumsum([0] + counts[:-1])

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, i: int) -> dict:
    k = int(np.searchsorted(self.starts, i, side="right") - 1)
    return json_record(self.ds[i], f"{self.paths[k]}:record {i - self.starts[k]}", "records of .array_record "
                       "inputs are JSON objects (tokenized data goes through `prepared:DIR`)")


PREPARED_META = "meta.json"  # a prepared directory's description, written last: its presence marks it complete


def serialize(example: dict[str, np.ndarray]) -> bytes:
  """One record of a prepared directory: a JSON header `{key: length}`, a newline, the arrays' bytes."""
  header = json.dumps({k: len(v) for k, v in example.items()}).encode()
  body = b"".join(np.ascontiguousarray(v, np.float32 if k.endswith("loss_mask") else np.int32).tobytes()
                  for k, v in example.items())
  return header + b"\n" + body


def deserialize(raw: bytes) -> dict[str, np.ndarray]:
  head, _, body = raw.partition(b"\n")
  out, offset = {}, 0
  for k, n in json.loads(head).items():
    dtype = np.float32 if k.endswith("loss_mask") else np.int32
    out[k] = np.frombuffer(body, dtype, count=n, offset=offset)
    offset += 4 * n
  return out


class PreparedSource:
  """The examples of a prepared directory, in source order (`prepared:DIR`, written by `fmjax.data.prepared`).

  DIR holds `meta.json` (format, tokenizer identity, counts) and `data-NNNNN.array_record` shards whose records are
  examples (see `fmjax.data.formats`): a JSON header line `{key: length}` followed by the int32 / float32 arrays'
  bytes (`serialize`). Reading a prepared source with a different tokenizer is an error."""

  def __init__(self, path: str):
    from array_record.python import array_record_data_source

    meta_path = os.path.join(path, PREPARED_META)
    if not os.path.isfile(meta_path):
      raise DataError(f"prepared:{path}: {meta_path} is missing; create the directory with "
                      "`python tools/prepare_data.py --source=... --output={path}`.")
    with open(meta_path) as f:
      self.meta = json.load(f)
    shards = sorted(glob.glob(os.path.join(path, "data-*.array_record")))
    if len(shards) != self.meta["shards"]:
      raise DataError(f"prepared:{path}: meta.json lists {self.meta['shards']} shards but {len(shards)} exist; "
                      "the directory is incomplete, prepare it again.")
    self.path, self.format = path, self.meta["format"]
    self.ds = array_record_data_source.ArrayRecordDataSource(shards)

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, i: int) -> dict:
    return {**deserialize(self.ds[i]), WHERE: f"prepared:{self.path}[{i}]"}

  def check_tokenizer(self, tokenizer: Any) -> None:
    got = tokenizer_id(tokenizer)
    if got != self.meta["tokenizer"]:
      raise DataError(f"prepared:{self.path} was tokenized with {self.meta['tokenizer']} "
                      f"({self.meta.get('tokenizer_path', '')}) but this run uses {got}; set data.tokenizer_path to "
                      "that tokenizer, or prepare the data again with this one.")


class TfdsSource:
  """A tfds dataset prepared as ArrayRecord, read through `tfds.data_source` (random access, no TensorFlow)."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
      self.ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types for a missing or unprepared dataset
      raise DataError(f"tfds dataset {name!r} split {split!r} could not be opened from data_dir={data_dir!r}: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Prepare it once (`tfds build "
                      f"{name} --file_format=array_record`) and point "
                      "data.tfds_data_dir at it.") from e
    self.name, self.split = name, split

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, i: int) -> dict:
    record = dict(self.ds[i])
    for k, v in record.items():
      if isinstance(v, bytes):
        record[k] = v.decode("utf-8")
    record[WHERE] = f"tfds:{self.name}:{self.split}[{i}]"
    return record


class HeldOut:
  """The records of `parent` on one side of a hash split of record indices."""

  def __init__(self, parent: Any, split: str, holdout: float):
    idx = np.arange(len(parent), dtype=np.uint64)
    bucket = _mix64(idx) % np.uint64(1 << 20)
    held = bucket < np.uint64(int(holdout * (1 << 20)))
    self.parent, self.index = parent, np.flatnonzero(held if split == "validation" else ~held)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> dict:
    return self.parent[int(self.index[i])]


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser: a fixed, well-spread hash of integers."""
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def expand(pattern: str) -> list[str]:
  """Files matched by `pattern`, sorted; an empty match or a mix of kinds is an error naming the glob."""
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
  if not paths:
    raise DataError(f"data source {pattern!r} matched no files; check the path, or use embedded:prose, "
                    "embedded:code, tfds:NAME or prepared:DIR.")
  kinds = {os.path.splitext(p)[1] for p in paths}
  if len(kinds) > 1 or not kinds <= set(FILE_KINDS):
    raise DataError(f"data source {pattern!r} matched files of kinds {sorted(kinds)}; a source holds one kind of "
                    f"{FILE_KINDS}. Narrow the glob (e.g. '*.jsonl') or mix several sources with data.mixture.")
  return paths


def open_source(spec: str, split: str = "train", holdout: float = 0.1, tfds_data_dir: str = "",
                holdout_key: str = "data.holdout") -> Any:
  """The records of `spec` on side `split` (`train`, `validation`, or `all`) of its held-out split; an empty train
  side is an error naming `holdout_key`, the setting that gave `holdout`."""
  if split not in ("train", "validation", "all"):
    raise UserError(f"split {split!r} must be train, validation or all.")
  kind, _, rest = spec.partition(":")
  if kind == "embedded":
    return EmbeddedSource(rest, split)
  if kind == "prepared":
    source = PreparedSource(rest)
  elif kind == "tfds":
    name, _, tfds_split = rest.partition(":")
    source = TfdsSource(name, tfds_split or "train", tfds_data_dir)
  else:
    paths = expand(spec)
    source = {".txt": TextFiles, ".jsonl": JsonlFiles, ".parquet": ParquetFiles,
              ".array_record": ArrayRecordFiles}[os.path.splitext(paths[0])[1]](paths)
  if len(source) == 0:
    raise DataError(f"data source {spec!r} holds no records.")
  if split == "all":
    return source
  side = HeldOut(source, split, holdout)
  if split == "train" and len(side) == 0:  # record 0 always hashes to the held-out side: a one-record source
    n = len(source)
    also = " and eval.every_steps=0" if holdout_key.startswith("data.") else ""
    raise DataError(f"data source {spec!r} has {n} record{'s' * (n != 1)}, all held out for evaluation "
                    f"({holdout_key}={holdout}), so none is left to train on; add records (a .txt file is one "
                    f"record), or set {holdout_key}=0{also} to train on every record.")
  return side
