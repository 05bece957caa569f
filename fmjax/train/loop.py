"""The training loop: dispatch step t, then read step t-1's metrics, so the device never waits on the host."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import jax
import ml_collections

from fmjax import config_lib, distributed
from fmjax import spec as spec_lib
from fmjax.spec import Spec
from fmjax.data import tokenizers
from fmjax.errors import UserError
from fmjax.governance import lineage
from fmjax.train import checkpoint, checks, frozen, identity, init_from, peak, preemption, workdir_lock
from fmjax.train import metrics as metrics_lib
from fmjax.train import state as train_state
from fmjax.train.experiment import Experiment, build


class NonFiniteLossError(UserError):
  """A step's loss or gradient norm is NaN/inf."""


class DivergenceError(UserError):
  """Loss spikes went on past train.spike_skips consecutive steps."""


class _Stopped(Exception):
  """A bootstrap stopped early (SIGTERM, train.stop_after): the run that needs it stops too."""


def _bootstrap(config_file: str, workdir: str, into: str) -> str:
  """Pre-trains `config_file` (`path.py[:variant]`; config files write it beside themselves, config_lib.sibling)
  into WORKDIR/`into`, or finds it there already; returns that directory."""
  path, _, variant = config_file.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"bootstrap config {config_file!r}: {path!r} does not exist; name an existing config file (a relative "
                    "path is read from the working directory).")
  target = os.path.join(workdir, into)
  logging.info("pre-training %s into %s first", config_file, target)
  exp = train(config_lib.load(f"{path}:{variant}" if variant else path), target)
  if exp is None or int(jax.device_get(exp.state.step)) < exp.run.spec.train.steps:
    raise _Stopped(f"stopped while pre-training {config_file} into {target}; run the same command again to finish it "
                   "and go on")
  return target


def _write_run_files(exp: Experiment, workdir: str, tokenizer: dict) -> dict:
  """config.json (the resolved config and the tokenizer's id) and the tokenizer, on process 0; returns the config.
  Hosts that disagree (another config file, an edited flag, a differently trained tokenizer) would train garbage."""
  resolved = json.loads(json.dumps(exp.run.spec.record))
  resolved["tokenizer"] = tokenizer
  distributed.check_same("resolved config or tokenizer", json.dumps(resolved, sort_keys=True))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    try:
      if hasattr(exp.run.tokenizer, "save"):  # the run directory carries its own tokenizer
        exp.run.tokenizer.save(workdir)
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(resolved, f, indent=2)
    except OSError as e:
      raise UserError(f"could not write the run's config.json and tokenizer in {workdir} ({e.strerror}); free space "
                      "(or make it writable) or use another --workdir, and run the same command again.") from e
  return resolved


def _unfrozen(tree: train_state.TrainState) -> train_state.TrainState:
  """What a checkpoint holds: frozen trees never change, and every start rebuilds them from their source."""
  return tree.replace(base=None, frozen={})


def _starting_state(exp: Experiment, ckpt: checkpoint.Checkpointer, workdir: str, tokenizer: dict) -> int:
  """Sets `exp.state`: resumed from the newest intact checkpoint if any, the starting weights from `init_from` (on a
  resume only the frozen trees: a parameterisation's base and 'policy' copies, from the step the run first read),
  and returns the step it starts at. A start with no checkpoint is fresh: metrics rows of an earlier start are
  dropped."""
  init = exp.run.spec.init_from
  restored = ckpt.restore_latest(checkpoint.abstract(_unfrozen(exp.state), _unfrozen(exp.run.state_shardings)),
                                 exp.stream, fresh=_unfrozen(exp.state))
  resumed = -1 if restored is None else restored[1]
  dropped = metrics_lib.truncate_after(workdir, resumed) if jax.process_index() == 0 else 0
  if restored is not None:
    exp.state = restored[0].replace(base=exp.state.base, frozen=exp.state.frozen)
    logging.info("resuming from step %d (%s/%d)%s", resumed, ckpt.directory, resumed,
                 f"; dropped {dropped} metrics rows logged after it" if dropped else "")
  elif dropped:
    logging.info("no checkpoint to resume: starting at step 0; dropped the %d metrics rows of an earlier start",
                 dropped)
  copies = frozen.policy_roles(exp.run.frozen_plan)
  source = identity.source(exp.run.spec, workdir)
  if source and (restored is None or exp.state.base is not None or copies):  # what a resume still reads from it
    init_from.check_tokenizer(source, tokenizer)
    exp.state, start = init_from.load(exp.state, exp.run.state_shardings, source, init.step,
                                      frozen_only=restored is not None, copies=copies,
                                      base_name=exp.run.model.adapter.title if exp.run.model.adapter else "")
    exp.state = exp.state.replace(frozen={**exp.state.frozen, **frozen.policy_copies(exp.run.frozen_plan, start)})
  if restored is None and any(p.reads == "inputs" for p in exp.run.frozen_plan.parts):
    exp.state = init_from.start_parts(exp.state, exp.run.state_shardings, exp.run.frozen_plan.parts, source,
                                      init.step, tokenizer)
  exp.state = exp.run.quantize(exp.state)
  return int(jax.device_get(exp.state.step))


def _lineage(spec: Spec, workdir: str, rows_per_example: int) -> dict:
  """The run's lineage.json: by then a bootstrapped base (WORKDIR/base) exists and the frozen runs are directories."""
  init = spec.init_from
  source = identity.source(spec, workdir)
  parent = None
  if source:
    parent = {"workdir": os.path.abspath(source),
              "step": int(os.path.basename(init_from.checkpoint_dir(source, init.step)))}
  runs = [{"role": r.role, "workdir": os.path.abspath(r.workdir), "step": r.step} for r in spec.frozen_runs]
  stage = spec.head_name + (f"+{spec.adapter.title.lower()}" if spec.adapter is not None else "")
  d = spec.data
  sources = [(part["source"], f"train:{name}") for name, part in sorted(d.mixture.items())] if d.mixture else \
      [(d.source, "train")]
  sources += [(source, f"eval:{name}") for name, source in sorted(spec.eval.sources.items())]
  t = spec.train
  return lineage.record(stage, sources, parent, runs, t.batch_size * t.seq_len * rows_per_example)


def _evaluates(spec: Spec, step: int) -> bool:
  every = spec.eval.every_steps
  return bool(every) and (step % every == 0 or step == spec.train.steps)


class _Reporter:
  """Turns each step's device metrics into metrics.jsonl rows and console lines, one step behind the device, and
  applies the run's stop rules (non-finite losses, loss spikes)."""

  def __init__(self, exp: Experiment, workdir: str, ckpt: checkpoint.Checkpointer):
    self.spec, self.exp, self.ckpt = exp.run.spec, exp, ckpt
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    self.peak_flops, source = peak.total_peak_flops(jax.devices(), self.spec.log.peak_flops)
    logging.info("peak %.1f TFLOP/s over %d device(s) (%s)", self.peak_flops / 1e12, jax.device_count(), source)
    t = self.spec.train
    self.tokens_per_step = t.batch_size * t.seq_len * exp.run.layout.rows_per_example
    self.skipped = self.spikes = self.nonfinite = 0
    self.window_start, self.window_steps, self.window_end = time.perf_counter(), 0, (0, 0.0)
    self.window_rollout = 0.0  # seconds of the window's RL rollouts (host-side sampling and scoring)

  def logs(self, step: int) -> bool:
    """Whether `step` writes a row with the throughput (a spike writes one too, found only when it is read)."""
    return step % self.spec.log.every_steps == 0 or step == self.spec.train.steps or _evaluates(self.spec, step)

  def close_window(self, step: int, metrics: dict) -> None:
    """Called before the next step is dispatched: on a logged step, waits for its device work and ends the window
    there. A later clock is wrong where dispatch itself runs the step (CPU): it would hold the next step's work."""
    if self.logs(step):
      jax.block_until_ready(metrics)
      self.window_end = (step, time.perf_counter())

  @contextlib.contextmanager
  def untimed(self, metrics: dict):
    """Keeps what runs inside (an evaluation, a checkpoint copy) out of the throughput window. It first waits for
    the step whose `metrics` these are: that wait is the step's time, and stays in the window."""
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    yield
    self.window_start += time.perf_counter() - t0

  def evaluate_start(self, state: train_state.TrainState) -> None:
    m = {k: float(v) for k, v in jax.device_get(self.exp.run.evaluate(state)).items()}
    self.writer.write(0, m)
    logging.info("step 0 (before training): %s", " | ".join(f"{k} {v:.4f}" for k, v in m.items()
                                                             if k.startswith("eval_loss")))
    self.window_start = time.perf_counter()

  def finish(self, step: int, metrics: dict) -> None:
    jax.block_until_ready(metrics)  # every device's copy: reading one copy may end before another device's work
    now = self.window_end[1] if self.window_end[0] == step else time.perf_counter()
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self.window_steps += 1
    self.window_rollout += m.get("rollout_seconds", 0.0)
    total = self.spec.train.steps
    if not self.logs(step) and not m.get("spike"):
      return self._check(step, m)
    step_seconds = (now - self.window_start) / self.window_steps
    if self.exp.rollout is not None:  # the split of an RL step's time: sampling and scoring vs the train step
      m["rollout_seconds_per_step"] = self.window_rollout / self.window_steps
      m["train_seconds_per_step"] = step_seconds - m["rollout_seconds_per_step"]
    self.window_start, self.window_steps, self.window_rollout = now, 0, 0.0
    m["tokens_per_sec"] = self.tokens_per_step / step_seconds
    if self.peak_flops:
      m["mfu"] = self.exp.run.flops_per_token * m["tokens_per_sec"] / self.peak_flops
    self.writer.write(step, m)
    self.writer.console(step, total, m, (total - step) * step_seconds)
    self._check(step, m)

  def _check(self, step: int, m: dict) -> None:
    t = self.spec.train
    if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
      if not t.skip_nonfinite:
        raise NonFiniteLossError(
            f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite. Lower optimizer.lr, raise "
            "optimizer.warmup_steps, or set train.skip_nonfinite=True to skip such steps.")
      self.skipped += 1
      self.nonfinite += 1
      if self.nonfinite > t.spike_skips:
        raise NonFiniteLossError(
            f"step {step}: loss={m['loss']} is not finite for the {self.nonfinite}th step in a row (more than "
            f"train.spike_skips={t.spike_skips}): the params no longer train. Lower optimizer.lr or raise "
            "optimizer.warmup_steps, and resume from a checkpoint before it (or start over).")
      logging.warning("step %d: non-finite loss %s, update skipped (%d so far)", step, m["loss"], self.skipped)
      return
    self.nonfinite = 0
    self.spikes = self.spikes + 1 if m.get("spike") else 0
    if not self.spikes:
      return
    what = (f"step {step}: loss {m['loss']:.4g} is a spike (median of the last accepted losses {m['loss_median']:.4g}, "
            f"train.spike_factor={t.spike_factor})")
    if self.spikes <= t.spike_skips:
      logging.warning("%s; update skipped (%d in a row, at most train.spike_skips=%d)", what, self.spikes,
                      t.spike_skips)
      return
    newest = self.ckpt.manager.latest_step()
    raise DivergenceError(
        f"{what}, {self.spikes} in a row: the run diverges. Lower optimizer.lr or raise optimizer.warmup_steps "
        f"(or change data.seed), or raise train.spike_factor / train.spike_skips (train.spike_factor=0 turns the "
        f"guard off); {f'the newest checkpoint is step {newest}: ' if newest else ''}run the same command to resume.")

  def close(self) -> None:
    self.writer.close()


def _save_due(exp: Experiment, ckpt: checkpoint.Checkpointer, stop: preemption.Watcher, step: int,
              start: int) -> tuple[bool, bool]:
  """(preempted or told to stop after this step, due a checkpoint)."""
  boundary = exp.boundary(step)  # an RL run checkpoints and stops only where a rollout's steps end
  preempted = boundary and (stop.requested(step) or step - start >= exp.run.spec.train.stop_after > 0)
  return preempted, preempted or step == exp.run.spec.train.steps or (boundary and ckpt.due(step))


def _run_steps(exp: Experiment, ckpt: checkpoint.Checkpointer, reporter: _Reporter, stop: preemption.Watcher,
               start: int, resolved: dict, digests) -> int:
  """Steps start+1 .. train.steps (or until preempted); returns the last step taken."""
  spec, state, pending, step = exp.run.spec, exp.state, None, start
  try:
    for step in range(start + 1, spec.train.steps + 1):
      try:
        batch, made = exp.batch(state, step)
      except preemption.Interrupted:  # a signal while a rollout waited: the state is the last step's
        step -= 1
        if step > start and exp.boundary(step) and ckpt.manager.latest_step() != step:
          ckpt.save(step, _unfrozen(state), exp.stream, resolved)
        stop.signalled = True
        break
      if digests is not None:
        digests.write(step, batch)
      state, metrics = exp.run.step(state, batch)
      metrics = {**metrics, **made}
      if pending is not None:
        reporter.finish(*pending)
      if _evaluates(spec, step):
        with reporter.untimed(metrics):
          metrics = {**metrics, **jax.device_get(exp.run.evaluate(state))}
      pending = (step, metrics)
      preempted, save = _save_due(exp, ckpt, stop, step, start)
      if save:
        with reporter.untimed(metrics):
          ckpt.save(step, _unfrozen(state), exp.stream, resolved)  # copied to the host, written in the background
      reporter.close_window(step, metrics)
      if preempted:
        break
    if pending is not None:
      reporter.finish(*pending)
  finally:
    exp.state = state
  return step


def train(config: ml_collections.ConfigDict, workdir: str) -> Experiment | None:
  """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one; returns the experiment (its
  `state` holds the final params), or None when it stopped in a bootstrap. SIGTERM or SIGINT saves a checkpoint at
  the next step boundary and returns early."""
  spec = spec_lib.resolve(config)  # every value checked, once
  checks.check_run(spec, workdir)  # the run directory and the inputs: before any work
  lock = workdir_lock.Lock(workdir, enabled=jax.process_index() == 0)  # one run per directory
  if os.path.isdir(workdir):
    lock.acquire()
  try:
    return _train(spec, workdir, lock)
  except _Stopped as e:
    logging.info("%s", e)
    return None
  finally:
    lock.release()


def _prepare(spec: Spec, workdir: str, lock: workdir_lock.Lock) -> tuple[Spec, dict | None]:
  """Runs the bootstraps the run needs and pins its frozen models' steps; returns (the spec, its stored identity)."""
  stored = identity.read(workdir)
  if stored is not None:  # before a bootstrap writes into the run directory
    identity.check(workdir, stored, identity.of(spec, workdir, None))
  if any(r.bootstrap and not r.workdir for r in spec.frozen_runs) or spec.init_from.bootstrap:
    lock.acquire()  # a bootstrap writes into the run directory
  for run in spec.frozen_runs:
    if run.bootstrap and not run.workdir:
      spec = spec.with_frozen(run.role, workdir=_bootstrap(run.bootstrap, workdir, run.key))
  init = spec.init_from
  steps_dir = os.path.join(workdir, "checkpoints")
  resuming = os.path.isdir(steps_dir) and any(d.isdigit() for d in os.listdir(steps_dir))
  reads_base = spec.adapter is not None or any(f.source == "policy" for f in spec.head.frozen)
  if init.bootstrap and not init.workdir and (not resuming or reads_base):
    _bootstrap(init.bootstrap, workdir, init_from.BOOTSTRAPPED)
  return identity.pin(spec, workdir, stored), stored


def _check_identity(exp: Experiment, workdir: str, stored: dict | None, ckpt: checkpoint.Checkpointer) -> dict:
  """Refuses a start that would continue another run, or one that is past train.steps, before anything in the run
  directory is written; returns the run's identity."""
  spec = exp.run.spec
  current = identity.of(spec, workdir, tokenizers.tokenizer_id(exp.run.tokenizer))
  if stored is not None:
    identity.check(workdir, stored, current)
  newest = ckpt.manager.latest_step()
  if newest is not None and newest > spec.train.steps:
    raise UserError(f"train.steps={spec.train.steps} is below the newest checkpoint's step {newest} in "
                    f"{ckpt.directory}: raise train.steps above {newest} to train on, or start a new --workdir from "
                    f"it with --config.init_from.workdir={workdir}.")
  return current


def _train(spec: Spec, workdir: str, lock: workdir_lock.Lock) -> Experiment:
  spec, stored = _prepare(spec, workdir, lock)
  exp = build(spec)
  lock.acquire()  # before the first write into the run directory
  ckpt = checkpoint.Checkpointer(workdir, spec.checkpoint)
  try:
    current = _check_identity(exp, workdir, stored, ckpt)
    tokenizer = {"id": tokenizers.tokenizer_id(exp.run.tokenizer), "vocab_size": exp.run.tokenizer.vocab_size}
    start = _starting_state(exp, ckpt, workdir, tokenizer)
  except BaseException:
    ckpt.close()
    raise
  resolved = _write_run_files(exp, workdir, tokenizer)  # once the start is sure: a refused one writes nothing
  if stored is None and jax.process_index() == 0:
    if start > 0:
      logging.info("%s has no %s (a run of an older fmjax): this start's settings are recorded as the run's", workdir,
                   identity.FILE)
    identity.write(workdir, current)
  if jax.process_index() == 0:  # after _starting_state: a bootstrapped base exists by then
    lineage.write(workdir, _lineage(spec, workdir, exp.run.layout.rows_per_example))
  reporter = _Reporter(exp, workdir, ckpt)
  digests = metrics_lib.BatchDigests(workdir) if spec.log.batch_digests else None
  stop = preemption.Watcher()
  step = start
  try:
    if spec.eval.at_start and spec.eval.every_steps and start == 0:  # the starting point, e.g. a CPT base
      reporter.evaluate_start(exp.state)
    step = _run_steps(exp, ckpt, reporter, stop, start, resolved, digests)
  finally:
    try:
      ckpt.wait()  # may raise: a background save that failed (a full disk)
    finally:
      ckpt.close()
      stop.restore()
      reporter.close()
      if digests is not None:
        digests.close()
      if hasattr(exp.stream, "close"):
        exp.stream.close()  # stops grain's worker processes, if any
  if step < spec.train.steps:
    saved = f"saved step {step} to {ckpt.directory}" if step > 0 else "nothing trained yet"
    logging.info("stopped (%s): %s; run the same command again to resume",
                 stop.reason if stop.signalled else "train.stop_after", saved)
  else:
    logging.info("done: %d steps in %s", spec.train.steps - start, workdir)
  return exp
