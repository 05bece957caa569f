"""Loss heads, chosen by `config.objective.name`. A head is a module whose `make(objective_cfg)` returns a `Head`,
plus one line in REGISTRY (or `register(name, make)` from a module of your own)."""

from __future__ import annotations

from typing import Any, Callable

from fmjax.errors import UserError
from fmjax.objectives import classify, distill, grpo, lm, preference, reward, sft
from fmjax.objectives.base import Frozen, Head, LossContext, LossOutput

REGISTRY: dict[str, Callable[[Any], Head]] = {
    "lm": lm.make, "sft": sft.make, **preference.HEADS, "distill": distill.make, "reward": reward.make,
    "classify": classify.make, "grpo": grpo.make}


def register(name: str, make: Callable[[Any], Head]) -> None:
  """Adds head `name` (objective.name) built by `make(objective_cfg) -> Head`."""
  REGISTRY[name] = make


def get(objective_cfg: Any) -> Head:
  """Head `objective_cfg.name`, configured."""
  if objective_cfg.name not in REGISTRY:
    raise UserError(f"objective.name={objective_cfg.name!r} is not a registered head; choose one of "
                    f"{sorted(REGISTRY)}.")
  return REGISTRY[objective_cfg.name](objective_cfg)


__all__ = ["Frozen", "Head", "LossContext", "LossOutput", "REGISTRY", "get", "register"]
