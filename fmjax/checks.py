"""Small value checks that every layer may use: a range rule for one config value, and common predicates."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable

from fmjax.errors import UserError


def option(default: Any, doc: str, rule: "Rule | None" = None) -> Any:
  """A dataclass field that is a config key: its default, its one-line doc and an optional range rule."""
  metadata = {"doc": doc, "rule": rule}
  if isinstance(default, dict):  # a fresh dict per instance
    return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def docs(cls: type) -> dict[str, tuple[Any, str]]:
  """Key -> (default, one-line doc) of a dataclass of config keys."""
  return {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default, f.metadata.get("doc", ""))
          for f in dataclasses.fields(cls)}


def is_regex(v: str) -> bool:
  try:
    re.compile(v)
    return True
  except (re.error, TypeError):
    return False


def json_object(path: str, what: str = "an object") -> dict:
  """The JSON object in file `path`, or an error naming the file: not JSON (a damaged or truncated download), or not
  an object (`what`: what it should hold, for the message)."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    value = json.loads(raw)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise UserError(f"{path} is not valid JSON ({str(e).splitlines()[0]}; {len(raw)} bytes): the file is damaged or "
                    "truncated; download it again (or fix it).") from None
  if not isinstance(value, dict):
    raise UserError(f"{path} holds a JSON {type(value).__name__}, not {what}; download it again.")
  return value


def shown(value: Any) -> str:
  return repr(value) if isinstance(value, str) else str(value)


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a config value must be: `ok(value)`, and `what` for the message when it is not."""
  ok: Callable[[Any], bool]
  what: str

  def check(self, key: str, value: Any) -> None:
    try:
      good = bool(self.ok(value))
    except TypeError:  # e.g. a string where a number belongs (in a config file; flags are typed)
      good = False
    if not good:
      raise UserError(f"{key}={shown(value)} must be {self.what}.")


def positive(what: str = "") -> Rule:
  return Rule(lambda v: v > 0, "> 0" + (f" ({what})" if what else ""))


def non_negative(what: str = "") -> Rule:
  return Rule(lambda v: v >= 0, ">= 0" + (f" ({what})" if what else ""))


def in_range(lo: float, hi: float, closed: str = "[]", what: str = "") -> Rule:
  """lo..hi with `closed` telling which ends count: '[]', '[)', '(]' or '()'."""
  left = (lambda v: v >= lo) if closed[0] == "[" else (lambda v: v > lo)
  right = (lambda v: v <= hi) if closed[1] == "]" else (lambda v: v < hi)
  return Rule(lambda v: left(v) and right(v), f"in {closed[0]}{lo:g}, {hi:g}{closed[1]}" + (f" ({what})" if what
                                                                                            else ""))


def one_of(choices) -> Rule:
  return Rule(lambda v: v in choices, f"one of {tuple(choices)}")


STEP = Rule(lambda v: v >= -1, ">= -1 (-1 = the newest checkpoint)")
REGEX = Rule(is_regex, "a valid regular expression")
