"""One run per run directory: an exclusive lock on WORKDIR/.lock, held by process 0 while it trains.

The operating system drops the lock when its holder exits, however it exits (a kill included), so a stale lock
never blocks a resume; the file keeps the holder's pid, host and command for the message a second run gets.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time

from fmjax.errors import UserError

FILE = ".lock"


class Lock:
  """Held from construction until `release` (or the process's end)."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, FILE)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "another process"
      os.close(self._fd)
      raise UserError(f"--workdir={workdir} is in use by another run ({holder}); wait for it to end or stop it, or "
                      "use another --workdir.") from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, (f"pid {os.getpid()} on {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n").encode(), 0)

  def release(self) -> None:
    if self._fd is None:
      return
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

