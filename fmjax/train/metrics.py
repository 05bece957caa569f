"""Run records: `metrics.jsonl` (one JSON object per logged step), TensorBoard events and a console line."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Mapping

import jax
import numpy as np


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def truncate_after(workdir: str, step: int) -> int:
  """Drops `metrics.jsonl` rows logged after `step` (a run resumed from an earlier checkpoint redoes those steps);
  returns how many were dropped."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (json.JSONDecodeError, KeyError, TypeError):
      pass  # a line cut off by a kill
  if len(keep) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)
  return len(lines) - len(keep)


class MetricsWriter:
  """Writes on the main process only; other processes get a writer that does nothing."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
      from tensorboardX import SummaryWriter  # heavy import, only where it writes

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(k, v, step)

  def console(self, step: int, total: int, metrics: Mapping[str, float], eta_seconds: float) -> None:
    parts = [f"step {step}/{total}", f"loss {metrics['loss']:.4f}"]
    if "eval_loss" in metrics:
      parts.append(f"eval {metrics['eval_loss']:.4f}")
    if "reward" in metrics:  # a rollout's mean reward (RL)
      parts.append(f"reward {metrics['reward']:.4f}")
    if "tokens_per_sec" in metrics:
      parts.append(f"{metrics['tokens_per_sec']:,.0f} tok/s")
    if "mfu" in metrics:
      parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    parts.append(f"ETA {format_eta(eta_seconds)}")
    logging.info(" | ".join(parts))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class BatchDigests:
  """Debug (`log.batch_digests`): which data each process trains on. Every process appends, per step, a short hash of
  each batch row it holds, keyed by the row's index in the global batch, to WORKDIR/batch_digests/process_<i>.jsonl;
  a resumed run appends, so the last line of a step counts. Costs a device-to-host copy of the batch per step."""

  def __init__(self, workdir: str):
    directory = os.path.join(workdir, "batch_digests")
    os.makedirs(directory, exist_ok=True)
    self._file = open(os.path.join(directory, f"process_{jax.process_index()}.jsonl"), "a", buffering=1)

  def write(self, step: int, batch: Mapping[str, jax.Array]) -> None:
    rows: dict[int, dict[str, bytes]] = {}
    for key in sorted(batch):
      for shard in batch[key].addressable_shards:  # devices that replicate a row give it twice: same hash
        start = shard.index[0].start or 0
        for i, row in enumerate(np.asarray(shard.data)):
          rows.setdefault(start + i, {})[key] = row.tobytes()
    digests = {r: hashlib.sha256(b"".join(parts[k] for k in sorted(parts))).hexdigest()[:16]
               for r, parts in sorted(rows.items())}
    self._file.write(json.dumps({"step": step, "rows": digests}) + "\n")

  def close(self) -> None:
    self._file.close()
