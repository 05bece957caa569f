"""Weighted mixtures of packed-row streams whose weights may change with the training step.

Row r of a process's stream belongs to step r // rows_per_step; it is drawn from source k with probability
w_k(step) / Σ_j w_j(step), using a generator seeded by (seed, process, r) — so the choice of every row is fixed in
advance, independent of how far any source has got, and the iterator state is just the row counter plus the
sources' own states. Rows never mix sources. A weight is a number (`0.3`) or a schedule of `step:value` points
(`0:0.0,1000:0.3`) interpolated linearly between points and held constant outside them — e.g. to fade replay data in
or out during continuous pre-training.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np
from fmjax.errors import UserError


class Schedule:
  """A piecewise-linear function of the step, parsed from `0.3` or `0:0.0,1000:0.3`."""

  def __init__(self, spec: str | float, name: str = "weight"):
    text = str(spec).strip()
    try:
      if ":" not in text:
        points = [(0, float(text))]
      else:
        points = [(int(s), float(v)) for s, v in (p.split(":") for p in text.split(","))]
    except ValueError as e:
      raise UserError(f"{name}={text!r} is not a weight: write a number (0.3) or step:value points "
                      "(0:0.0,1000:0.3).") from e
    points.sort()
    if any(v < 0 for _, v in points):
      raise UserError(f"{name}={text!r}: weights must be >= 0.")
    self.steps = np.asarray([s for s, _ in points], np.float64)
    self.values = np.asarray([v for _, v in points], np.float64)

  def __call__(self, step: int) -> float:
    return float(np.interp(step, self.steps, self.values))


def weights_at(schedules: Sequence[Schedule], step: int) -> np.ndarray:
  w = np.asarray([s(step) for s in schedules])
  total = w.sum()
  if total <= 0:
    raise UserError(f"the mixture weights are all zero at step {step}; give some source a positive weight there.")
  return w / total


class StepMixIterDataset(grain.IterDataset):
  """Interleaves rows of `parents` by step-dependent weights (see module docstring)."""

  def __init__(self, parents: Sequence[grain.IterDataset], schedules: Sequence[Schedule], rows_per_step: int,
               seed: int, process_index: int = 0):
    super().__init__(list(parents))
    self.schedules, self.rows_per_step, self.seed, self.process_index = schedules, rows_per_step, seed, process_index

  def __iter__(self) -> grain.DatasetIterator:
    return _StepMixIterator([iter(p) for p in self.parents], self)

  def __str__(self) -> str:
    return f"StepMixIterDataset(rows_per_step={self.rows_per_step}, seed={self.seed})"


def choose(ds: StepMixIterDataset, row: int) -> int:
  """The source of row `row`."""
  cdf = np.cumsum(weights_at(ds.schedules, row // ds.rows_per_step))
  u = np.random.default_rng([ds.seed, ds.process_index, row]).random()
  return int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))


class _StepMixIterator(grain.DatasetIterator):

  def __init__(self, parents: list, ds: StepMixIterDataset):
    super().__init__(parents)
    self.ds, self.row = ds, 0

  def __next__(self):
    k = choose(self.ds, self.row)
    self.row += 1
    return next(self._parents[k])

  def get_state(self) -> dict:
    return {"row": self.row, "parents": [p.get_state() for p in self._parents]}

  def set_state(self, state: dict) -> None:
    self.row = int(state["row"])
    for p, s in zip(self._parents, state["parents"], strict=True):
      p.set_state(s)
