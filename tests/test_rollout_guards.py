"""Rollout guards and tool errors, each row a subprocess under a time limit: a reward weight that is not finite, a
reward function that blocks (objective.reward_timeout) or raises, a SIGTERM while one blocks, a tool given a run
directory without checkpoints, and a SIGKILLed run with data workers (its child processes die with it). Bad input
ends in one line `fmjax: error: ...` naming the entry and the fix, exit 2, no traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fmjax.errors import UserError
from fmjax.rl import rewards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = ("-m", "fmjax.main", "--config=configs/grpo.py:smoke", "--config.init_from.bootstrap=",
      "--config.data.tokenizer=bytes", "--config.data.tokenizer_source=", "--config.model.vocab_size=384",
      "--config.train.steps=2", "--config.train.batch_size=8", "--config.train.seq_len=40",
      "--config.objective.num_generations=2", "--config.objective.max_completion_length=6",
      "--config.log.peak_flops=1e9", "--workdir={tmp}/run")
PRETRAIN = ("-m", "fmjax.main", "--config=configs/pretrain.py:smoke", "--config.data.tokenizer=bytes",
            "--config.data.tokenizer_source=", "--config.model.vocab_size=384", "--workdir={tmp}/run")


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  argv: tuple[str, ...]  # after `python`; {tmp} is the row's directory
  names: tuple[str, ...] = ()  # what the one-line error names (exit 2); empty for a signal row
  not_named: tuple[str, ...] = ()
  signal: int = 0  # sent once `ready` (a file under {tmp}, or a line of stderr) appears; the run must then end
  ready: str = ""
  within: float = 0.0  # seconds the run (SIGTERM) or its child processes (SIGKILL) may take to end
  timeout: float = 180.0


ROWS = [
    Row("nan_weight", RL + ("--config.objective.rewards=sort_exact,sort_digits:nan",),
        ("objective.rewards", "'sort_digits:nan'", "finite"), timeout=90),
    Row("blocking_reward_times_out", RL + ("--config.objective.rewards=tests.slow_rewards:sleep",
                                           "--config.objective.reward_timeout=5"),
        ("'tests.slow_rewards:sleep'", "objective.reward_timeout=5 seconds", "raise objective.reward_timeout")),
    Row("raising_reward", RL + ("--config.objective.rewards=sort_digits,tests.slow_rewards:missing_file",),
        ("'tests.slow_rewards:missing_file'", "FileNotFoundError", "/nonexistent/fmjax-reward-table.json",
         "remove it from objective.rewards")),
    Row("evaluate_without_checkpoints", ("tools/evaluate.py", "perplexity", "--model={tmp}/untrained",
                                         "--data=embedded:prose"),
        ("--model='{tmp}/untrained' has no checkpoints", "point --model at"), ("init_from",), timeout=90),
    Row("generate_without_checkpoints", ("tools/generate.py", "--workdir={tmp}/untrained", "--prompt=hi"),
        ("--workdir='{tmp}/untrained' has no checkpoints", "point --workdir at"), ("init_from",), timeout=90),
    Row("score_without_checkpoints", ("tools/score.py", "--workdir={tmp}/untrained", "--prompt=hi",
                                      "--completion=yes"),
        ("--workdir='{tmp}/untrained' has no checkpoints",), ("init_from",), timeout=90),
    Row("sigterm_while_a_reward_blocks", RL + ("--config.objective.rewards=tests.slow_rewards:sleep",
                                               "--config.objective.reward_timeout=600"),
        signal=signal.SIGTERM, ready="{tmp}/reward_started", within=20),
    Row("sigkill_with_data_workers", PRETRAIN + ("--config.data.workers=2", "--config.train.steps=100000"),
        signal=signal.SIGKILL, ready="step 2/", within=10),
]


def _children(pid: int) -> list[int]:
  """Every descendant of `pid` (psutil where installed, else /proc)."""
  try:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]
  except ImportError:
    out, todo = [], [pid]
    while todo:
      p = todo.pop()
      for task in os.listdir(f"/proc/{p}/task"):
        with open(f"/proc/{p}/task/{task}/children") as f:
          kids = [int(k) for k in f.read().split()]
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
  except FileNotFoundError:
    return False


def _wait_for(ready: str, stderr_path: str, proc: subprocess.Popen, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    if ready.startswith("/") and os.path.exists(ready):
      return
    if not ready.startswith("/") and ready in open(stderr_path).read():
      return
    time.sleep(0.2)
  proc.kill()
  pytest.fail(f"{ready!r} never appeared (exit {proc.poll()}): {open(stderr_path).read()[-2000:]}")


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_row(row: Row, tmp_path):
  tmp = str(tmp_path)
  os.makedirs(os.path.join(tmp, "untrained"))
  with open(os.path.join(tmp, "untrained", "config.json"), "w") as f:  # a run directory that never trained
    json.dump({"model": {"name": "smoke"}}, f)
  fill = lambda s: s.replace("{tmp}", tmp)  # noqa: E731
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p),
         "SLOW_REWARD_STARTED": os.path.join(tmp, "reward_started")}
  env.pop("FMJAX_DEBUG", None)
  argv = [sys.executable, *map(fill, row.argv)]
  if not row.signal:
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=row.timeout)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fmjax: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name in row.names:
      assert fill(name) in errors[0], errors[0]
    for name in row.not_named:
      assert name not in errors[0], errors[0]
    return
  stderr_path = os.path.join(tmp, "stderr.log")
  with open(stderr_path, "w") as err:
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
  children: list[int] = []
  try:
    _wait_for(fill(row.ready), stderr_path, proc, row.timeout)
    children = _children(proc.pid)  # before the kill: a SIGKILLed trainer's children are reparented
    proc.send_signal(row.signal)
    started = time.monotonic()
    if row.signal == signal.SIGTERM:
      code = proc.wait(timeout=row.within)
      assert time.monotonic() - started <= row.within
      assert code == 0 and "Traceback" not in open(stderr_path).read(), open(stderr_path).read()[-3000:]
    else:
      proc.wait(timeout=row.within)
      assert children, "the run had no child processes (data.workers=2 should start grain workers)"
      while any(map(_alive, children)) and time.monotonic() - started < row.within:
        time.sleep(0.2)
      assert not [c for c in children if _alive(c)], f"still alive {row.within:g} s after the trainer's SIGKILL"
  finally:
    for pid in [proc.pid] * (proc.poll() is None) + [c for c in children if _alive(c)]:  # a failed row leaves none
      os.kill(pid, signal.SIGKILL)
    proc.wait()


def test_reward_call_guards_in_process():
  """The time limit, the cancel check and the error wrapping of rewards.call, without a run; the wrapped error keeps
  the original as its cause (what --debug shows)."""
  def raises(prompts, completions):
    raise FileNotFoundError(2, "No such file or directory", "table.json")

  with pytest.raises(UserError, match=r"'mine' \(objective.rewards\) raised FileNotFoundError: .*'table.json'") as e:
    rewards.call("mine", raises, ["p"], ["c"], {})
  assert isinstance(e.value.__cause__, FileNotFoundError)
  blocks = lambda prompts, completions: time.sleep(30)  # noqa: E731
  started = time.monotonic()
  with pytest.raises(UserError, match=r"objective.reward_timeout=0.3 seconds"):
    rewards.call("slow", blocks, ["p"], ["c"], {}, timeout=0.3)
  with pytest.raises(InterruptedError):
    rewards.call("slow", blocks, ["p"], ["c"], {}, timeout=0, cancelled=lambda: True, stop=InterruptedError)
  assert time.monotonic() - started < 5
  assert rewards.call("ok", lambda p, c: [1.0] * len(c), ["p"], ["c"], {}, timeout=5) == [1.0]
  for weight in ("nan", "inf", "-inf"):
    with pytest.raises(UserError, match=f"'sort_digits:{weight}'.*finite"):
      rewards.parse(f"sort_exact,sort_digits:{weight}")
