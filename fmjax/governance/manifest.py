"""manifest.json: the governance record every curate / prepare output carries.

A manifest says what went in (each input's URI, sha256, record count and license), what was done (the tool, its
rules and thresholds), what came out (counts removed per rule, PII found per type: counts only, never values; the
output files with their sha256), with which software and when. `parents` are the manifests of inputs that were
themselves outputs of curate / prepare (found as `manifest.json` beside them), by sha256, so a chain raw corpus ->
curated -> prepared -> training run can be followed back. A manifest is identified by the sha256 of its bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
from typing import Any

from fmjax import version
from fmjax.errors import UserError

NAME = "manifest.json"
VERSION = 1
UNKNOWN = "unknown"


def tool_versions(*modules: str) -> dict[str, str]:
  """Versions of python, fmjax and the named top-level packages that are importable."""
  out = {"python": platform.python_version(), "fmjax": version.__version__}
  for name in modules:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def now() -> str:
  """UTC time, ISO 8601 to the second."""
  return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def dumps(manifest: dict) -> bytes:
  """The bytes a manifest is written as (and hashed over)."""
  return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def parent_of(path: str) -> dict[str, str] | None:
  """{"path", "sha256", "tool"} of the manifest in an input's directory (or of a directory), if there is one."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  candidate = os.path.join(folder, NAME)
  if "://" in path or not os.path.isfile(candidate):
    return None
  with open(candidate, "rb") as f:
    raw = f.read()
  try:
    tool = json.loads(raw).get("tool", "")
  except json.JSONDecodeError:
    tool = "not a manifest"
  return {"path": os.path.abspath(candidate), "sha256": sha256_bytes(raw), "tool": tool}


def parents(paths: list[str]) -> list[dict[str, str]]:
  """The distinct `parent_of` records of a list of inputs."""
  seen: dict[str, dict[str, str]] = {}
  for path in paths:
    p = parent_of(path)
    if p is not None:
      seen.setdefault(p["sha256"], p)
  return list(seen.values())


def build(tool: str, inputs: list[dict[str, Any]], rules: dict[str, Any], outputs: list[dict[str, Any]],
          counts: dict[str, Any], parents_: list[dict[str, str]], created: str, versions: dict[str, str]) -> dict:
  """A manifest: `inputs` carry uri, sha256, bytes, records, license; `counts` are the tool's removed / found."""
  licenses: dict[str, int] = {}
  for item in inputs:
    licenses[item["license"]] = licenses.get(item["license"], 0) + 1
  unknown = [i["uri"] for i in inputs if i["license"] == UNKNOWN]
  return {"version": VERSION, "tool": tool, "created": created, "versions": versions, "inputs": inputs,
          "licenses": dict(sorted(licenses.items())), "unknown_license_inputs": len(unknown), "rules": rules,
          "counts": counts, "outputs": outputs, "parents": parents_}


def unknown_warning(manifest: dict) -> str | None:
  """The loud line for inputs without a license, or None."""
  n = manifest["unknown_license_inputs"]
  if not n:
    return None
  first = next(i["uri"] for i in manifest["inputs"] if i["license"] == UNKNOWN)
  return (f"WARNING: {n} of {len(manifest['inputs'])} input(s) have license 'unknown' (e.g. {first}); confirm the "
          "rights to use them and pass --license=ID or --license_map=FILE.json ({glob: license}).")


def read(path: str) -> tuple[dict, str]:
  """(manifest, sha256) of a manifest file, or of `DIR/manifest.json`."""
  if os.path.isdir(path):
    path = os.path.join(path, NAME)
  with open(path, "rb") as f:
    raw = f.read()
  return json.loads(raw), sha256_bytes(raw)


def load_license_map(path: str) -> dict[str, str]:
  """{glob: license id} from a JSON file, or an error naming the file and the form."""

  if not path:
    return {}
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"--license_map={path!r} could not be read ({e}); give a JSON file "
                    '{"glob": "license id"}, e.g. {"data/wiki/*": "CC-BY-SA-4.0"}.') from e
  if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()):
    raise UserError(f"--license_map={path!r} must map globs to license ids, e.g. {{\"data/wiki/*\": "
                    "\"CC-BY-SA-4.0\"}.")
  return data
