"""Advantages of a rollout's rewards, G completions per prompt (rows g·G … g·G + G − 1 are prompt g's group).

  group: (r − group mean) / (group std + 1e-4)        group-normalised (TRL's default `scale_rewards="group"`)
  batch: (r − group mean) / (batch std + 1e-4)        Liu et al. (2025)'s recommendation
  none:  r − group mean                               the same without scaling
  rloo:  r − mean of the other G − 1 rewards = G/(G − 1) · (r − group mean)   the leave-one-out baseline
Standard deviations are the sample ones (ddof = 1, as torch.std in TRL). Each group's advantages sum to zero, and a
group of equal rewards has advantage 0 (its std is 0: no NaN).
"""

from __future__ import annotations

import numpy as np

from fmjax.errors import UserError

SCALES = ("group", "batch", "none", "rloo")


def compute(rewards: np.ndarray, group_size: int, scale: str = "group") -> np.ndarray:
  """float64 advantages [N] of rewards [N] (N a multiple of `group_size`)."""
  if scale not in SCALES:
    raise UserError(f"objective.scale_rewards={scale!r} must be one of {SCALES}.")
  r = np.asarray(rewards, np.float64)
  if r.ndim != 1 or len(r) % group_size:
    raise UserError(f"{len(r)} rewards do not form groups of objective.num_generations={group_size}.")
  groups = r.reshape(-1, group_size)
  centred = groups - groups.mean(axis=1, keepdims=True)
  if scale == "rloo":
    if group_size < 2:
      raise UserError("objective.scale_rewards='rloo' needs objective.num_generations >= 2 (a leave-one-out "
                      "baseline).")
    return (centred * group_size / (group_size - 1)).reshape(-1)
  if scale == "group":
    std = groups.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else np.zeros_like(groups[:, :1])
    return (centred / (std + 1e-4)).reshape(-1)
  if scale == "batch":
    return (centred / ((r.std(ddof=1) if len(r) > 1 else 0.0) + 1e-4)).reshape(-1)
  return centred.reshape(-1)


def zero_std_fraction(rewards: np.ndarray, group_size: int) -> float:
  """The fraction of groups whose rewards are all equal (they teach nothing)."""
  groups = np.asarray(rewards, np.float64).reshape(-1, group_size)
  return float(np.mean(np.ptp(groups, axis=1) == 0))
