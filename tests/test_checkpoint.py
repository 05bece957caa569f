"""Checkpoints: exact resume, preemption, kills during a save, corrupted checkpoints, re-sharding, init_from."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

SMOKE = ["-m", "fmjax.main", "--config=configs/pretrain.py:smoke", "--config.train.seq_len=64",
         "--config.eval.every_steps=0"]


ENV = {}  # set by the autouse fixture below


@pytest.fixture(autouse=True)
def _one_device(cpu_env):
  ENV.update(cpu_env(1))


def run(repo, workdir, *flags, env=None, check=True):
  proc = subprocess.run([sys.executable, *SMOKE, f"--workdir={workdir}", *flags], cwd=repo, capture_output=True,
                        text=True, timeout=300, env=env or ENV)
  if check:
    assert proc.returncode == 0, "\n".join(l for l in proc.stderr.splitlines() if l[:1] in "EF" or "rror" in l)[-6000:]
  return proc


def losses(workdir):
  return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))]


def params(workdir, step):
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return jax.tree.leaves(tree["params"])


@pytest.mark.slow
def test_resume_is_exact(repo, tmp_path):
  straight, split = tmp_path / "straight", tmp_path / "split"
  run(repo, straight, "--config.train.steps=12", "--config.checkpoint.every_steps=3")
  first = run(repo, split, "--config.train.steps=12", "--config.checkpoint.every_steps=3",
              "--config.train.stop_after=6")
  assert "saved step 6" in first.stderr
  second = run(repo, split, "--config.train.steps=12", "--config.checkpoint.every_steps=3")
  assert "resuming from step 6" in second.stderr
  assert losses(split) == losses(straight) and [s for s, _ in losses(split)] == list(range(1, 13))
  for a, b in zip(params(straight, 12), params(split, 12), strict=True):
    np.testing.assert_array_equal(a, b)  # bitwise


def wait_for(predicate, timeout=120):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return True
    time.sleep(0.001)
  return False


def logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return len(open(path).readlines()) if os.path.exists(path) else 0


def committed(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resume_continues(repo, tmp_path):
  proc = subprocess.Popen([sys.executable, *SMOKE, f"--workdir={tmp_path}", "--config.train.steps=100000",
                           "--config.checkpoint.every_steps=0"], cwd=repo, stderr=subprocess.PIPE, text=True, env=ENV)
  assert wait_for(lambda: logged_steps(tmp_path) >= 3)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  (step,) = committed(tmp_path)
  assert step >= 3 and f"saved step {step}" in err
  again = run(repo, tmp_path, f"--config.train.steps={step + 2}")
  assert f"resuming from step {step}" in again.stderr
  assert [s for s, _ in losses(tmp_path)][-3:] == [step, step + 1, step + 2]


@pytest.mark.slow
def test_kill_during_a_save_resumes_from_the_previous_checkpoint(repo, tmp_path):
  proc = subprocess.Popen([sys.executable, *SMOKE, f"--workdir={tmp_path}", "--config.train.steps=100000",
                           "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=100"], cwd=repo,
                          stderr=subprocess.DEVNULL, env=ENV)
  ckpts = tmp_path / "checkpoints"
  in_flight = lambda: ckpts.is_dir() and any("tmp" in d for d in os.listdir(ckpts)) and len(committed(tmp_path)) >= 2
  caught = wait_for(in_flight)
  proc.kill()
  proc.wait()
  assert caught, "no save in flight was seen"
  before = committed(tmp_path)
  again = run(repo, tmp_path, f"--config.train.steps={before[-1] + 2}")
  assert f"resuming from step {before[-1]}" in again.stderr
  assert committed(tmp_path)[-1] == before[-1] + 2


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_skipped_with_a_warning(repo, tmp_path):
  run(repo, tmp_path, "--config.train.steps=6", "--config.checkpoint.every_steps=3")
  assert committed(tmp_path) == [3, 6]
  for root, _, files in os.walk(tmp_path / "checkpoints" / "6" / "state"):
    for f in files:
      open(os.path.join(root, f), "wb").close()  # truncated to nothing
  again = run(repo, tmp_path, "--config.train.steps=8", "--config.checkpoint.every_steps=3")
  assert f"checkpoint {tmp_path}/checkpoints/6 failed verification" in again.stderr
  assert any(d.startswith("6.corrupt.") for d in os.listdir(tmp_path / "checkpoints"))
  assert "resuming from step 3" in again.stderr
  assert [s for s, _ in losses(tmp_path)] == list(range(1, 9))


@pytest.mark.slow
def test_resume_on_fewer_devices_reshards(repo, tmp_path, cpu_env):
  first = run(repo, tmp_path, "--config.train.steps=8", "--config.train.stop_after=6", env=cpu_env(8))
  assert "'fsdp': 8" in first.stderr
  again = run(repo, tmp_path, "--config.train.steps=8", env=cpu_env(4))
  assert "resuming from step 6" in again.stderr and "'fsdp': 4" in again.stderr
  assert [s for s, _ in losses(tmp_path)] == list(range(1, 9))


@pytest.mark.slow
def test_init_from_loads_params_and_rejects_another_shape(repo, tmp_path):
  base, tuned, bad = tmp_path / "base", tmp_path / "tuned", tmp_path / "bad"
  run(repo, base, "--config.train.steps=20", "--config.checkpoint.every_steps=10")
  run(repo, tuned, "--config.train.steps=2", "--config.optimizer.warmup_steps=1", f"--config.init_from.workdir={base}",
      "--config.init_from.step=10")
  base_losses, tuned_losses = dict(losses(base)), dict(losses(tuned))
  assert abs(tuned_losses[1] - base_losses[11]) < 0.3 < base_losses[1] - tuned_losses[1]  # starts where base was
  proc = run(repo, bad, "--config.train.steps=2", "--config.optimizer.warmup_steps=1",
             f"--config.init_from.workdir={base}", "--config.model.mlp_dim=96",
             check=False)
  assert proc.returncode != 0
  assert "['down_kernel'] is (2, 192, 64) float32 there but (2, 96, 64) float32 in this model" in proc.stderr


def test_save_policy_by_steps_minutes_and_keep(tmp_path, monkeypatch):
  import grain
  import ml_collections

  from fmjax.train import checkpoint

  clock = [1000.0]
  monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
  cfg = ml_collections.ConfigDict(dict(every_steps=5, every_minutes=2.0, keep=2, keep_every=4, async_save=True))
  ckpt = checkpoint.Checkpointer(str(tmp_path), cfg)
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  saved = []
  for step in range(1, 15):
    clock[0] += 50.0  # 50 s per step: 2 minutes pass every 2.4 steps
    next(it)
    if ckpt.due(step):
      ckpt.save(step, {"w": np.full(3, step, np.float32)}, it, {"step": step})
      saved.append(step)
  ckpt.wait()
  assert saved == [3, 5, 8, 10, 13]  # 2 minutes passed at 3, 8 and 13; the step period at 5 and 10
  assert sorted(ckpt.manager.all_steps()) == [8, 10, 13]  # newest 2, plus 8 (a multiple of keep_every=4)
  fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
  state, step = ckpt.restore_latest({"w": jax.ShapeDtypeStruct((3,), np.float32)}, fresh)
  # the position saved at 13 is the one at the save, not the later one (step 14 read on while it was written)
  assert step == 13 and np.all(np.asarray(state["w"]) == 13) and next(fresh) == 13
  ckpt.close()


@pytest.mark.slow
def test_init_from_rejects_a_run_with_another_tokenizer(repo, tmp_path):
  base, tuned = tmp_path / "base", tmp_path / "tuned"
  run(repo, base, "--config.train.steps=2", "--config.optimizer.warmup_steps=1")
  assert (base / "tokenizer.model").is_file()
  proc = run(repo, tuned, "--config.train.steps=2", "--config.optimizer.warmup_steps=1",
             f"--config.init_from.workdir={base}", "--config.data.vocab_size=500", check=False)
  assert proc.returncode != 0
  assert "was trained with tokenizer sentencepiece:" in proc.stderr
  assert f"set --config.data.tokenizer_path={base}/tokenizer.model" in proc.stderr
  ok = run(repo, tuned, "--config.train.steps=2", "--config.optimizer.warmup_steps=1",
           f"--config.init_from.workdir={base}", f"--config.data.tokenizer_path={base}/tokenizer.model")
  assert "initialised params from" in ok.stderr


def test_a_checkpoint_from_before_a_state_field_existed_resumes_with_its_fresh_value(tmp_path):
  """A state saved without `recent_losses` (as older fmjax wrote it) restores its own fields and takes the new one
  from the fresh state, instead of being set aside as unreadable."""
  import jax.numpy as jnp
  import ml_collections

  from fmjax.train import checkpoint
  from fmjax.train.state import TrainState

  cfg = ml_collections.ConfigDict({"every_steps": 1, "every_minutes": 0.0, "keep": 2, "keep_every": 0,
                                   "async_save": False})
  old = {"step": jnp.int32(7), "params": {"w": jnp.arange(3.0)}, "opt_state": {}, "rng": jax.random.PRNGKey(1),
         "frozen": {}}
  ckpt = checkpoint.Checkpointer(str(tmp_path), cfg)
  ckpt.manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(old)))
  ckpt.wait()
  fresh = TrainState(step=jnp.int32(0), params={"w": jnp.zeros(3)}, opt_state={}, rng=jax.random.PRNGKey(0),
                     recent_losses=jnp.full((4,), jnp.nan))

  class NoData:  # the old checkpoint carries no data iterator either: restore only the state
    pass

  ckpt.manager.restore = (lambda restore: lambda step, args: restore(step, args=ocp.args.Composite(
      state=args["state"])))(ckpt.manager.restore)
  state, step = ckpt.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh), NoData(),
                                    fresh=fresh)
  assert step == 7 and int(state.step) == 7
  np.testing.assert_array_equal(state.params["w"], np.arange(3.0))
  assert np.isnan(np.asarray(state.recent_losses)).all() and state.recent_losses.shape == (4,)
  assert not any(d.endswith("unreadable") or ".unreadable." in d for d in os.listdir(ckpt.directory))


def test_init_from_casts_float_params_to_the_models_dtype(tmp_path):
  """A float32 run read into a bfloat16 model (QLoRA over a base saved in float32) is cast, rounding to nearest even
  as numpy's bfloat16 does; integer and shape differences stay errors."""
  import jax.numpy as jnp
  import ml_collections
  import ml_dtypes

  from fmjax.errors import UserError
  from fmjax.train import init_from, weights

  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 8)).astype(np.float32), "n": np.arange(3, dtype=np.int32)}
  weights.write_run(str(tmp_path / "run"), params, ml_collections.ConfigDict({"model": {}}), 5, "")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"w": jax.ShapeDtypeStruct((4, 8), jnp.bfloat16, sharding=device),
            "n": jax.ShapeDtypeStruct((3,), jnp.int32, sharding=device)}
  got = init_from.read(str(tmp_path / "run"), -1, target)
  assert got["w"].dtype == jnp.bfloat16
  want = params["w"].astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(got["w"]).view(np.uint16), want.view(np.uint16))
  floats = {**target, "n": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=device)}
  with pytest.raises(UserError, match=r"\['n'\] is \(3,\) int32 there but \(3,\) float32 in this model"):
    init_from.read(str(tmp_path / "run"), -1, floats)
