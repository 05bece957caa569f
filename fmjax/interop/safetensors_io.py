"""Streaming safetensors: read tensors one at a time from (sharded) files through memory maps, and write sharded
files tensor by tensor, so converting a checkpoint never holds more than one tensor in memory.

The format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (offsets
relative to the end of the header), then the raw row-major little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from fmjax.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


class Reader:
  """Lazy access to every tensor of a checkpoint directory: `model.safetensors`, or the shards listed in
  `model.safetensors.index.json` (or, lacking both, every `*.safetensors` file)."""

  def __init__(self, directory: str):
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    else:
      files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"{directory} holds no *.safetensors weights (PyTorch .bin checkpoints are not read; "
                              "re-save the model with `save_pretrained(..., safe_serialization=True)`).")
    self.entries: dict[str, tuple[str, int, dict]] = {}
    for name in files:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
      header.pop("__metadata__", None)
      for key, info in header.items():
        self.entries[key] = (path, 8 + length, info)

  def __contains__(self, name: str) -> bool:
    return name in self.entries

  def keys(self) -> list[str]:
    return list(self.entries)

  def get(self, name: str) -> np.ndarray:
    """Tensor `name` as a read-only memory-mapped array (pages are read from disk on use)."""
    if name not in self.entries:
      raise KeyError(f"tensor {name!r} is missing from the checkpoint (it has e.g. {sorted(self.entries)[:4]}).")
    path, start, info = self.entries[name]
    dtype = np.dtype(DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end == begin:
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def write(directory: str, specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]], produce: Callable[[str], np.ndarray],
          max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None) -> list[str]:
  """Writes the tensors `specs` (name, dtype, shape), in order, into shards of at most `max_shard_bytes` (a larger
  tensor gets a shard of its own), calling `produce(name)` for each one just before it is written. Several shards
  get HF's names (`model-00001-of-00003.safetensors`) and an index; returns the file names."""
  specs = [(name, np.dtype(dtype), tuple(shape)) for name, dtype, shape in specs]
  shards: list[list] = [[]]
  size = 0
  for spec in specs:
    nbytes = spec[1].itemsize * int(np.prod(spec[2], dtype=np.int64))
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  os.makedirs(directory, exist_ok=True)
  weight_map, total = {}, 0
  for file_name, shard in zip(names, shards):
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for name, dtype, shape in shard:
      nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
      header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
      weight_map[name] = file_name
    total += offset
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(os.path.join(directory, file_name), "wb") as f:
      f.write(struct.pack("<Q", len(blob)) + blob)
      for name, dtype, shape in shard:
        array = np.ascontiguousarray(produce(name), dtype=dtype)
        if array.shape != shape:
          raise UserError(f"tensor {name}: produced shape {array.shape}, declared {shape}.")
        array.tofile(f)  # native order: little-endian on every platform JAX runs on
  if len(names) > 1:
    with open(os.path.join(directory, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names
