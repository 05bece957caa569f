"""Preemption: SIGTERM (what TPU VMs, GKE and Slurm send before taking a machine) or Ctrl-C → stop at a step boundary.

On one process a signal handler sets a flag that the loop reads after each step. On several processes they must
agree on the step, so the loop asks JAX's preemption sync point instead: `jax.distributed.initialize` installs a
SIGTERM notifier that tells the coordination service (which TPU pods also notify of maintenance), and every process
gets the same answer at the same step. A Python handler would replace that notifier, so none is installed then.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[str] = []  # names of the signals this process's Watcher received


class Interrupted(Exception):
  """Raised by work that waits (a rollout's reward functions) when a stop was requested: the loop saves and stops."""


def signalled() -> bool:
  """Whether this process was told to stop (SIGTERM or SIGINT) since its Watcher was installed."""
  return bool(_received)


def _sync_manager() -> bool:
  """Whether JAX's preemption sync manager runs (jax.distributed initialised with it)."""
  try:
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):  # another JAX layout: assume it does when there are several processes
    return jax.process_count() > 1


class Watcher:
  """Install once per run; `requested(step)` says whether to checkpoint and stop after `step`."""

  def __init__(self):
    self.signalled = False
    self._previous = {}
    _received.clear()
    self._synced = jax.process_count() > 1 and _sync_manager()
    self.reason = "preemption notice" if self._synced else "SIGTERM"
    if jax.process_count() > 1 and not self._synced:
      logging.warning("JAX's preemption sync manager is not running: a SIGTERM stops this process without a "
                      "checkpoint (processes could not agree on a step to save).")
    elif not self._synced and threading.current_thread() is threading.main_thread():  # handlers: main thread only
      self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self.signalled:  # a second Ctrl-C: stop now, as Python would
      raise KeyboardInterrupt
    if not self.signalled:
      self.reason = name
      logging.warning("%s: saving a checkpoint at the next step boundary, then exiting%s", name,
                      " (Ctrl-C again to stop at once, without one)" if signum == signal.SIGINT else "")
    self.signalled = True
    _received.append(name)

  def requested(self, step: int) -> bool:
    if self._synced and not self.signalled:
      from jax.experimental import multihost_utils

      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning("preemption notice: every process saves a checkpoint at step %d, then exits", step)
        self.signalled = True
    return self.signalled

  def restore(self) -> None:
    """Puts back the SIGTERM and SIGINT handlers that were there before."""
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}
