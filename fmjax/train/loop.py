"""The training loop: dispatch step t, then read step t-1's metrics, so the device never waits on the host."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import ml_collections

from fmjax import config_lib, distributed
from fmjax.data import prepared
from fmjax.train import checkpoint, init_from, peak, preemption
from fmjax.train import metrics as metrics_lib
from fmjax.train.experiment import Experiment, build


class NonFiniteLossError(FloatingPointError):
  pass


def _bootstrap(spec: str, workdir: str, into: str = "base") -> str:
  """Pre-trains config `spec` (a path relative to the working or the repository directory) into WORKDIR/`into`, or
  finds it there already; returns that directory."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), path)
  target = os.path.join(workdir, into)
  logging.info("pre-training %s into %s first", spec, target)
  train(config_lib.load(f"{path}:{variant}" if variant else path), target)
  return target


def train(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one; returns the experiment (its
  `state` holds the final params). SIGTERM saves a checkpoint at the next step boundary and returns early."""
  is_main = jax.process_index() == 0
  if config.objective.teacher_bootstrap and not config.objective.teacher:
    config.objective.teacher = _bootstrap(config.objective.teacher_bootstrap, workdir, "teacher")
  exp = build(config)
  resolved = json.loads(config_lib.resolve(config).to_json_best_effort())
  resolved["tokenizer"] = {"id": prepared.tokenizer_id(exp.tokenizer), "vocab_size": exp.tokenizer.vocab_size}
  # Hosts that disagree (another config file, an edited flag, a differently trained tokenizer) would train garbage.
  distributed.check_same("resolved config or tokenizer", json.dumps(resolved, sort_keys=True))
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    if hasattr(exp.tokenizer, "save"):  # the run directory carries its own tokenizer
      exp.tokenizer.save(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  # Frozen trees (a LoRA base, a reference policy, a teacher) are not checkpointed: they never change, and every
  # start rebuilds them from their source (init_from, or the seed), so a LoRA checkpoint holds only the adapters.
  unfrozen = lambda tree: tree.replace(frozen={})  # noqa: E731
  restored = ckpt.restore_latest(checkpoint.abstract(unfrozen(exp.state), unfrozen(exp.state_shardings)), exp.stream)
  if restored is not None:
    exp.state, resumed = restored[0].replace(frozen=exp.state.frozen), restored[1]
    dropped = metrics_lib.truncate_after(workdir, resumed) if is_main else 0
    logging.info("resuming from step %d (%s/%d)%s", resumed, ckpt.directory, resumed,
                 f"; dropped {dropped} metrics rows logged after it" if dropped else "")
  # A resume still reads the frozen trees (a LoRA base, a reference policy) from init_from: checkpoints lack them.
  if (config.init_from.workdir or config.init_from.bootstrap) and (restored is None or exp.state.frozen):
    source = config.init_from.workdir or _bootstrap(config.init_from.bootstrap, workdir)
    init_from.check_tokenizer(source, resolved["tokenizer"])
    exp.state = init_from.load(exp.state, exp.state_shardings, source, config.init_from.step,
                               frozen_only=restored is not None)
  peak_flops, peak_source = peak.total_peak_flops(jax.devices(), config.log.peak_flops)
  logging.info("peak %.1f TFLOP/s over %d device(s) (%s)", peak_flops / 1e12, jax.device_count(), peak_source)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  digests = metrics_lib.BatchDigests(workdir) if config.log.batch_digests else None
  stop = preemption.Watcher()

  total = config.train.steps
  tokens_per_step = config.train.batch_size * config.train.seq_len * exp.sequences_per_row
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
  if config.eval.at_start and config.eval.every_steps and start == 0:  # the starting point, e.g. a CPT base
    m = {k: float(v) for k, v in jax.device_get(exp.evaluate(state)).items()}
    writer.write(0, m)
    logging.info("step 0 (before training): %s", " | ".join(f"{k} {v:.4f}" for k, v in m.items()
                                                             if k.startswith("eval_loss")))
  window_start = time.perf_counter()
  step = start
  for step in range(start + 1, total + 1):
    batch = exp.next_batch()
    if digests is not None:
      digests.write(step, batch)
    state, metrics = exp.step_fn(state, batch)
    if pending is not None:
      finish(*pending)
    if config.eval.every_steps and (step % config.eval.every_steps == 0 or step == total):
      jax.block_until_ready(metrics)  # the train step's time stays in its throughput window ...
      t0 = time.perf_counter()
      metrics = {**metrics, **jax.device_get(exp.evaluate(state))}
      window_start += time.perf_counter() - t0  # ... the evaluation's does not
    pending = (step, metrics)
    preempted = stop.requested(step) or step - start == config.train.stop_after
    if preempted or step == total or ckpt.due(step):
      t0 = time.perf_counter()
      ckpt.save(step, unfrozen(state), exp.stream, resolved)  # copied to the host, then written in the background
      window_start += time.perf_counter() - t0
    if preempted:
      break
  if pending is not None:
    finish(*pending)
  ckpt.wait()
  ckpt.close()
  stop.restore()
  exp.state = state
  writer.close()
  if digests is not None:
    digests.close()
  if hasattr(exp.stream, "close"):
    exp.stream.close()  # stops grain's worker processes, if any
  if step < total:
    logging.info("stopped (%s): saved step %d to %s; run the same command again to resume",
                 stop.reason if stop.signalled else "train.stop_after", step, ckpt.directory)
  else:
    logging.info("done: %d steps in %s", total - start, workdir)
  return exp
