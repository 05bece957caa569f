"""A run never silently continues something else: resumes, damaged checkpoints, changed settings, signals, locks.

Each case is a subprocess smoke run on one CPU device under a timeout, started on a copy of one run directory (the
pre-training smoke config stopped at step 20 of 30, checkpoints at 10 and 20). Outcomes: an exact resume (losses
equal a straight 30-step run's from the resumed step on), a fallback with one warning, or exit 2 with one line and
no traceback. In every case no checkpoint, tokenizer or metrics row is renamed, overwritten or deleted unless the
outcome says so (a damaged step is renamed `<step>.corrupt.<time>`), and metrics.jsonl never holds a step twice.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**{k: v for k, v in os.environ.items() if k != "FMJAX_DEBUG"},
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
PRETRAIN = ("--config=configs/pretrain.py:smoke", "--config.train.steps=30", "--config.checkpoint.every_steps=10",
            "--config.log.every_steps=1", "--config.eval.every_steps=0")
TIMEOUT = 300
pytestmark = pytest.mark.slow  # end-to-end runs: the fast subset (-m "not slow") skips them


def main(workdir: str, *args: str, config: tuple[str, ...] = PRETRAIN, timeout: int = TIMEOUT,
         tool: str = "") -> subprocess.CompletedProcess:
  cmd = [sys.executable, os.path.join(REPO, "tools", f"{tool}.py")] if tool else \
      [sys.executable, "-m", "fmjax.main", *config, f"--workdir={workdir}"]
  return subprocess.run([*cmd, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def start(workdir: str, *args: str, config: tuple[str, ...] = PRETRAIN) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "fmjax.main", *config, f"--workdir={workdir}", *args], cwd=REPO,
                          env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(workdir: str) -> dict[int, float]:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"metrics.jsonl holds a step twice: {sorted(steps)}"
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def snapshot(workdir: str) -> dict[str, str]:
  """sha256 of every file a case must not touch: checkpoints, tokenizer, identity, metrics."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)):
    rel = os.path.relpath(path, workdir)
    if os.path.isfile(path) and not rel.startswith(("tensorboard", "base" + os.sep + "tensorboard")) and \
        rel not in ("lineage.json", ".lock") and not rel.endswith(".lock"):
      out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("fmjax: error: "), proc.stderr[-3000:]
  for name in names:
    assert name in last, (name, last)
  return last


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, seconds: float = 240) -> None:
  deadline = time.monotonic() + seconds
  while not predicate():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.2)


def logged_steps(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  return sum(1 for _ in open(path)) if os.path.isfile(path) else 0


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  proc = main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return losses(workdir)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> str:
  """The run directory every case copies: stopped after step 20 of 30, checkpoints 10 and 20."""
  workdir = str(tmp_path_factory.mktemp("stopped") / "run")
  proc = main(workdir, "--config.train.stop_after=20")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  return workdir


@pytest.fixture
def run(stopped, tmp_path) -> str:
  target = str(tmp_path / "run")
  shutil.copytree(stopped, target)
  return target


def flip_bit(path: str) -> None:
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))


def garbage(path: str) -> None:
  data = bytearray(open(path, "rb").read())
  data[len(data) // 3: len(data) // 3 + 8] = b"\xde\xad\xbe\xef" * 2
  open(path, "wb").write(bytes(data))


def truncate(path: str) -> None:
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def largest_array_file(step_dir: str) -> str:
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  args: tuple[str, ...] = ()  # after the pre-training smoke flags
  damage: Callable[[str], None] | None = None  # applied to a file of a step before the start
  steps: tuple[int, ...] = ()  # the steps `damage` hits
  expect: str = "exit2"  # exit2 | resume | fallback
  names: tuple[str, ...] = ()  # what the one line (exit2) must name
  resumed: int = 20  # the step a resume or fallback continues from
  config: tuple[str, ...] = PRETRAIN


CASES = [
    Case("same_command_resumes", expect="resume"),
    Case("changed_model", ("--config.model.d_model=96",), names=("model.d_model: 64 -> 96", "a new --workdir")),
    Case("another_stage", config=("--config=configs/sft.py:smoke",), names=("holds another run", "data.source")),
    Case("changed_tokenizer_source", ("--config.data.tokenizer_source=embedded:instruct",),
         names=("data.tokenizer_source", "tokenizer")),
    Case("steps_below_newest", ("--config.train.steps=15",), names=("train.steps=15", "step 20")),
    Case("bit_flip", damage=flip_bit, steps=(20,), expect="fallback", resumed=10),
    Case("garbage_bytes", damage=garbage, steps=(20,), expect="fallback", resumed=10),
    Case("every_step_damaged", damage=flip_bit, steps=(10, 20), names=("every checkpoint", "damaged", "mv ")),
    Case("lr_inf", ("--config.optimizer.lr=inf",), names=("optimizer.lr=inf", "finite")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, run: str, straight: dict[int, float]):
  for step in case.steps:
    case.damage(largest_array_file(os.path.join(run, "checkpoints", str(step))))
  before = snapshot(run)
  proc = main(run, *case.args, config=case.config)
  if case.expect == "exit2":
    one_line_error(proc, *case.names)
    assert snapshot(run) == before  # nothing renamed, overwritten or deleted
    return
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resuming from step {case.resumed} " in proc.stderr
  warnings = [line for line in proc.stderr.splitlines() if "failed verification" in line]
  assert len(warnings) == (case.expect == "fallback"), warnings
  got = losses(run)
  assert {s: got[s] for s in range(case.resumed + 1, 31)} == {s: straight[s] for s in range(case.resumed + 1, 31)}
  names = sorted(os.listdir(os.path.join(run, "checkpoints")))
  for step in case.steps:
    assert any(n.startswith(f"{step}.corrupt.") for n in names), names
  kept = {k: v for k, v in before.items() if not any(k.startswith(f"checkpoints/{s}/") for s in case.steps)}
  assert all(snapshot(run).get(k) == v for k, v in kept.items() if k.startswith("checkpoints/10/"))


def test_damaged_init_from_teacher_and_tool_read_are_one_line(run, tmp_path):
  """init_from, a teacher and tools/evaluate.py read a damaged or incomplete checkpoint: one line naming it."""
  truncate(largest_array_file(os.path.join(run, "checkpoints", "20")))
  new = str(tmp_path / "new")  # a refused start writes no run files
  one_line_error(main(new, f"--config.init_from.workdir={run}"), "init_from", "checkpoints/20", "damaged",
                 "init_from.step=N")
  assert not os.path.exists(os.path.join(new, "identity.json")) and not os.listdir(os.path.join(new, "checkpoints"))
  one_line_error(main(new, config=("--config=configs/distill.py:smoke", f"--config.objective.teacher={run}")),
                 "objective.teacher", "damaged", "objective.teacher_step=N")
  one_line_error(main("", "perplexity", f"--model={run}", "--data=embedded:prose", tool="evaluate"), "damaged")
  shutil.rmtree(os.path.join(run, "checkpoints", "20", "state"))
  one_line_error(main(new, f"--config.init_from.workdir={run}"), "has no state/", "init_from.step=N")
  assert not os.path.exists(os.path.join(new, "config.json"))


def test_frozen_base_stays_pinned_when_its_run_trains_on(stopped, tmp_path):
  """A LoRA run over `base` at step 20: `base` trains on to 30 in between, and the resumed LoRA run still reads
  step 20 — its losses equal a straight LoRA run's."""
  base = str(tmp_path / "base")
  shutil.copytree(stopped, base)
  lora = ("--config=configs/lora.py:smoke", f"--config.init_from.workdir={base}", "--config.train.steps=8",
          "--config.log.every_steps=1", "--config.eval.every_steps=0", "--config.checkpoint.every_steps=4")
  straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
  assert main(straight_dir, config=lora).returncode == 0
  assert main(resumed_dir, "--config.train.stop_after=4", config=lora).returncode == 0
  assert main(base).returncode == 0  # the base run trains on: its newest step is 30 now
  assert "30" in os.listdir(os.path.join(base, "checkpoints"))
  proc = main(resumed_dir, config=lora)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoints/20/state" in proc.stderr and "checkpoints/30" not in proc.stderr
  assert losses(resumed_dir) == losses(straight_dir)
  pins = json.load(open(os.path.join(resumed_dir, "identity.json")))["pins"]
  assert pins["init_from.step"] == 20 and pins["init_from.workdir"] == base


def test_divergence_in_the_first_steps_stops_the_run(tmp_path):
  proc = main(str(tmp_path / "run"), "--config.optimizer.lr=3", "--config.optimizer.warmup_steps=0")
  last = one_line_error(proc, "diverges", "optimizer.lr")
  assert int(last.split("step ")[1].split(":")[0]) <= 8, last  # judged from the first loss, not after a window


def test_nonfinite_steps_in_a_row_stop_a_skipping_run(tmp_path):
  run = str(tmp_path / "run")
  proc = main(run, "--config.optimizer.lr=1e30", "--config.train.skip_nonfinite=True",
              "--config.train.spike_factor=0")
  one_line_error(proc, "not finite", "train.spike_skips=3")
  assert not os.path.isdir(os.path.join(run, "checkpoints")) or not os.listdir(os.path.join(run, "checkpoints"))


def test_second_run_on_a_workdir_is_refused_and_a_killed_ones_lock_is_not_stale(tmp_path):
  run = str(tmp_path / "run")
  first = start(run, "--config.train.steps=100000", "--config.checkpoint.every_steps=100000")
  try:
    wait_for(lambda: logged_steps(run) >= 2, first)
    one_line_error(main(run), "in use by another run", f"pid {first.pid}")
  finally:
    first.kill()
    first.wait()
  rows = logged_steps(run)
  assert rows >= 2
  proc = main(run, "--config.train.stop_after=3")  # the lock died with its holder; nothing was saved: a fresh start
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"dropped the {rows} metrics rows" in proc.stderr
  assert sorted(losses(run)) == [1, 2, 3]


def test_sigint_saves_and_resumes(tmp_path, straight):
  run = str(tmp_path / "run")
  proc = start(run, "--config.checkpoint.every_steps=1000")
  wait_for(lambda: logged_steps(run) >= 3, proc)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  saved = int(err.split("saved step ")[1].split()[0])
  assert "stopped (SIGINT)" in err and os.listdir(os.path.join(run, "checkpoints")) == [str(saved)]
  assert main(run).returncode == 0
  assert losses(run) == straight


def test_sigterm_during_a_bootstrap_stops_before_the_stage_trains(tmp_path):
  """The base a stage pre-trains first is finished by the next start, before the stage trains on it."""
  run = str(tmp_path / "sft")
  sft = ("--config=configs/sft.py:smoke",)
  proc = start(run, config=sft)
  base = os.path.join(run, "base")
  wait_for(lambda: logged_steps(base) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped while pre-training" in err
  assert not os.path.isdir(os.path.join(run, "checkpoints"))  # the stage itself never started
  base_steps = json.load(open(os.path.join(base, "config.json")))["train"]["steps"]
  again = main(run, config=sft)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"checkpoints/{base_steps}/state" in again.stderr  # the stage starts from the finished base


def _mount_tmpfs(path: str, size: str) -> None:
  os.makedirs(path, exist_ok=True)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True).returncode:
    pytest.skip("needs a tmpfs mount (root) to fill or freeze a file system")


def test_full_disk_during_a_save_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, straight):
  mount = str(tmp_path / "small")
  _mount_tmpfs(mount, "3M")  # room for one smoke checkpoint (1.8 MB), not two
  try:
    run = os.path.join(mount, "run")
    one_line_error(main(run), "could not write checkpoint 20", "no space left on device", "resumes from step 10")
    assert os.listdir(os.path.join(run, "checkpoints")) == ["10"]
  finally:
    subprocess.run(["umount", mount])


def test_full_disk_at_start_is_one_line(tmp_path):
  mount = str(tmp_path / "tiny")
  _mount_tmpfs(mount, "16k")  # the tokenizer and config.json fit, little more
  try:
    one_line_error(main(os.path.join(mount, "run")), "could not write", "No space left on device", "free space")
  finally:
    subprocess.run(["umount", mount])


def test_read_only_checkpoints_are_refused_at_start(run, tmp_path):
  mount = str(tmp_path / "ro")
  _mount_tmpfs(mount, "20M")
  try:
    target = os.path.join(mount, "run")
    shutil.copytree(run, target)
    subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
    started = time.monotonic()
    one_line_error(main(target, timeout=60), "not writable", "Read-only file system")
    assert time.monotonic() - started < 30
  finally:
    subprocess.run(["umount", mount])


def test_a_key_added_since_a_run_started_counts_as_its_default():
  """An identity.json written before a model or data key existed resumes when the key is at its default, and is
  refused, naming the key, when it is not."""
  from fmjax.errors import UserError
  from fmjax.train import identity

  stored = {"model": {"d_model": 64}, "data": {"source": "embedded:prose"}}
  identity.check("/w", stored, {"model": {"d_model": 64, "num_experts": 0},
                                "data": {"source": "embedded:prose", "text_packing": "documents"},
                                "quant": {"base": "none", "frozen": "none"}})
  with pytest.raises(UserError, match=r"holds another run: quant.base: \(unset\) -> 'nf4'"):
    identity.check("/w", stored, {"model": {"d_model": 64}, "data": {"source": "embedded:prose"},
                                  "quant": {"base": "nf4", "frozen": "none", "blocksize": 64}})
  with pytest.raises(UserError, match=r"holds another run: data.text_packing: \(unset\) -> 'stream'"):
    identity.check("/w", stored, {"model": {"d_model": 64}, "data": {"source": "embedded:prose",
                                                                     "text_packing": "stream"}})
