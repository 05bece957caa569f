"""Parameterisations: how a run's trainable weights adapt a frozen base, each from its config section.

A parameterisation is one module with an `Adapter` subclass (fmjax/adapters/base.py) plus one line in `REGISTRY`
(or `register` from a user's module). A run uses the one whose section switches it on (LoRA: `lora.rank > 0`);
with none on, every parameter trains.
"""

from __future__ import annotations

import importlib
from typing import Any

from fmjax.adapters.base import TASK_HEADS, Adapter, combine, split
from fmjax.errors import UserError

# name -> "module:class"; the name is also the config section its options live in
REGISTRY: dict[str, str] = {
    "lora": "fmjax.adapters.lora:LoraConfig",
    "reft": "fmjax.adapters.reft:ReftConfig",
}
_LOADED: dict[str, type[Adapter]] = {}


def register(name: str, cls: type[Adapter]) -> None:
  """Adds a parameterisation defined outside the package; its options are the config section `name`."""
  cls.section = cls.section or name
  _LOADED[name] = cls


def registered() -> dict[str, type[Adapter]]:
  """Name -> class of every parameterisation."""
  for name, where in REGISTRY.items():
    if name not in _LOADED:
      module, attr = where.split(":")
      _LOADED[name] = getattr(importlib.import_module(module), attr)
  return dict(_LOADED)


def get(sections: Any) -> Adapter | None:
  """The parameterisation the config `sections` (name -> section) switch on (validated), or None when every parameter
  trains."""
  on = [(name, cls) for name, cls in registered().items() if name in sections and cls.enabled(sections[name])]
  if len(on) > 1:
    names = [n for n, _ in on]
    raise UserError(f"{' and '.join(names)} are both on; a run adapts its base one way: switch one off "
                    f"({'; '.join(registered()[n].off_hint for n in names)}).")
  return on[0][1].from_config(sections[on[0][0]]) if on else None


def train_flops_per_token(cfg: Any, seq_len: int, adapter: Adapter | None, trained: int | None = None) -> float:
  """Training FLOPs per token of the model under `adapter` (fmjax.model.flops's convention): the base's (frozen
  under an adapter, so no weight gradients), plus the adapter's own. `trained`: the adapter's parameter count
  (default: counted from shapes)."""
  from fmjax.model import flops, init_params

  base = flops.train_flops_per_token(cfg, seq_len, frozen_weights=adapter is not None)
  if adapter is None:
    return base
  if trained is None:
    import jax

    shapes = jax.eval_shape(lambda r: init_params(cfg, r, adapter=adapter), jax.random.PRNGKey(0))
    trained = sum(x.size for x in jax.tree.leaves(split(adapter, shapes)[0]))
  return base + adapter.flops_per_token(cfg, seq_len, trained)


def owner(path: tuple[str, ...]) -> type[Adapter] | None:
  """The parameterisation whose leaf `path` is, whatever its options, or None for base weights."""
  for cls in registered().values():
    if cls.owns_path(path):
      return cls
  return None


__all__ = ["Adapter", "REGISTRY", "TASK_HEADS", "combine", "get", "owner", "register", "registered", "split",
           "train_flops_per_token"]
