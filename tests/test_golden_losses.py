"""The first 5 training losses of every configs/*.py `smoke` variant against golden values.

The goldens (tests/golden/smoke_losses.json) were recorded by this test itself (FMJAX_RECORD_GOLDEN=1) on the commit
named in the file, before the run-spec redesign, on the machine it names; they guard that the redesign changes no
number. On that machine the losses are bitwise equal; elsewhere (another CPU's kernels) they agree to 1e-6 relative.
Update them only for an intended change of the numbers, with its reason in the commit.

Every smoke variant runs as a user runs it (its own config, bootstraps included), stopped after 5 steps
(train.stop_after, which leaves the schedule unchanged). The pre-training smoke run is the bootstrap of the others:
its finished run directory is copied to where each config bootstraps its base (or teacher), so that bootstrap finds it
done instead of training it again.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess

import jax
import pytest

from fmjax import config_lib
from fmjax.train import loop

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "smoke_losses.json")
RECORD = os.environ.get("FMJAX_RECORD_GOLDEN", "") not in ("", "0")
STEPS = 5
# config -> where its pre-training bootstrap lives under its workdir ("" = none)
CONFIGS = {
    "cpt": "base", "sft": "base", "lora": "base", "reft": "base", "dpo": "base", "reward": "base",
    "classify": "base", "distill": "teacher", "grpo": "base/base",  # grpo: pre-train -> SFT on sort -> RL
    "ppo": "base/base", "online_dpo": "base/base",  # recorded when they were added, on the machine named
}


def _losses(workdir: str) -> list[float]:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["loss"] for r in rows if "loss" in r][:STEPS]


def _record(name: str, losses: list[float]) -> None:
  os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
  with open(GOLDEN + ".lock", "w") as lock:  # pytest-xdist workers record side by side
    fcntl.flock(lock, fcntl.LOCK_EX)
    _update(name, losses)


def _update(name: str, losses: list[float]) -> None:
  data = json.load(open(GOLDEN)) if os.path.isfile(GOLDEN) else {}
  if not data.get("provenance"):
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__)).stdout.strip()
    data["provenance"] = {"commit": commit, "jax": jax.__version__, "cpu": platform.processor() or platform.machine(),
                          "devices": jax.device_count(), "how": "FMJAX_RECORD_GOLDEN=1 pytest "
                          "tests/test_golden_losses.py"}
  data.setdefault("losses", {})[name] = losses
  with open(GOLDEN, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)


def _check(name: str, losses: list[float]) -> None:
  if RECORD:
    _record(name, losses)
    return
  want = json.load(open(GOLDEN))["losses"][name]
  assert len(losses) == STEPS
  for step, (got, ref) in enumerate(zip(losses, want), 1):
    assert abs(got - ref) <= 1e-6 * abs(ref), f"{name} step {step}: loss {got!r}, golden {ref!r}"


def _smoke(repo: str, name: str):
  c = config_lib.load(f"{repo}/configs/{name}.py:smoke")
  c.checkpoint.async_save = False
  return c


@pytest.fixture(scope="module")
def pretrained(repo, tmp_path_factory):
  """The pre-training smoke run, whole: its losses, and the directory the others bootstrap from."""
  workdir = str(tmp_path_factory.mktemp("golden") / "pretrain")
  loop.train(_smoke(repo, "pretrain"), workdir)
  return workdir


@pytest.mark.slow
def test_pretrain_smoke_losses_match_the_goldens(pretrained):
  _check("pretrain", _losses(pretrained))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_smoke_losses_match_the_goldens(repo, pretrained, tmp_path, name):
  workdir = tmp_path / name
  shutil.copytree(pretrained, workdir / CONFIGS[name])
  c = _smoke(repo, name)
  c.train.stop_after = STEPS
  loop.train(c, str(workdir))
  _check(name, _losses(str(workdir)))
