"""Several processes on one machine (2 × 4 virtual CPU devices, a coordinator on localhost) train exactly like one
process with 8: the same global batches, the same losses, disjoint per-process data, checkpoints that save and resume
across processes; SIGTERM to one process stops them all at one step; a missing peer fails the start with a message."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import pytest

from fmjax import distributed

STEPS, STOP = 8, 5
SMOKE = ["-m", "fmjax.main", "--config=configs/pretrain.py:smoke", "--config.train.seq_len=64",
         "--config.eval.every_steps=8", "--config.data.shards=2", "--config.log.batch_digests=True",
         "--config.log.peak_flops=1e9"]  # a configured peak skips the CPU matmul probe
RUN = [f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=4"]
# Identical batches and programs; only the cross-device sums differ: XLA adds within one process, gloo across two,
# in another order, and float32 addition is not associative. Measured: losses equal or 1-2 ulp apart (<= 1.6e-7
# relative) over 8 steps, grad norms <= 1 ulp. 1e-6 leaves room for that; another batch moves the step-1 loss by
# ~1e-3 relative (the 2-process run without data.shards: 6.2387 vs 6.2313), a wrong restore more.
RTOL = 1e-6


STARTED = []  # processes a test launched; any still running when it ends (a failure) are killed


@pytest.fixture(autouse=True)
def _kill_leftovers():
  yield
  while STARTED:
    proc = STARTED.pop()
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(repo, workdir, env, processes, *flags, ids=None, timeout=60.0):
  """Starts processes `ids` (default all) of a `processes`-process run; returns the Popen objects. Each logs to a
  file (`.log`), not a pipe: a process blocked on a full pipe would stall the others in a collective."""
  port = free_port()
  common = [sys.executable, *SMOKE, f"--workdir={workdir}", *flags, f"--coordinator_address=localhost:{port}",
            f"--num_processes={processes}", f"--distributed_timeout={timeout}"]
  procs = []
  for i in ids if ids is not None else range(processes):
    log = tempfile.TemporaryFile("w+")
    procs.append(subprocess.Popen([*common, f"--process_id={i}"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                                  stderr=log, text=True))
    procs[-1].log = log
  STARTED.extend(procs)
  return procs


def wait(procs, timeout=240) -> list[str]:
  """Waits for every process; returns their stderr."""
  end = time.time() + timeout
  for p in procs:
    p.wait(timeout=max(1.0, end - time.time()))
  errs = []
  for p in procs:
    p.log.seek(0)
    errs.append(p.log.read())
  return errs


def finish(procs, timeout=240) -> list[str]:
  """Waits for every process; asserts each exited 0; returns their stderr."""
  errs = wait(procs, timeout)
  for i, (p, err) in enumerate(zip(procs, errs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n" + err[-4000:]
  return errs


def run_one(repo, workdir, env, *flags) -> str:
  proc = subprocess.run([sys.executable, *SMOKE, f"--workdir={workdir}", *flags], cwd=repo, capture_output=True,
                        text=True, timeout=240, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


def metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def digests(workdir, process) -> dict[int, dict[int, str]]:
  """step -> global row index -> row hash, as process `process` recorded them (a resumed step's last line)."""
  out = {}
  for line in open(os.path.join(workdir, "batch_digests", f"process_{process}.jsonl")):
    r = json.loads(line)
    out[r["step"]] = {int(k): v for k, v in r["rows"].items()}
  return out


def run_log(err: str) -> list[str]:
  """fmjax's INFO lines (`HH:MM:SS message`) after start-up (the distributed join logs on every process)."""
  return [line for line in err.splitlines()
          if re.match(r"\d{2}:\d{2}:\d{2} ", line) and not line[9:].startswith("jax.distributed")]


@pytest.mark.slow
def test_two_processes_train_save_and_resume_exactly_like_one(repo, tmp_path, cpu_env):
  one, two = tmp_path / "one", tmp_path / "two"
  run_one(repo, one, cpu_env(8), *RUN)
  first = finish(launch(repo, two, cpu_env(4), 2, *RUN, f"--config.train.stop_after={STOP}"))
  assert f"saved step {STOP}" in first[0] and "'fsdp': 8" in first[0]
  assert run_log(first[0]) and not run_log(first[1]), "only process 0 logs the run"
  data_states = sorted(os.listdir(two / "checkpoints" / str(STOP) / "data"))
  assert "process_0-of-2.json" in data_states and "process_1-of-2.json" in data_states
  second = finish(launch(repo, two, cpu_env(4), 2, *RUN))
  assert f"resuming from step {STOP}" in second[0]

  # (a) + (c): one row per step (process 1 writes no metrics), each equal to the one-process run's
  want, got = metrics(one), metrics(two)
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
  for w, g in zip(want, got):
    for key in ("loss", "grad_norm", "eval_loss"):
      if key in w:
        assert g[key] == pytest.approx(w[key], rel=RTOL, abs=0), (w["step"], key, g[key], w[key])

  # (b) process 0 held global rows 0-3, process 1 rows 4-7: disjoint data, together the one-process batch
  whole, p0, p1 = digests(one, 0), digests(two, 0), digests(two, 1)
  assert sorted(p0) == sorted(p1) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert sorted(p0[step]) == [0, 1, 2, 3] and sorted(p1[step]) == [4, 5, 6, 7]
    assert {**p0[step], **p1[step]} == whole[step], f"step {step}: not the one-process global batch"
  rows0 = {h for rows in p0.values() for h in rows.values()}
  rows1 = {h for rows in p1.values() for h in rows.values()}
  assert not rows0 & rows1, "the processes read the same rows"
  assert len(rows0) == len(rows1) == 4 * STEPS  # and never a row twice

  # (d) a context axis spanning the two processes: both read the same rows (the whole batch), each device holds an
  # eighth of every sequence, and the losses are the one-process run's
  ctx = tmp_path / "context"
  finish(launch(repo, ctx, cpu_env(4), 2, *RUN, "--config.mesh.context=8", "--config.mesh.fsdp=1"))
  for w, g in zip(want, metrics(ctx)):
    assert g["loss"] == pytest.approx(w["loss"], rel=RTOL, abs=0), (w["step"], g["loss"], w["loss"])
  assert digests(ctx, 0) == digests(ctx, 1) == {step: whole[step] for step in range(1, STEPS + 1)}


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_one_step(repo, tmp_path, cpu_env):
  procs = launch(repo, tmp_path, cpu_env(4), 2, "--config.train.steps=100000",
                 "--config.checkpoint.every_steps=0", "--config.eval.every_steps=0", "--config.log.batch_digests=False")
  metrics_file = tmp_path / "metrics.jsonl"
  end = time.time() + 180
  while time.time() < end and not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
    assert all(p.poll() is None for p in procs), "a process exited early"
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # only one: the coordination service tells the other
  errs = finish(procs, timeout=180)
  (step,) = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert f"stopped (preemption notice): saved step {step}" in errs[0]
  assert step >= 3 and max(r["step"] for r in metrics(tmp_path)) == step


def test_a_missing_peer_fails_the_start_with_a_message(repo, tmp_path, cpu_env):
  # Process 0 alone waits for process 1 at its own coordinator; process 1 alone finds no coordinator at all.
  t0 = time.time()
  alone = [launch(repo, tmp_path / str(i), cpu_env(1), 2, ids=[i], timeout=3)[0] for i in range(2)]
  for i, (proc, err) in enumerate(zip(alone, wait(alone, timeout=120))):
    assert proc.returncode == distributed.TIMEOUT_EXIT_CODE, err[-3000:]
    assert f"process {i} of 2 expected processes could not meet the others at the coordinator localhost:" in err
    assert "each process id 0..1 exactly once" in err and "--distributed_timeout" in err
  assert time.time() - t0 < 60


def test_how_the_process_layout_is_decided():
  resolve = distributed.resolve
  assert resolve(environ={}) is None  # a laptop: one process, nothing to initialise
  assert resolve(num_processes=1, environ={distributed.ENV_ADDRESS: "h:1"}) is None
  env = {distributed.ENV_ADDRESS: "env:1", distributed.ENV_COUNT: "4", distributed.ENV_ID: "2",
         "JAX_COORDINATOR_ADDRESS": "jax:1"}
  got = resolve(environ=env)
  assert (got.coordinator_address, got.num_processes, got.process_id) == ("env:1", 4, 2)
  got = resolve("flag:1", 8, 5, environ=env)  # flags win
  assert (got.coordinator_address, got.num_processes, got.process_id) == ("flag:1", 8, 5)
  got = resolve(environ={"JAX_COORDINATOR_ADDRESS": "jax:1", distributed.ENV_COUNT: "2", distributed.ENV_ID: "0"})
  assert got.coordinator_address == "jax:1"
  # a multi-host TPU slice (GKE lists its workers), or several slices: JAX detects everything
  for tpu in ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {"MEGASCALE_NUM_SLICES": "2"}):
    got = resolve(environ=tpu)
    assert (got.coordinator_address, got.num_processes, got.process_id, got.source) == (
        None, None, None, "Cloud TPU environment")
  assert resolve(environ={"TPU_WORKER_HOSTNAMES": "w0"}) is None  # one host
  with pytest.raises(distributed.DistributedError, match="process_id=2 must be in"):
    resolve("h:1", 2, 2, environ={})
  with pytest.raises(distributed.DistributedError, match="FMJAX_NUM_PROCESSES='two' is not an integer"):
    resolve(environ={distributed.ENV_COUNT: "two"})


def test_a_checkpoint_of_another_process_count_is_refused_not_discarded(tmp_path):
  import grain
  import ml_collections
  import numpy as np

  from fmjax.train import checkpoint

  cfg = ml_collections.ConfigDict(dict(every_steps=1, every_minutes=0.0, keep=3, keep_every=0, async_save=False))
  ckpt = checkpoint.Checkpointer(str(tmp_path), cfg)
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpt.save(3, {"w": np.zeros(2, np.float32)}, it, {})
  ckpt.wait()
  data = tmp_path / "checkpoints" / "3" / "data"
  (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")  # as a 2-process run leaves it
  (data / "process_1-of-2.json").write_text((data / "process_0-of-2.json").read_text())
  with pytest.raises(ValueError, match=r"checkpoints/3 was written by 2 processes and this run has 1: .* Resume "
                                       r"with 2 processes, or .*--config.init_from.workdir="):
    ckpt.restore_latest({"w": jax.ShapeDtypeStruct((2,), np.float32)},
                        iter(grain.MapDataset.range(10).to_iter_dataset()))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]  # still there, not renamed `.unreadable`
  ckpt.close()
