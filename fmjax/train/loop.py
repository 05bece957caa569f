"""The training loop: dispatch step t, then read step t-1's metrics, so the device never waits on the host."""

from __future__ import annotations

import logging
import math
import os
import time

import jax
import ml_collections

from fmjax import config_lib
from fmjax.train import peak
from fmjax.train.experiment import Experiment, build
from fmjax.train.metrics import MetricsWriter


class NonFiniteLossError(FloatingPointError):
  pass


def train(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  """Trains `config` in `workdir`; returns the finished experiment (its `state` holds the final params)."""
  is_main = jax.process_index() == 0
  exp = build(config)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.resolve(config).to_json_best_effort(indent=2))
  peak_flops, peak_source = peak.total_peak_flops(jax.devices(), config.log.peak_flops)
  logging.info("peak %.1f TFLOP/s over %d device(s) (%s)", peak_flops / 1e12, jax.device_count(), peak_source)
  writer = MetricsWriter(workdir, enabled=is_main)

  total = config.train.steps
  tokens_per_step = config.train.batch_size * config.train.seq_len
  every = config.log.every_steps
  skipped = 0
  window_start, window_steps = 0.0, 0

  def finish(step: int, metrics) -> None:
    nonlocal skipped, window_start, window_steps
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    window_steps += 1
    if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
      if not config.train.skip_nonfinite:
        raise NonFiniteLossError(
            f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite. Lower optimizer.lr, raise "
            "optimizer.warmup_steps, or set train.skip_nonfinite=True to skip such steps.")
      skipped += 1
      logging.warning("step %d: non-finite loss %s, update skipped (%d so far)", step, m["loss"], skipped)
    if step % every and step != total and "eval_loss" not in m:
      return
    now = time.perf_counter()
    step_seconds = (now - window_start) / window_steps
    window_start, window_steps = now, 0
    m["tokens_per_sec"] = tokens_per_step / step_seconds
    if peak_flops:
      m["mfu"] = exp.flops_per_token * m["tokens_per_sec"] / peak_flops
    writer.write(step, m)
    writer.console(step, total, m, (total - step) * step_seconds)

  state = exp.state
  start = int(jax.device_get(state.step))
  pending = None
  window_start = time.perf_counter()
  for step in range(start + 1, total + 1):
    state, metrics = exp.step_fn(state, exp.next_batch())
    if pending is not None:
      finish(*pending)
    if config.eval.every_steps and (step % config.eval.every_steps == 0 or step == total):
      jax.block_until_ready(metrics)  # the train step's time stays in its throughput window ...
      t0 = time.perf_counter()
      metrics = {**metrics, **jax.device_get(exp.evaluate(state))}
      window_start += time.perf_counter() - t0  # ... the evaluation's does not
    pending = (step, metrics)
  if pending is not None:
    finish(*pending)
  exp.state = state
  writer.close()
  if hasattr(exp.stream, "close"):
    exp.stream.close()  # stops grain's worker processes, if any
  logging.info("done: %d steps in %s", total - start, workdir)
  return exp
