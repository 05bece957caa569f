"""Checksums of a checkpoint's files: a sha256 manifest written into a step directory once orbax has committed it.

orbax checksums only the index of its array files (zarr3's crc32c index codec), not the data itself, so a flipped bit
in a parameter restores silently. `seal` hashes every file of a committed step into `CHECKSUMS` there; `verify`
re-hashes them before anything is read. A step without a manifest (saved by an older fmjax, or killed between
orbax's commit and the manifest) is restored unverified.
"""

from __future__ import annotations

import hashlib
import json
import os

CHECKSUMS = "fmjax_checksums.json"
_CHUNK = 1 << 22


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):  # hashlib releases the GIL on large chunks: training runs on meanwhile
      h.update(chunk)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
  return sorted(p for p in out if p != CHECKSUMS)


def seal(step_dir: str) -> None:
  """Writes the manifest of `step_dir` (atomically: a manifest is whole or absent)."""
  manifest = {"algorithm": "sha256", "files": {p: _sha256(os.path.join(step_dir, p)) for p in _files(step_dir)}}
  tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def sealed(step_dir: str) -> bool:
  return os.path.isfile(os.path.join(step_dir, CHECKSUMS))


def verify(step_dir: str) -> str | None:
  """None if every file of `step_dir`'s manifest is there with its checksum (or there is no manifest: see
  `sealed`); else what is wrong, naming the first bad file."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its checksum manifest {CHECKSUMS} is unreadable ({type(e).__name__})"
  for rel, digest in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f"{rel} is missing"
    if _sha256(full) != digest:
      return f"{rel} does not match its checksum"
  return None
