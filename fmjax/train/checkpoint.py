"""Checkpoints in WORKDIR/checkpoints/<step>/: train state, data iterator position and resolved config (orbax).

orbax writes a checkpoint into a temporary directory and renames it when every item is complete, so a save killed
half-way never shows up as a step; restoring walks back from the newest step and skips one that cannot be read,
naming it. Saves are asynchronous: the host copies the state off the device and the next steps run while it writes.
Keep policy: the newest `checkpoint.keep` plus every step that is a multiple of `checkpoint.keep_every`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from fmjax.errors import UserError

def abstract(state: Any, shardings: Any) -> Any:
  """Shapes, dtypes and target shardings of `state`: what a restore fills in, re-sharding onto this mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class Checkpointer:
  """Decides when to save, saves, and restores the newest readable checkpoint."""

  def __init__(self, workdir: str, cfg: Any):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.every_steps, self.every_seconds = cfg.every_steps, 60.0 * cfg.every_minutes
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, keep_period=cfg.keep_every or None,
                                           enable_async_checkpointing=cfg.async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
    self.last_save = time.monotonic()

  def due(self, step: int) -> bool:
    """A step-period or time-interval save is due after `step` (the same answer on every process)."""
    due = bool(self.every_steps) and step % self.every_steps == 0
    if self.every_seconds and not due:
      late = time.monotonic() - self.last_save >= self.every_seconds
      if jax.process_count() > 1:  # clocks differ: process 0 decides for everyone
        from jax.experimental import multihost_utils

        late = bool(multihost_utils.broadcast_one_to_all(late))
      due = late
    return due

  def save(self, step: int, state: Any, data_iter: Any, record: dict) -> None:
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(record)))
    self.last_save = time.monotonic()

  def restore_latest(self, target: Any, data_iter: Any, fresh: Any = None) -> tuple[Any, int] | None:
    """(state, step) of the newest readable checkpoint, with `data_iter` moved to its position; None if none.
    A field of the state (a dataclass) that the checkpoint predates takes its value from `fresh`.

    An unreadable checkpoint is renamed `<step>.unreadable` (kept for inspection, out of the way of a new save)."""
    unreadable, found = [], None
    for step in sorted(self.manager.all_steps(), reverse=True):
      saved = self._saved_process_count(step)
      if saved is not None and saved != jax.process_count():  # not damage: never move it out of the way
        raise UserError(
            f"checkpoint {self.directory}/{step} was written by {saved} processes and this run has "
            f"{jax.process_count()}: the data iterator position is stored per process. Resume with {saved} "
            f"processes, or start a new --workdir from its params with "
            f"--config.init_from.workdir={os.path.dirname(self.directory)} --config.init_from.step={step}.")
      try:
        item, missing = self._saved_fields(step, target, fresh)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(item), data=grain.checkpoint.CheckpointRestore(data_iter)))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, never fatal
        path = os.path.join(self.directory, str(step))
        logging.warning("checkpoint %s is unreadable (%s: %s); moving it to %s.unreadable and trying the one "
                        "before it", path, type(e).__name__, (str(e).splitlines() or [""])[0][:300], path)
        unreadable.append(path)
        continue
      found = (fresh.replace(**restored.state) if missing else restored.state, step)
      if missing:
        logging.info("checkpoint %s/%d was written before the state had %s (an older fmjax); fresh values used",
                     self.directory, step, ", ".join(missing))
      break
    if unreadable:
      if jax.process_index() == 0:
        for path in unreadable:
          os.replace(path, f"{path}.unreadable.{int(time.time())}")
      if jax.process_count() > 1:  # the others must not re-list the steps before process 0 has moved them
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fmjax checkpoint: unreadable steps moved")
      self.manager.reload()
    return found

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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
