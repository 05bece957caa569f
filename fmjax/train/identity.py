"""A run's identity: what makes its checkpoints mean something, recorded in WORKDIR/identity.json at its first start.

The architecture, the tokenizer (its fingerprint), the head and its options, the parameterisation, the data, and
where its starting and frozen weights come from — each frozen model pinned to the exact step first read, so that a
run trained on meanwhile never changes a frozen model under a resumed run. A start whose identity differs is refused
before anything is written, with what changed and the ways out. Settings that do not change what is trained (the
optimizer, train.steps, logging, checkpoint periods, the mesh, kernels, data workers) may change on a resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from fmjax import checks
from fmjax import spec as spec_lib
from fmjax.errors import UserError
from fmjax.model.config import ModelConfig
from fmjax.spec import Spec, replace
from fmjax.train import init_from

FILE = "identity.json"
# Keys that change how a run computes or reads, not what it trains.
_MODEL_FREE = {"name", "remat", "attention_impl", "context_load_balance", "loss_chunk", "dtype", "matmul", "moe_matmul",
               "moe_aux_loss", "moe_z_loss"}
_DATA_FREE = {"workers", "tfds_data_dir", "tokenizer_path"}
_OBJECTIVE_FREE = {"reward_timeout"}


def source(spec: Spec, workdir: str) -> str:
  """The run `init_from` reads (WORKDIR/base for a bootstrap), or ''."""
  init = spec.init_from
  return init.workdir or (os.path.join(workdir, init_from.BOOTSTRAPPED) if init.bootstrap else "")


def pin(spec: Spec, workdir: str, stored: dict | None) -> Spec:
  """`spec` with `init_from.step` and each frozen run's step fixed: to the step this run first read (`stored`), or,
  at the first start, to the newest step there now. Call after the bootstraps (their runs exist by then)."""
  pins = (stored or {}).get("pins", {})

  def pinned(key: str, step_key: str, run_dir: str) -> int:
    if pins.get(key) == os.path.abspath(run_dir) and step_key in pins:
      return pins[step_key]
    setting = "init_from" if key == "init_from.workdir" else key  # how checkpoint_dir's errors name it
    return int(os.path.basename(init_from.checkpoint_dir(run_dir, -1, setting)))

  src = source(spec, workdir)
  if src and spec.init_from.step == -1:
    spec = replace(spec, **{"init_from.step": pinned("init_from.workdir", "init_from.step", src)})
  for run in spec.frozen_runs:
    if run.workdir and run.step == -1:
      key = f"objective.{run.key}"
      spec = spec.with_frozen(run.role, step=pinned(key, f"{key}_step", run.workdir))
  return spec


def of(spec: Spec, workdir: str, tokenizer_id: str | None) -> dict:
  """The identity of the (pinned) `spec`; with no `tokenizer_id` (before the tokenizer is built and the bootstraps
  ran), its settings alone: no tokenizer, no pins."""
  r = spec.record
  out = {"model": {k: v for k, v in dataclasses.asdict(spec.model).items() if k not in _MODEL_FREE},
         "tokenizer": tokenizer_id,
         "data": {k: v for k, v in r["data"].items() if k not in _DATA_FREE},
         "objective": {k: v for k, v in r["objective"].items()
                       if k not in _OBJECTIVE_FREE and k not in {f'{run.key}{suffix}' for run in spec.frozen_runs
                                                                          for suffix in ('', '_step', '_bootstrap')}},
         "adapter": {"name": spec.adapter.section, **r[spec.adapter.section]} if spec.adapter is not None else None,
         "quant": _quant(r["quant"]),
         "pins": {}}
  if tokenizer_id is None:
    del out["tokenizer"], out["pins"]
    return json.loads(json.dumps(out))
  src = source(spec, workdir)
  if src:
    out["pins"].update({"init_from.workdir": os.path.abspath(src), "init_from.step": spec.init_from.step})
  for run in spec.frozen_runs:
    key = f"objective.{run.key}"
    out["pins"].update({key: os.path.abspath(run.workdir), f"{key}_step": run.step})
  return json.loads(json.dumps(out))  # as read back from the file: lists, not tuples


def _quant(values: dict) -> dict:
  """How the frozen weights are stored: the format's settings only where something is quantized."""
  on = values["base"] != "none" or values["frozen"] != "none"
  return {k: v for k, v in values.items() if on or k in ("base", "frozen")}


def read(workdir: str) -> dict | None:
  path = os.path.join(workdir, FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}); it records what this run trains. Restore it "
                    "from a backup, or delete it to accept this start's settings as the run's.") from None


def write(workdir: str, identity: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, FILE + ".tmp")
  try:
    with open(tmp, "w") as f:
      json.dump(identity, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, FILE))
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise UserError(f"could not write {os.path.join(workdir, FILE)} ({e.strerror}); free space (or make it "
                    "writable) or use another --workdir, and run the same command again.") from e


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _key(name: str) -> str:
  """The config key a difference is about."""
  section, _, rest = name.partition(".")
  return rest if section in ("pins", "adapter") else name


_UNSET = object()


def _default(key: str) -> Any:
  """The default of a model, data or quant key, as identity.json holds it; _UNSET for others. A key that a later
  version of fmjax adds is absent from an older run's record: at its default it changes nothing that run trained."""
  section, _, name = key.partition(".")
  classes = {"model": ModelConfig, "data": spec_lib.Data, "quant": spec_lib.Quant}
  keys = checks.docs(classes[section]) if section in classes else {}
  return json.loads(json.dumps(keys[name][0])) if name in keys else _UNSET


def check(workdir: str, stored: dict, current: dict) -> None:
  """Exits with one line naming what changed since the run's first start, and the ways out. A `current` without
  tokenizer and pins (`of` before the build) is compared on what it has; a key only one side records counts as its
  default there."""
  old, new = _flat(stored), _flat(current)
  if "tokenizer" not in current:
    old = {k: v for k, v in old.items() if k in new or not k.startswith(("tokenizer", "pins."))}
  shown = lambda d, k: repr(d[k]) if k in d else "(unset)"  # noqa: E731
  value = lambda d, k: d[k] if k in d else _default(k)  # noqa: E731
  changed = [f"{_key(k)}: {shown(old, k)} -> {shown(new, k)}"
             for k in sorted(set(old) | set(new)) if value(old, k) != value(new, k)]
  if not changed:
    return
  shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
  raise UserError(f"--workdir={workdir} holds another run: {shown} (its {FILE} records what it trains). Resume it "
                  "with its own settings; or start a new --workdir (with --config.init_from.workdir="
                  f"{workdir} to start from its params); or, to start this one over, delete {workdir}. Nothing "
                  "was changed.")
