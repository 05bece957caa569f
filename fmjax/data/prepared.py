"""Tokenizes a source once into ArrayRecord shards (`tools/prepare_data.py`); runs read them back as `prepared:DIR`.

The directory's layout and its reader are `fmjax.data.sources.PreparedSource`; this module writes it.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any

import grain

from fmjax.data.sources import PREPARED_META, DataError, open_source, serialize
from fmjax.data.tokenizers import tokenizer_id

VERSION = 1


def prepare(spec: str, encoder: Any, tokenizer: Any, output: str, workers: int = 0,
            records_per_shard: int = 100_000, tfds_data_dir: str = "") -> dict:
  """Tokenizes every record of `spec` with `encoder` into `output`; returns the written meta."""
  from array_record.python import array_record_module

  source = open_source(spec, "all", tfds_data_dir=tfds_data_dir)
  os.makedirs(output, exist_ok=True)
  if glob.glob(os.path.join(output, "data-*.array_record")) or os.path.exists(os.path.join(output, PREPARED_META)):
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
  with open(os.path.join(output, PREPARED_META), "w") as f:  # written last: its presence marks a complete directory
    json.dump(meta, f, indent=2)
  return meta
