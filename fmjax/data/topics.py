"""`embedded:topics`, a zero-download text-classification corpus: which standard-library package a function's
docstring comes from.

Each public function or method with a docstring (the `api` entries of `fmjax.data.embedded`) that the instruction
corpus keeps (`instruct.keep`) and whose top-level package is one of `LABELS` (the eight packages with the most such
entries) makes one record {"text": the docstring's first paragraph, "label": the package's index in LABELS},
keyed `topics:QUALNAME` and ordered by key. The held-out split is `embedded:instruct`'s (by module, consistent with
`embedded:prose`), so held-out docstrings come from modules a model pre-trained on prose's train split never saw.
The majority class (tkinter) is about 30% of the records: the accuracy to beat.
"""

from __future__ import annotations

from fmjax.data import embedded, instruct
from fmjax.errors import UserError

LABELS = ("tkinter", "idlelib", "asyncio", "distutils", "email", "importlib", "xml", "logging")


def load_records(split: str = "train") -> list[tuple[str, dict]]:
  """(key, {"text", "label"}) of the records on side `split` (`train`, `validation`, `all`), in key order."""
  if split not in embedded.SPLITS:
    raise UserError(f"split {split!r} is not one of {embedded.SPLITS}.")
  entries = embedded.api_entries()
  side = instruct.sides(entries)
  out = []
  for name in sorted(entries):
    entry, package = entries[name], entries[name]["module"].split(".")[0]
    if package in LABELS and instruct.keep(entry) and name in side and split in ("all", side[name]):
      out.append((f"topics:{name}", {"text": instruct.first_paragraph(entry["doc"]),
                                      "label": LABELS.index(package)}))
  return out
