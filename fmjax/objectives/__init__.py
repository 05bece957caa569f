"""Loss heads, chosen by `config.objective.name`. Adding a head is adding a module and a line here."""

from __future__ import annotations

from typing import Any, Callable

from fmjax.objectives import distill, lm, preference, sft
from fmjax.objectives.base import LossContext, LossOutput

REGISTRY: dict[str, Callable[[Any], Callable[..., LossOutput]]] = {
    "lm": lm.make, "sft": sft.make, **preference.HEADS, "distill": distill.make}


def get(objective_cfg: Any) -> Callable[..., LossOutput]:
  """The loss function of head `objective_cfg.name`, configured."""
  if objective_cfg.name not in REGISTRY:
    raise ValueError(f"objective.name={objective_cfg.name!r} is not a registered head; choose one of "
                     f"{sorted(REGISTRY)}.")
  return REGISTRY[objective_cfg.name](objective_cfg)


__all__ = ["LossContext", "LossOutput", "REGISTRY", "get"]
