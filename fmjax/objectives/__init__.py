"""Loss heads, chosen by `config.objective.name`. A head is a module with its options (a dataclass of
`options.Options`, whose fields are the objective section's keys) and `make(options) -> Head`, plus one line in
REGISTRY (or `register(name, make, Options)` from a module of your own)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from fmjax.errors import UserError
from fmjax.objectives import classify, distill, grpo, lm, online_dpo, ppo, preference, reward, sft
from fmjax.objectives.base import Frozen, Head, LossContext, LossOutput, Part, Rollout
from fmjax.objectives.options import HeadType, Options

REGISTRY: dict[str, HeadType] = {
    "lm": lm.HEAD, "sft": sft.HEAD, **preference.HEADS, "distill": distill.HEAD, "reward": reward.HEAD,
    "classify": classify.HEAD, "grpo": grpo.HEAD, "ppo": ppo.HEAD, "online_dpo": online_dpo.HEAD}


def register(name: str, make: Callable[[Any], Head], options: type[Options] = Options) -> None:
  """Adds head `name` (objective.name) built by `make(options) -> Head`; `options` is its dataclass of option keys
  (default: none)."""
  REGISTRY[name] = HeadType(options, make)


def head_type(name: str) -> HeadType:
  if name not in REGISTRY:
    raise UserError(f"objective.name={name!r} must be one of the registered heads {sorted(REGISTRY)}.")
  return REGISTRY[name]


def section(name: str) -> dict[str, Any]:
  """The objective section of head `name`: its name and each option at its default."""
  return {"name": name, **{k: default for k, (default, _) in head_type(name).options.docs().items()}}


def resolve(objective: Mapping[str, Any]) -> Options:
  """The checked options of the head an objective section (`name` plus option keys) names."""
  values = dict(objective.items())
  name = values.pop("name")
  return head_type(name).options.resolve(name, values)


def get(objective: Mapping[str, Any]) -> Head:
  """Head `objective['name']`, configured by the section's option keys."""
  return head_type(objective["name"]).make(resolve(objective))


__all__ = ["Frozen", "Head", "HeadType", "LossContext", "LossOutput", "Options", "Part", "REGISTRY", "Rollout", "get",
           "head_type", "register", "resolve", "section"]
