"""Zero-download corpora built from the Python installation itself, with a document-level held-out split."""

from __future__ import annotations

import hashlib
import math

SPLITS = ("train", "validation", "all")
VALIDATION_FRACTION = 0.1


def prose_documents() -> dict[str, str]:
  """The pydoc topic pages (~0.47 MB of English), keyed by topic name."""
  from pydoc_data import topics  # ships with every CPython

  return dict(topics.topics)


CORPORA = {"prose": prose_documents}


def load(name: str, split: str = "train") -> list[str]:
  """Documents of embedded corpus `name`.

  `validation` holds the first 10% (rounded up) of documents ordered by the SHA-256 of their key; `train` the rest.
  Whole documents go to one side, so no text leaks between the splits.
  """
  if name not in CORPORA:
    raise ValueError(f"data source 'embedded:{name}' is unknown; embedded corpora: {sorted(CORPORA)}.")
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}.")
  docs = CORPORA[name]()
  keys = sorted(docs, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
  n_val = math.ceil(len(keys) * VALIDATION_FRACTION)
  chosen = {"train": keys[n_val:], "validation": keys[:n_val], "all": keys}[split]
  return [docs[k] for k in sorted(chosen)]
