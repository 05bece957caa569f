"""Checkpoints in WORKDIR/checkpoints/<step>/: train state, data iterator position and resolved config (orbax).

orbax writes a checkpoint into a temporary directory and renames it when every item is complete, so a save killed
half-way never shows up as a step; then the checksums of its files are written (fmjax/train/integrity.py), and a
restore verifies them, walking back from the newest step past damaged ones. Saves are asynchronous: the host copies
the state off the device and the next steps run while it writes.
Keep policy: the newest `checkpoint.keep` plus every step that is a multiple of `checkpoint.keep_every`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import threading
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from fmjax import errors
from fmjax.errors import UserError
from fmjax.train import integrity

class OrbaxNoise(logging.Filter):
  """Drops orbax's log records that fmjax reports itself: tracebacks its background threads log for a failure that
  reaches the caller anyway (a full disk: one line then), and its notice that `state/` has no step metadata file
  (it never has). `--debug` keeps them."""

  def filter(self, record: logging.LogRecord) -> bool:
    if errors.debug_requested() or f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    return record.levelno < logging.ERROR and not record.getMessage().startswith("Metadata file does not exist")


def quiet_orbax() -> None:
  """Installs `OrbaxNoise` on absl's logger (where orbax logs), once, for the rest of the process: orbax's threads
  may log after a checkpointer closes."""
  target = logging.getLogger("absl")
  if not any(isinstance(f, OrbaxNoise) for f in target.filters):
    target.addFilter(OrbaxNoise())


def abstract(state: Any, shardings: Any) -> Any:
  """Shapes, dtypes and target shardings of `state`: what a restore fills in, re-sharding onto this mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class Checkpointer:
  """Decides when to save, saves, and restores the newest readable checkpoint."""

  def __init__(self, workdir: str, cfg: Any):
    quiet_orbax()
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    # Here, not in orbax's background threads (which a start refused at once would outlive): the directory, and the
    # removal of a save cut short by a kill or a full disk.
    os.makedirs(self.directory, exist_ok=True)
    if jax.process_index() == 0:
      for name in os.listdir(self.directory):
        if ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    self.every_steps, self.every_seconds = cfg.every_steps, 60.0 * cfg.every_minutes
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, keep_period=cfg.keep_every or None,
                                           enable_async_checkpointing=cfg.async_save, create=False)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
    self.last_save = time.monotonic()
    self._unsealed: list[int] = []  # saved steps whose checksums are not written yet
    self._sealers: list[threading.Thread] = []

  def due(self, step: int) -> bool:
    """A step-period or time-interval save is due after `step` (the same answer on every process)."""
    self.seal_committed()
    due = bool(self.every_steps) and step % self.every_steps == 0
    if self.every_seconds and not due:
      late = time.monotonic() - self.last_save >= self.every_seconds
      if jax.process_count() > 1:  # clocks differ: process 0 decides for everyone
        from jax.experimental import multihost_utils

        late = bool(multihost_utils.broadcast_one_to_all(late))
      due = late
    return due

  def save(self, step: int, state: Any, data_iter: Any, record: dict) -> None:
    with self._writing(step):
      self.manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
          config=ocp.args.JsonSave(record)))
    self._unsealed.append(step)
    self.last_save = time.monotonic()
    self.seal_committed()

  def seal_committed(self) -> None:
    """Starts writing the checksums of each saved step orbax has committed (process 0, in the background)."""
    if not self._unsealed or self.manager.is_saving_in_progress():
      return
    steps, self._unsealed = self._unsealed, []
    if jax.process_index() != 0:
      return
    for step in steps:
      path = os.path.join(self.directory, str(step))
      thread = threading.Thread(target=self._seal, args=(path,), name=f"fmjax-seal-{step}", daemon=True)
      thread.start()
      self._sealers.append(thread)

  @staticmethod
  def _seal(path: str) -> None:
    try:
      integrity.seal(path)
    except FileNotFoundError:
      pass  # the keep policy deleted the step meanwhile
    except OSError as e:
      logging.warning("could not write the checksums of checkpoint %s (%s); it will be restored unverified", path, e)

  @contextlib.contextmanager
  def _writing(self, step: int):
    """A write that fails for want of space or permission is one line naming the directory and the fix."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore wrap the OS error in their own types
      cause = _storage_problem(e)
      if cause is None:
        raise
      partial = [n for n in os.listdir(self.directory) if ".orbax-checkpoint-tmp" in n]
      failed = partial[0].partition(".")[0] if partial else step
      if jax.process_index() == 0:
        for name in partial:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      newest = [s for s in self.manager.all_steps() if str(s) != str(failed)]
      raise UserError(f"could not write checkpoint {failed} in {self.directory}: {cause}. Free space (or make it "
                      "writable) and run the same command again: it resumes from "
                      f"{f'step {max(newest)}' if newest else 'the start'}.") from e

  def restore_latest(self, target: Any, data_iter: Any, fresh: Any = None) -> tuple[Any, int] | None:
    """(state, step) of the newest intact checkpoint, with `data_iter` moved to its position; None if there is none.
    A field of the state (a dataclass) that the checkpoint predates takes its value from `fresh`.

    A step whose files fail their checksums (`integrity.verify`) is damage: the one before it is used, with one
    warning, and the damaged step is renamed `<step>.corrupt.<time>` (kept for inspection, out of the way of a new
    save). Any other failure to restore is not damage: it is raised, and nothing is moved."""
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      path = os.path.join(self.directory, str(step))
      saved = self._saved_process_count(step)
      if saved is not None and saved != jax.process_count():  # not damage: never move it out of the way
        raise UserError(
            f"checkpoint {path} was written by {saved} processes and this run has {jax.process_count()}: the data "
            f"iterator position is stored per process. Resume with {saved} processes, or start a new --workdir from "
            f"its params with --config.init_from.workdir={os.path.dirname(self.directory)} "
            f"--config.init_from.step={step}.")
      problem = integrity.verify(path)
      if problem is not None:
        damaged.append((path, problem))
        continue
      if not integrity.sealed(path):
        logging.warning("checkpoint %s has no checksums (saved by an older fmjax, or killed before they were "
                        "written): restoring it unverified", path)
      item, missing = self._saved_fields(step, target, fresh)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(item), data=grain.checkpoint.CheckpointRestore(data_iter)))
      except Exception as e:  # noqa: BLE001 - its files are intact: this run cannot read it, which is no damage
        raise UserError(f"checkpoint {path} cannot be restored into this run ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:300]}); nothing was moved. Resume it with the settings "
                        "it was saved with, or start over in another --workdir.") from e
      if missing:
        logging.info("checkpoint %s was written before the state had %s (an older fmjax); fresh values used", path,
                     ", ".join(missing))
      self._set_aside(damaged, step)
      return (fresh.replace(**restored.state) if missing else restored.state), step
    if damaged:
      what = "; ".join(f"{os.path.basename(p)}: {w}" for p, w in damaged)
      raise UserError(f"every checkpoint in {self.directory} is damaged ({what}); nothing to resume. To start over, "
                      f"move it away (mv {self.directory} {self.directory}.damaged) and run the same command.")
    return None

  def _set_aside(self, damaged: list[tuple[str, str]], step: int) -> None:
    """Warns once and renames the damaged steps newer than the resumed `step`."""
    if not damaged:
      return
    logging.warning("checkpoint%s %s failed verification (%s); resuming from step %d instead, the damaged one%s "
                    "renamed <step>.corrupt.<time>", "s" * (len(damaged) > 1),
                    ", ".join(p for p, _ in damaged), "; ".join(w for _, w in damaged), step,
                    "s" * (len(damaged) > 1))
    if jax.process_index() == 0:
      for path, _ in damaged:
        os.replace(path, f"{path}.corrupt.{int(time.time())}")
    if jax.process_count() > 1:  # the others must not re-list the steps before process 0 has moved them
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("fmjax checkpoint: damaged steps moved")
    self.manager.reload()

  def _saved_fields(self, step: int, target: Any, fresh: Any) -> tuple[Any, list[str]]:
    """(what to restore, the target's fields the checkpoint lacks: written before they existed)."""
    if fresh is None or not dataclasses.is_dataclass(target):
      return target, []
    try:
      saved = set(self.manager.item_metadata(step)["state"].keys())
    except Exception:  # noqa: BLE001 - no metadata to compare: restore as is (a mismatch is reported then)
      return target, []
    names = [f.name for f in dataclasses.fields(target)]
    missing = [n for n in names if n not in saved]
    return ({n: getattr(target, n) for n in names if n in saved} if missing else target), missing

  def _saved_process_count(self, step: int) -> int | None:
    """How many processes wrote checkpoint `step` (grain names each data file process_<i>-of-<n>.json); None if
    its data directory does not say."""
    try:
      names = os.listdir(os.path.join(self.directory, str(step), "data"))
    except OSError:
      return None
    counts = {int(m.group(1)) for n in names if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", n))}
    return counts.pop() if len(counts) == 1 else None

  def wait(self) -> None:
    """Waits for the background saves and their checksums."""
    with self._writing(self.manager.latest_step() or 0):
      self.manager.wait_until_finished()
    self.seal_committed()
    for thread in self._sealers:
      thread.join()
    self._sealers = []

  def close(self) -> None:
    self.manager.close()


def _storage_problem(e: BaseException | None) -> str | None:
  """'no space left on device' and the like, if `e` or an exception it wraps is one (by errno or by message)."""
  codes, seen = (*errors.STORAGE, errno.EACCES), set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in codes:
      return os.strerror(e.errno).lower()
    text = str(e).lower()
    for code in codes:
      if os.strerror(code).lower() in text:
        return os.strerror(code).lower()
    e = e.__cause__ or e.__context__
  return None
