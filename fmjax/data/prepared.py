"""Sources tokenized once into ArrayRecord files (`tools/prepare_data.py`), read back as `prepared:DIR`.

DIR holds `meta.json` (format, tokenizer identity, counts) and `data-NNNNN.array_record` shards whose records are
examples (see `fmjax.data.formats`) in source order: a JSON header line `{key: length}` followed by the int32 /
float32 arrays' bytes. Reading a prepared source with a different tokenizer is an error.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from typing import Any

import grain
import numpy as np

from fmjax.data.sources import WHERE, DataError, open_source

META = "meta.json"
VERSION = 1


def serialize(example: dict[str, np.ndarray]) -> bytes:
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


def tokenizer_id(tokenizer: Any) -> str:
  """Identifies a tokenizer by its kind and, for a model file, the file's bytes."""
  path = getattr(tokenizer, "path", None)
  if path is None:
    return f"{type(tokenizer).__name__}:{tokenizer.vocab_size}"
  if hasattr(tokenizer, "fingerprint"):
    return f"hf:{tokenizer.fingerprint()}"
  with open(path, "rb") as f:
    return f"sentencepiece:{hashlib.sha256(f.read()).hexdigest()[:16]}"


class PreparedSource:
  """The examples of a prepared directory, in source order."""

  def __init__(self, path: str):
    from array_record.python import array_record_data_source

    meta_path = os.path.join(path, META)
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


def prepare(spec: str, encoder: Any, tokenizer: Any, output: str, workers: int = 0,
            records_per_shard: int = 100_000, tfds_data_dir: str = "") -> dict:
  """Tokenizes every record of `spec` with `encoder` into `output`; returns the written meta."""
  from array_record.python import array_record_module

  source = open_source(spec, "all", tfds_data_dir=tfds_data_dir)
  os.makedirs(output, exist_ok=True)
  if glob.glob(os.path.join(output, "data-*.array_record")) or os.path.exists(os.path.join(output, META)):
    raise DataError(f"{output} already holds prepared data; choose an empty --output directory.")
  ds = grain.MapDataset.source(source).map(encoder).to_iter_dataset()
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  t0, examples, tokens, shard, writer = time.perf_counter(), 0, 0, 0, None
  it = iter(ds)
  for example in it:
    if writer is None or examples % records_per_shard == 0 and examples:
      if writer is not None:
        writer.close()
        shard += 1
      writer = array_record_module.ArrayRecordWriter(os.path.join(output, f"data-{shard:05d}.array_record"),
                                                     "group_size:1")
    writer.write(serialize(example))
    examples += 1
    tokens += sum(len(v) for k, v in example.items() if k.endswith("tokens"))
  if writer is not None:
    writer.close()
  if hasattr(it, "close"):
    it.close()  # stops grain's worker processes
  meta = {"version": VERSION, "source": spec, "format": encoder.fmt, "tokenizer": tokenizer_id(tokenizer),
          "tokenizer_path": getattr(tokenizer, "path", ""), "examples": examples, "tokens": tokens,
          "shards": shard + 1 if writer is not None else 0, "seconds": round(time.perf_counter() - t0, 2)}
  with open(os.path.join(output, META), "w") as f:  # written last: its presence marks a complete directory
    json.dump(meta, f, indent=2)
  return meta
