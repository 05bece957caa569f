"""Prints the table of every config key, from the declarations that own them, as docs/config-keys.md holds it:

  python tools/config_keys.py > docs/config-keys.md

The run-level sections are fmjax/spec.py's dataclasses, `objective` is each registered head's options
(fmjax/objectives/), and each parameterisation's section its dataclass (fmjax/adapters/). A key's one-line doc lives
beside its field; tests/test_docs.py checks that the page is current.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fmjax import adapters, checks, objectives, spec, startup  # noqa: E402
from fmjax.model import config as model_config  # noqa: E402

LONG = 60  # characters of a default shown in full


def _value(v) -> str:
  text = repr(v)
  return f"`{text}`" if len(text) <= LONG else "(see the source)"


def _table(docs: dict) -> list[str]:
  rows = ["| key | default | what it does |", "|---|---|---|"]
  bar = "\\|"  # a literal | inside a table cell
  rows += [f"| `{k}` | {_value(default)} | {doc.replace('|', bar)} |" for k, (default, doc) in docs.items()]
  return rows


def page() -> str:
  out = ["# Config keys", "",
         "Every key a config may set, with its default and what it does, generated from the declarations that own "
         "it: `python tools/config_keys.py > docs/config-keys.md`. A key no section declares is an error; the "
         "`objective` section holds the chosen head's options only (set the head with `config_lib.use_head` in a "
         "config file, or a config's `head=` variant), and a key the head does not read is refused naming its keys.",
         "", "## Run-level sections (`fmjax/spec.py`)"]
  for name, cls in spec.SECTIONS.items():
    out += ["", f"### `{name}`", "", *_table(checks.docs(cls))]
  fields = ", ".join(f"`{f.name}`" for f in dataclasses.fields(model_config.ModelConfig))
  out += ["", "## `model` (`fmjax/model/config.py`)", "",
          f"`name` is a preset ({', '.join(f'`{p}`' for p in model_config.PRESETS)}); any field of `ModelConfig` "
          f"set beside it overrides the preset: {fields}.",
          "", "## `objective`: the head and its options (`fmjax/objectives/`)"]
  for name, head in objectives.REGISTRY.items():
    docs = head.options.docs()
    out += ["", f"### `{name}`", ""] + (_table(docs) if docs else ["No options."])
  out += ["", "## Parameterisations (`fmjax/adapters/`): each its own section, off until switched on"]
  for name, cls in adapters.registered().items():
    docs = {k: (cls.section_defaults()[k], doc) for k, (_, doc) in checks.docs(cls).items()}
    out += ["", f"### `{name}` ({cls.title}; on: {cls.off_hint.replace('=0', ' > 0')})", "", *_table(docs)]
  return "\n".join(out) + "\n"


def main() -> None:
  sys.stdout.write(page())


if __name__ == "__main__":
  startup.run(main)
