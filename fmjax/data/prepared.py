"""Tokenizes a source once into ArrayRecord shards on Apache Beam (`tools/prepare_data.py`); runs read them back
as `prepared:DIR`.

The work is split into units that each become one or more shards: one input file per unit (`.txt` files in groups
of `records_per_shard`), or ranges of `records_per_shard` records of an embedded or tfds source. Shard
`data-UUUUU-CCCCC.array_record` holds chunk C of unit U, so the shards in name order hold the examples in source
order, and the output is the same bytes for any number of workers. The directory's layout and its reader are
`fmjax.data.sources.PreparedSource`; `meta.json` (written last) marks it complete, and `manifest.json` is its
governance record (`fmjax.governance.manifest`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from typing import Any, Iterator

from fmjax.curation.read import file_sha256, license_of, record_line
from fmjax.data import sources
from fmjax.data.sources import PREPARED_META, DataError, open_source, serialize
from fmjax.data.tokenizers import tokenizer_id
from fmjax.governance import lineage, manifest

VERSION = 2
FILE_CLASSES = {".txt": sources.TextFiles, ".jsonl": sources.JsonlFiles, ".parquet": sources.ParquetFiles,
                ".array_record": sources.ArrayRecordFiles}


def units(spec: str, records_per_shard: int, tfds_data_dir: str = "") -> list[dict[str, Any]]:
  """The work units of a source spec: {"files": [...]} or {"spec", "start", "stop"}."""
  kind = spec.partition(":")[0]
  if kind == "prepared":
    raise DataError(f"--source={spec} is already prepared; train on it directly (data.source={spec}).")
  if kind in ("embedded", "tfds"):
    n = len(open_source(spec, "all", tfds_data_dir=tfds_data_dir))
    return [{"spec": spec, "start": s, "stop": min(s + records_per_shard, n)} for s in range(0, n, records_per_shard)]
  paths = sources.expand(spec)
  if paths[0].endswith(".txt"):
    return [{"files": paths[i:i + records_per_shard]} for i in range(0, len(paths), records_per_shard)]
  return [{"files": [p]} for p in paths]


def source_license(spec: str, default: str, license_map: dict[str, str]) -> str:
  """An embedded corpus's own license; else `--license_map` / `--license`; else the licenses of the manifest the
  input came out of (a curated file carries its raw inputs' licenses: "A AND B"); else unknown."""
  kind, _, name = spec.partition(":")
  if kind == "embedded":
    return lineage.embedded_license(name)
  given = license_of(spec, default, license_map)
  parent = manifest.parent_of(spec) if given == manifest.UNKNOWN and kind != "tfds" else None
  if parent is not None:
    licenses = sorted(manifest.read(parent["path"])[0].get("licenses", {}))
    if licenses and manifest.UNKNOWN not in licenses:
      return " AND ".join(licenses)
  return given


def records_sha256(source: Any) -> str:
  """sha256 of a record source's records as canonical JSON lines (a source with no one file: embedded, tfds)."""
  h = hashlib.sha256()
  for i in range(len(source)):
    h.update(record_line(source[i]))
  return h.hexdigest()


class _WriteUnit:
  """unit index -> {"unit", "examples", "tokens", "shards", "files": [per-file stats]}; writes the unit's shards."""

  def __init__(self, units_: list[dict], encoder: Any, output: str, records_per_shard: int, tfds_data_dir: str):
    self.units, self.encoder, self.output = units_, encoder, output
    self.records_per_shard, self.tfds_data_dir = records_per_shard, tfds_data_dir

  def __call__(self, index: int) -> Iterator[dict]:
    from array_record.python import array_record_module

    unit = self.units[index]
    if "files" in unit:
      source = FILE_CLASSES[os.path.splitext(unit["files"][0])[1]](unit["files"])
      rows = range(len(source))
    else:
      source = open_source(unit["spec"], "all", tfds_data_dir=self.tfds_data_dir)
      rows = range(unit["start"], unit["stop"])
    examples = tokens = chunk = 0
    writer = None
    for i in rows:
      example = self.encoder(source[i])
      if example is None:
        continue
      if writer is None or examples % self.records_per_shard == 0 and examples:
        if writer is not None:
          writer.close()
          chunk += 1
        path = os.path.join(self.output, f"data-{index:05d}-{chunk:05d}.array_record")
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      writer.write(serialize(example))
      examples += 1
      tokens += sum(len(v) for k, v in example.items() if k.endswith("tokens"))
    if writer is not None:
      writer.close()
    files = []
    for path in unit.get("files", []):  # one file, or .txt files of one record each
      sha, size = file_sha256(path)
      files.append({"uri": os.path.abspath(path), "sha256": sha, "sha256_of": "file", "bytes": size,
                    "records": len(source) if len(unit["files"]) == 1 else 1})
    yield {"unit": index, "examples": examples, "tokens": tokens, "shards": chunk + 1 if writer else 0,
           "files": files}


def prepare(spec: str, encoder: Any, tokenizer: Any, output: str, records_per_shard: int = 100_000,
            tfds_data_dir: str = "", *, runner_name: str = "direct", num_workers: int = 1,
            beam_args: list[str] = (), license_id: str = "", license_map: dict[str, str] | None = None) -> dict:
  """Tokenizes every record of `spec` with `encoder` into `output` on Beam; returns the written meta."""
  from fmjax.curation import runner

  beam = runner.beam()
  if records_per_shard < 1:
    raise DataError(f"--records_per_shard={records_per_shard} must be >= 1.")
  os.makedirs(output, exist_ok=True)
  if glob.glob(os.path.join(output, "data-*.array_record")) or os.path.exists(os.path.join(output, PREPARED_META)):
    raise DataError(f"{output} already holds prepared data; choose an empty --output directory.")
  units_ = units(spec, records_per_shard, tfds_data_dir)
  if not units_:
    raise DataError(f"data source {spec!r} holds no records.")
  created, t0 = manifest.now(), time.perf_counter()
  results: list[dict] = []
  p = runner.pipeline(runner_name, num_workers, list(beam_args))
  try:
    with p:
      _ = (p | "Units" >> beam.Create(list(range(len(units_)))) | "Spread" >> beam.Reshuffle()
           | "Tokenize and write" >> beam.FlatMap(_WriteUnit(units_, encoder, output, records_per_shard,
                                                             tfds_data_dir))
           | "All" >> beam.combiners.ToList()
           | "Summary" >> beam.Map(_write_summary, output))
  except Exception as e:
    for path in glob.glob(os.path.join(output, "data-*.array_record")) + glob.glob(os.path.join(output, "_units.json")):
      os.remove(path)  # no partial output
    message = runner.failure(e)
    if message is None:
      raise
    raise DataError(message) from None
  with open(os.path.join(output, "_units.json")) as f:
    results = sorted(json.load(f), key=lambda r: r["unit"])
  os.remove(os.path.join(output, "_units.json"))
  seconds = time.perf_counter() - t0
  if "files" in units_[0]:
    inputs = [{**f, "license": source_license(f["uri"], license_id, license_map or {})}
              for r in results for f in r["files"]]
  else:
    source = open_source(spec, "all", tfds_data_dir=tfds_data_dir)
    inputs = [{"uri": spec, "sha256": records_sha256(source), "sha256_of": "records", "records": len(source),
               "license": source_license(spec, license_id, license_map or {})}]
  shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(output, "data-*.array_record")))
  meta = {"version": VERSION, "source": spec, "format": encoder.fmt, "tokenizer": tokenizer_id(tokenizer),
          "tokenizer_path": getattr(tokenizer, "path", ""), "examples": sum(r["examples"] for r in results),
          "tokens": sum(r["tokens"] for r in results), "shards": len(shards), "seconds": round(seconds, 2)}
  outputs = [{"file": name, **dict(zip(("sha256", "bytes"), file_sha256(os.path.join(output, name))))}
             for name in shards]
  rules = {"format": encoder.fmt, "field": encoder.field, "chat_template": encoder.chat.spec,
           "tokenizer": meta["tokenizer"], "tokenizer_path": meta["tokenizer_path"],
           "records_per_shard": records_per_shard}
  parents = manifest.parents([i["uri"] for i in inputs if i["sha256_of"] == "file"])
  record = manifest.build("prepare", inputs, rules, outputs, {"examples": meta["examples"], "tokens": meta["tokens"]},
                          parents, created, manifest.tool_versions("apache-beam", "numpy", "sentencepiece"))
  with open(os.path.join(output, manifest.NAME), "wb") as f:
    f.write(manifest.dumps(record))
  with open(os.path.join(output, PREPARED_META), "w") as f:  # written last: its presence marks a complete directory
    json.dump(meta, f, indent=2)
  return meta


def _write_summary(results: list[dict], output: str) -> None:
  with open(os.path.join(output, "_units.json"), "w") as f:
    json.dump(results, f)
