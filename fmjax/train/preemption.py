"""Preemption: SIGTERM (what TPU VMs, GKE and Slurm send before taking a machine) → stop at a step boundary.

On one process the signal handler sets a flag that the loop reads after each step. On several processes they must
agree on the step, so the loop asks JAX's preemption sync point (the coordination service, which TPU pods notify
and which also sees a SIGTERM sent to any process) instead.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax


class Watcher:
  """Install once per run; `requested(step)` says whether to checkpoint and stop after `step`."""

  def __init__(self):
    self.signalled = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():  # handlers can only be set from the main thread
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    if not self.signalled:
      logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
    self.signalled = True

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      try:
        self.signalled |= bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # no preemption sync manager (jax.distributed not initialised with it)
        pass
    return self.signalled

  def restore(self) -> None:
    """Puts back the SIGTERM handler that was there before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
