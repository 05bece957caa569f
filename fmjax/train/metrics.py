"""Run records: `metrics.jsonl` (one JSON object per logged step), TensorBoard events and a console line."""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping


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
