"""The train loop's throughput window: it holds each step's device work and leaves out evaluations and checkpoints.

`loop._run_steps` runs with a stand-in step whose "device work" is a host callback sleeping a known time inside
the jitted function (so it runs on the device's side, as a real step's compute does) and an evaluation that
sleeps on the host.
"""

import json
import time
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config_lib, spec
from fmjax.train import loop

DEVICE_SECONDS, EVAL_SECONDS, PEAK, FLOPS_PER_TOKEN = 0.3, 1.0, 1e12, 1e6


@flax.struct.dataclass
class State:
  x: jax.Array
  frozen: dict
  base: None = None


def _slow(x):
  time.sleep(DEVICE_SECONDS)
  return x


@jax.jit
def fake_step(state, batch):
  y = jax.pure_callback(_slow, jax.ShapeDtypeStruct(state.x.shape, state.x.dtype), state.x) + batch
  return state.replace(x=y), {"loss": jnp.mean(y), "grad_norm": jnp.float32(1.0)}


def fake_evaluate(state):
  time.sleep(EVAL_SECONDS)
  return {"eval_loss": jnp.float32(1.0)}


@pytest.fixture(scope="module")
def rows(repo, tmp_path_factory):
  config = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  config.train.steps, config.log.every_steps, config.eval.every_steps = 5, 1, 2
  config.optimizer.warmup_steps = 1
  config.log.peak_flops = PEAK  # configured: no CPU probe
  run = types.SimpleNamespace(spec=spec.resolve(config), flops_per_token=FLOPS_PER_TOKEN, step=fake_step,
                              evaluate=fake_evaluate, layout=types.SimpleNamespace(rows_per_example=1))
  exp = types.SimpleNamespace(run=run, batch=lambda state, step: (jnp.ones((4,)), {}), boundary=lambda step: True,
                              rollout=None, stream=None, state=State(jnp.zeros((4,)), {}))
  ckpt = types.SimpleNamespace(due=lambda step: step == 3, save=lambda *args: time.sleep(EVAL_SECONDS))
  stop = types.SimpleNamespace(requested=lambda step: False)
  workdir = str(tmp_path_factory.mktemp("window"))
  reporter = loop._Reporter(exp, workdir, ckpt)
  fake_step(exp.state, jnp.ones((4,)))  # compiled outside the window
  reporter.window_start = time.perf_counter()
  assert loop._run_steps(exp, ckpt, reporter, stop, 0, {}, None) == 5
  reporter.close()
  tokens = config.train.batch_size * config.train.seq_len
  return [dict(r, seconds=tokens / r["tokens_per_sec"]) for r in map(json.loads, open(f"{workdir}/metrics.jsonl"))]


def test_each_window_holds_its_own_steps_device_work(rows):
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  # A window that ends before the device does, one that ends after the next step ran (a clock read after the next
  # dispatch, which on CPU runs that step), or an untimed block that starts its clock before waiting for the step
  # would each give some window a part or a multiple of the sleep. The slack: 50 ms below, one step above.
  seconds = [r["seconds"] for r in rows]
  assert all(DEVICE_SECONDS - 0.05 <= s < 2 * DEVICE_SECONDS for s in seconds), seconds


def test_evaluation_and_checkpoint_stay_out_of_the_window(rows):
  assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 5]
  assert all(r["seconds"] < DEVICE_SECONDS + 0.5 * EVAL_SECONDS for r in rows), [r["seconds"] for r in rows]


def test_mfu_is_model_flops_over_the_configured_peak(rows):
  for r in rows:
    np.testing.assert_allclose(r["mfu"], FLOPS_PER_TOKEN * r["tokens_per_sec"] / PEAK, rtol=1e-6)
