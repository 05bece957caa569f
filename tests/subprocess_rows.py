"""Shared by the table-driven subprocess tests (test_errors.py, test_bad_inputs.py): each row's scratch directory,
and the selected rows run concurrently when not under xdist (whose workers each run their own rows)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
from typing import Any, Callable


def scratch(root: str, row_id: str) -> str:
  """`root`/`row_id`, made."""
  path = os.path.join(root, row_id)
  os.makedirs(path, exist_ok=True)
  return path


def prefetch(request: Any, row_type: type, execute: Callable[[Any], subprocess.CompletedProcess]) -> dict:
  """Row id -> result of `execute(row)` for the rows of `row_type` the session selected from the requesting module;
  empty under xdist."""
  if os.environ.get("PYTEST_XDIST_WORKER"):
    return {}
  params = [getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items
            if item.module is request.module]
  selected = [p["row"] for p in params if isinstance(p.get("row"), row_type)]
  with concurrent.futures.ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 1))) as pool:
    return dict(zip((r.id for r in selected), pool.map(execute, selected)))
