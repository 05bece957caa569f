"""Reward functions, named in `objective.rewards` as 'name[:weight],...': a built-in of REGISTRY, `model` (the
reward model of `objective.reward_model`, scored on the device by the rollout), or a user's 'package.module:function'.

A reward function takes `(prompts, completions, **fields)` — lists of the prompts (a record's `prompt`: a string or
chat messages), the completions' texts, and each other field of the records as a list, as TRL's GRPOTrainer passes
dataset columns — and returns one float per completion. A completion's reward is the weighted sum over functions.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

from fmjax.errors import UserError

RewardFn = Callable[..., Sequence[float]]
# name -> "module:function" (imported when a run names it), or a function `register` added
REGISTRY: dict[str, str | RewardFn] = {
    "sort_digits": "fmjax.rl.tasks:sort_digits",
    "sort_exact": "fmjax.rl.tasks:sort_exact",
}
MODEL = "model"  # the reward model, scored in the rollout


def register(name: str, fn: RewardFn) -> None:
  """Adds reward function `name` for objective.rewards (from your own module, with no edit to fmjax/)."""
  REGISTRY[name] = fn


def parse(spec: str) -> list[tuple[str, float]]:
  """[(name, weight)] of 'name[:weight],...' (a name may be 'package.module:function')."""
  out = []
  for part in (p.strip() for p in str(spec).split(",")):
    if not part:
      continue
    name, weight = part, 1.0
    head, _, tail = part.rpartition(":")
    if head:
      try:
        weight, name = float(tail), head
      except ValueError:
        pass  # 'module:function' without a weight
    out.append((name, weight))
  if not out:
    raise UserError("objective.rewards is empty; name at least one reward function ('name[:weight],...'): "
                    f"{sorted(REGISTRY) + [MODEL]} or 'package.module:function'.")
  return out


def resolve(name: str) -> RewardFn:
  """The function `name` names (a registered one, or 'package.module:function' imported)."""
  where = REGISTRY.get(name, name)
  if callable(where):
    return where
  module, _, attr = where.partition(":")
  if not attr:
    raise UserError(f"objective.rewards: {name!r} is not a reward function; built-ins: {sorted(REGISTRY)}, "
                    f"'{MODEL}' (the reward model), or 'package.module:function' for your own.")
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise UserError(f"objective.rewards: cannot load {name!r} ({e}); it must be 'package.module:function' "
                    "importable from the working directory or PYTHONPATH.") from None
  if not callable(fn):
    raise UserError(f"objective.rewards: {name!r} is a {type(fn).__name__}, not a function (prompts, completions, "
                    "**fields) -> floats.")
  return fn


def call(name: str, fn: RewardFn, prompts: list, completions: list[str], fields: dict[str, list]) -> list[float]:
  """fn's rewards, checked: one finite float per completion."""
  out = fn(prompts, completions, **fields)
  try:
    values = [float(v) for v in out]
  except (TypeError, ValueError):
    raise UserError(f"reward function {name!r} returned {type(out).__name__}; it must return one float per "
                    f"completion ({len(completions)}).") from None
  if len(values) != len(completions):
    raise UserError(f"reward function {name!r} returned {len(values)} values for {len(completions)} completions; "
                    "it must return one float per completion.")
  if not all(math.isfinite(v) for v in values):
    raise UserError(f"reward function {name!r} returned a non-finite value; rewards must be finite floats.")
  return values


def functions(spec: str) -> list[tuple[str, float, RewardFn | None]]:
  """(name, weight, function; None for the reward model) of each entry of `spec`, all resolved (at start)."""
  return [(name, weight, None if name == MODEL else resolve(name)) for name, weight in parse(spec)]
