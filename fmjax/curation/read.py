"""Curation inputs: which files (or tfds datasets) a glob names, and each input's records, its sha256 and its count.

An input is a local file, a file under any filesystem Beam knows (`gs://`, `s3://`, ...; matched and read through
`apache_beam.io.filesystems`), or `tfds:NAME[/CONFIG][:SPLIT]`. Kinds: `.jsonl` (one JSON object per non-blank
line, text in the `field` key), `.txt` (one document), `.parquet` (one record per row), `.array_record` (one JSON
object per record, or UTF-8 text), tfds (one record per example).

Every record has a place: `(input index, record index)`, where the record index is the line number of a `.jsonl`
(1-based), 0 for a `.txt`, the row or record number otherwise. `order` packs the two into one int, so "the first
occurrence" means the same thing on any number of workers, and `where` names the place in messages and reports.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
from typing import Any, Iterator

from fmjax.errors import UserError

KINDS = (".jsonl", ".txt", ".parquet", ".array_record")
WHERE = "_where"  # record key naming a record's origin, as in fmjax.data.sources; never written out
_INDEX_BITS = 40  # records per input < 2^40; inputs < 2^23


class CurationError(UserError):
  """Bad input: the message names the file/line/field and the fix."""


def order(input_index: int, record_index: int) -> int:
  """One int that sorts records by input, then by place in the input."""
  return input_index << _INDEX_BITS | record_index


def where(inputs: list[str], order_: int) -> str:
  """`path:line`, `path`, `path:row N`, `path:record N` or `tfds:NAME[i]` of a record's `order`."""
  path, index = inputs[order_ >> _INDEX_BITS], order_ & ((1 << _INDEX_BITS) - 1)
  if path.startswith("tfds:"):
    return f"{path}[{index}]"
  kind = os.path.splitext(path)[1]
  return {".jsonl": f"{path}:{index}", ".txt": path, ".parquet": f"{path}:row {index}"}.get(
      kind, f"{path}:record {index}")


def list_inputs(patterns: list[str]) -> list[str]:
  """The inputs of each glob (sorted within a glob, `**` recursive, globs in the order given), or an error."""
  out: list[str] = []
  for pattern in patterns:
    if pattern.startswith("tfds:"):
      out.append(pattern)
      continue
    if "://" in pattern:
      from apache_beam.io.filesystems import FileSystems
      paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    else:
      paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
      paths = [p for p in paths if os.path.basename(p) not in ("manifest.json", "report.json")]
    if not paths:
      raise CurationError(f"--input={pattern!r} matches no files; check the path, and quote the glob so the shell "
                          f"passes it unexpanded (e.g. --input='data/**/*.jsonl').")
    bad = [p for p in paths if not p.endswith(KINDS)]
    if bad:
      raise CurationError(f"--input={pattern!r} matches {len(bad)} file(s) that are not {'/'.join(KINDS)}, e.g. "
                          f"{bad[0]!r}; narrow the glob (e.g. '*.jsonl').")
    out.extend(paths)
  if len(set(out)) != len(out):
    raise CurationError("--input globs overlap (a file is named twice); make them disjoint.")
  return out


def license_of(path: str, default: str, license_map: dict[str, str]) -> str:
  """The license of an input: the first `license_map` glob that matches its path, else `default`, else unknown."""
  for pattern, license_id in license_map.items():
    if fnmatch.fnmatch(path, pattern):
      return license_id
  return default or "unknown"


def record_line(record: dict) -> bytes:
  """A record as one canonical JSON line (its place left out): what a source with no one file is hashed over."""
  record = {k: v for k, v in record.items() if k != WHERE}
  return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n"


def _open(path: str):
  if "://" in path:
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.open(path)
  return open(path, "rb")


def file_sha256(path: str) -> tuple[str, int]:
  """(sha256 hex digest, bytes) of a file's contents."""
  h, n = hashlib.sha256(), 0
  with _open(path) as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
      n += len(chunk)
  return h.hexdigest(), n


class Input:
  """One input's records, as ("ok", index, record) or ("bad", index, error) items; `stats()` after iterating.

  A bad record (not JSON, not an object, no string `field`, not UTF-8) is an item, so the caller decides to raise
  or to count it; `field` is where `.txt` text and text-only `.array_record` records go.
  """

  def __init__(self, path: str, field: str = "text", tfds_data_dir: str = ""):
    self.path, self.field, self.tfds_data_dir = path, field, tfds_data_dir
    self.records = 0
    self.sha256: str | None = None
    self.bytes = 0

  def __iter__(self) -> Iterator[tuple[str, int, Any]]:
    path = self.path
    if path.startswith("tfds:"):
      yield from self._tfds()
      return
    kind = os.path.splitext(path)[1]
    if kind == ".jsonl":
      h = hashlib.sha256()
      with _open(path) as f:
        for line_no, line in enumerate(f, start=1):
          h.update(line)
          self.bytes += len(line)
          if line.strip():
            self.records += 1
            yield self._record(line_no, line)
      self.sha256 = h.hexdigest()
      return
    self.sha256, self.bytes = file_sha256(path)
    if kind == ".txt":
      with _open(path) as f:
        raw = f.read()
      self.records = 1
      try:
        yield "ok", 0, {self.field: raw.decode("utf-8")}
      except UnicodeDecodeError as e:
        yield "bad", 0, f"not UTF-8 text ({e})"
    elif kind == ".parquet":
      import pyarrow.parquet as pq
      with _open(path) as f:
        table = pq.ParquetFile(f)
        row = 0
        for batch in table.iter_batches():
          for record in batch.to_pylist():
            self.records += 1
            yield self._checked(row, record)
            row += 1
    else:
      from array_record.python import array_record_module
      reader = array_record_module.ArrayRecordReader(path)
      try:
        for i in range(reader.num_records()):
          self.records += 1
          raw = reader.read([i])[0]
          yield self._record(i, raw, text_ok=True)
      finally:
        reader.close()

  def _tfds(self) -> Iterator[tuple[str, int, Any]]:
    from fmjax.data.sources import TfdsSource
    name, _, split = self.path[len("tfds:"):].partition(":")
    source = TfdsSource(name, split or "train", self.tfds_data_dir)
    h = hashlib.sha256()  # a dataset has no one file: the digest is of its records, as canonical JSON lines
    for i in range(len(source)):
      record = {k: v for k, v in source[i].items() if k != WHERE}
      line = record_line(record)
      h.update(line)
      self.bytes += len(line)
      self.records += 1
      yield self._checked(i, record)
    self.sha256 = h.hexdigest()

  def _record(self, index: int, raw: bytes, text_ok: bool = False) -> tuple[str, int, Any]:
    try:
      record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      if text_ok:
        try:
          return "ok", index, {self.field: raw.decode("utf-8")}
        except UnicodeDecodeError:
          pass
      return "bad", index, f"not valid JSON ({e})"
    if not isinstance(record, dict):
      return "bad", index, f"expected a JSON object, got {type(record).__name__}"
    return self._checked(index, record)

  def _checked(self, index: int, record: dict) -> tuple[str, int, Any]:
    if not isinstance(record.get(self.field), str):
      return "bad", index, f"the record has no string field {self.field!r} (keys: {sorted(record)[:8]}); set --field"
    return "ok", index, record

  def stats(self) -> dict[str, Any]:
    """What the manifest records of this input, once iterated."""
    return {"uri": self.path, "sha256": self.sha256, "sha256_of": "records" if self.path.startswith("tfds:")
            else "file", "bytes": self.bytes, "records": self.records}
