"""The on-disk cache of built artefacts (tokenizers, corpora): $FMJAX_CACHE, default ~/.cache/fmjax."""

from __future__ import annotations

import os
import tempfile


def cache_root() -> str:
  """$FMJAX_CACHE, or ~/.cache/fmjax when it is unset or empty (not created here)."""
  return os.environ.get("FMJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fmjax")


def cache_dir(sub: str) -> str:
  """The cache subdirectory `sub` (e.g. `tokenizers`), created if missing."""
  path = os.path.join(cache_root(), sub)
  os.makedirs(path, exist_ok=True)
  return path


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same directory, so concurrent writers and readers
  never see a half-written file; the result is world-readable like any cache entry."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes the file private
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
