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
      files = _index_files(index)
    else:
      files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"{directory} holds no *.safetensors weights (PyTorch .bin checkpoints are not read; "
                              "re-save the model with `save_pretrained(..., safe_serialization=True)`).")
    self.entries: dict[str, tuple[str, int, dict]] = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.isfile(path):
        raise UserError(f"{index} lists the shard {name}, but {path} does not exist; download it again.")
      length, header = read_header(path)
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


def _index_files(index: str) -> list[str]:
  """The shard files `model.safetensors.index.json` names."""
  with open(index, "rb") as f:
    raw = f.read()
  try:
    files = set(json.loads(raw)["weight_map"].values())
  except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, no weight_map, or not a mapping
    raise UserError(f"{index} is not a safetensors index ({_why(e)}; it should hold {{\"weight_map\": {{tensor: "
                    f"file}}}}); the file is damaged or truncated ({len(raw)} bytes): download it again.") from None
  if not all(isinstance(name, str) for name in files):
    raise UserError(f"{index}: weight_map's values must be shard file names; download it again.")
  return sorted(files)


def read_header(path: str) -> tuple[int, dict]:
  """(header length, {tensor: {dtype, shape, data_offsets}}) of safetensors file `path`, checked against the file's
  size, so a truncated or damaged download is an error naming the file, not a failure when a tensor is read."""
  size = os.path.getsize(path)
  again = "download it again"
  with open(path, "rb") as f:
    head = f.read(8)
    if head.startswith(b"version "):  # `version https://git-lfs...`: a Git LFS pointer, not its content
      raise UserError(f"{path} is a Git LFS pointer ({size} bytes), not the weights; fetch them with `git lfs pull` "
                      "or `huggingface-cli download`.")
    if len(head) < 8:
      raise UserError(f"{path} is truncated: {size} bytes, less than the 8-byte header length; {again}.")
    (length,) = struct.unpack("<Q", head)
    if length > size - 8:
      raise UserError(f"{path} is truncated or not a safetensors file: its header says {length} header bytes, the "
                      f"file has {size} bytes in all; {again}.")
    raw = f.read(length)
  try:
    header = json.loads(raw)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise UserError(f"{path} is damaged: its {length}-byte header is not valid JSON ({_why(e)}); {again}.") from None
  if not isinstance(header, dict):
    raise UserError(f"{path} is damaged: its header is a JSON {type(header).__name__}, not an object; {again}.")
  header.pop("__metadata__", None)
  end = 0
  for key, info in header.items():
    if isinstance(info, dict) and "dtype" in info and info["dtype"] not in DTYPES:
      raise UserError(f"{path}: tensor {key!r} has dtype {info['dtype']!r}, which fmjax does not read (it reads "
                      f"{sorted(DTYPES)}); convert the checkpoint to one of those.")
    try:
      dtype, shape, (begin, stop) = np.dtype(DTYPES[info["dtype"]]), info["shape"], map(int, info["data_offsets"])
      nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    except (KeyError, TypeError, ValueError) as e:  # a field missing, or of the wrong kind
      raise UserError(f"{path} is damaged: the header entry of tensor {key!r} is malformed ({type(e).__name__}: "
                      f"{_why(e)}); {again}.") from None
    if stop - begin != nbytes or begin < 0:
      raise UserError(f"{path} is damaged: tensor {key!r} of shape {shape} ({info['dtype']}) needs {nbytes} bytes "
                      f"but its data_offsets [{begin}, {stop}] span {stop - begin}; {again}.")
    end = max(end, stop)
  if 8 + length + end > size:
    raise UserError(f"{path} is truncated: its header says {8 + length + end} bytes, the file has {size}; {again}.")
  return length, header


def _why(e: BaseException) -> str:
  """An exception's message on one line, for the errors above."""
  return str(e).splitlines()[0] if str(e) else type(e).__name__


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
