"""A loss head's options: a frozen dataclass next to its loss, whose fields are the keys of the `objective` config
section besides `name`. Each field carries its one-line doc and, where it has one, its range rule:

  @dataclasses.dataclass(frozen=True)
  class Options(options.Options):
    beta: float = options.field(0.1, "inverse temperature of the implicit reward", checks.positive())

The config's `objective` section for a head is built from these fields (`section`), and resolved back with every
value checked (`resolve`): a key the head does not read, or a value outside its range, is a one-line error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from fmjax import checks
from fmjax.errors import UserError

field = checks.option  # a field with its one-line doc and optional range rule


@dataclasses.dataclass(frozen=True)
class Options:
  """A head with no options. Subclasses add fields made with `field`."""

  @classmethod
  def docs(cls) -> dict[str, tuple[Any, str]]:
    """Key -> (default, one-line doc)."""
    return checks.docs(cls)

  @classmethod
  def resolve(cls, head: str, values: Mapping[str, Any]) -> "Options":
    """The options of head `head` from `values` (the objective section less `name`): a key it does not read is an
    error naming its keys; missing keys take their defaults; every value is checked against its rule."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
      keys = ", ".join(sorted(known)) or "none"
      raise UserError(f"objective.{unknown[0]} is not an option of the head {head!r} (its options: {keys}); remove "
                      "it, or choose the head that reads it with objective.name.")
    for name, value in values.items():
      rule = known[name].metadata.get("rule")
      if rule is not None:
        rule.check(f"objective.{name}", value)
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class HeadType:
  """A registered head: its options class and `make(options) -> Head`."""
  options: type[Options]
  make: Callable[[Any], Any]
