"""A private install of an old TRL (1.12.0, the last with a PPOTrainer) under the repo's `.peers/`, for tests that
run its code in a subprocess with PYTHONPATH set to it (the installed, newer TRL stays what the test process
imports)."""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(directory: str) -> str | None:
  """The version of the trl installed in `directory` (its dist-info: trl/__init__.py reads it from there), or None."""
  if not os.path.isfile(os.path.join(directory, "trl", "__init__.py")):
    return None
  for meta in glob.glob(os.path.join(directory, "trl-*.dist-info", "METADATA")):
    with open(meta) as f:
      found = re.search(r"^Version: (\S+)$", f.read(), re.M)
    if found:
      return found.group(1)
  return None


def trl_dir(version: str = "1.12.0") -> str:
  """The directory holding trl==`version` (no dependencies: the environment's torch, transformers and accelerate
  serve it), installed by pip on first use. A file lock keeps two pytest-xdist workers from installing at once."""
  target = os.path.join(REPO, ".peers", f"trl-{version}")
  if _version(target) == version:
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with open(target + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if _version(target) != version:  # the worker that held the lock may have installed it meanwhile
      shutil.rmtree(target, ignore_errors=True)
      proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                             "--target", target, f"trl=={version}"], capture_output=True, text=True, timeout=600)
      if proc.returncode or _version(target) != version:
        shutil.rmtree(target, ignore_errors=True)
        raise RuntimeError(f"pip could not install trl=={version} into {target} (network?):\n{proc.stderr[-2000:]}")
  return target
