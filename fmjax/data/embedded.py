"""Zero-download corpora built from the Python installation itself."""

from __future__ import annotations


def prose_documents() -> list[str]:
  """The pydoc topic pages (~0.47 MB of English), one document per topic, in a fixed order."""
  from pydoc_data import topics  # ships with every CPython

  return [topics.topics[k] for k in sorted(topics.topics)]


CORPORA = {"prose": prose_documents}


def load(name: str) -> list[str]:
  """Documents of embedded corpus `name`."""
  if name not in CORPORA:
    raise ValueError(f"data.source='embedded:{name}' is unknown; embedded corpora: {sorted(CORPORA)}.")
  return CORPORA[name]()
