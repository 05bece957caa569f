"""Reward functions, named in `objective.rewards` as 'name[:weight],...': a built-in of REGISTRY, `model` (the
reward model of `objective.reward_model`, scored on the device by the rollout), or a user's 'package.module:function'.

A reward function takes `(prompts, completions, **fields)` — lists of the prompts (a record's `prompt`: a string or
chat messages), the completions' texts, and each other field of the records as a list, as TRL's GRPOTrainer passes
dataset columns — and returns one float per completion. A completion's reward is the weighted sum over functions.
Each call runs in a thread, waited on in short slices, so that a function that blocks is stopped by its time
limit, or by the caller's `cancelled()` (a stop signal), instead of hanging the run.
"""

from __future__ import annotations

import importlib
import math
import threading
import time
from typing import Callable, Sequence

from fmjax.errors import UserError, message

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
    if not math.isfinite(weight):
      raise UserError(f"objective.rewards: the entry {part!r} has the weight {tail}; a weight must be a finite number: "
                      f"write e.g. '{name}:0.5', or '{name}' for weight 1.")
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


_SLICE = 0.2  # seconds between checks of `cancelled` while a reward function runs


def call(name: str, fn: RewardFn, prompts: list, completions: list[str], fields: dict[str, list],
         timeout: float = 0.0, cancelled: Callable[[], bool] = lambda: False,
         stop: type[BaseException] = KeyboardInterrupt) -> list[float]:
  """fn's rewards, checked: one finite float per completion. `timeout` seconds at most (0 = no limit); `stop` is
  raised once `cancelled()` is true. An error inside fn is one line naming it (its traceback: --debug)."""
  done, result = threading.Event(), {}

  def run() -> None:
    try:
      result["out"] = fn(prompts, completions, **fields)
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
      result["error"] = e
    finally:
      done.set()

  # daemon: a call that never returns is abandoned, and must not keep the process alive at exit
  threading.Thread(target=run, name=f"reward {name}", daemon=True).start()
  deadline = time.monotonic() + timeout if timeout > 0 else math.inf
  while not done.wait(min(_SLICE, max(deadline - time.monotonic(), 0.0))):
    if cancelled():
      raise stop(f"stopped while reward function {name!r} ran")
    if time.monotonic() >= deadline:
      raise UserError(f"reward function {name!r} (objective.rewards) did not return within objective.reward_timeout="
                      f"{timeout:g} seconds; fix what it waits on, or raise objective.reward_timeout (0 = no limit).")
  if "error" in result:
    e = result["error"]
    if isinstance(e, UserError) or not isinstance(e, Exception):
      raise e
    detail = f": {message(e)}" if str(e).strip() else ""
    raise UserError(f"reward function {name!r} (objective.rewards) raised {type(e).__name__}{detail}; fix the function "
                    "or remove it from objective.rewards.") from e
  out = result["out"]
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
