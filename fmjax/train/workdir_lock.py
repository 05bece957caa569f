"""One run per run directory: an exclusive lock on WORKDIR/.lock, held by process 0 from its first write.

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
  """`acquire` takes it (once; it makes the directory), `release` gives it back; both are no-ops when not `enabled`
  (processes other than 0). A start refused before it writes anything never acquires it: the directory of a new run
  is not even made."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir, self.enabled, self._fd = workdir, enabled, None

  def acquire(self) -> None:
    if not self.enabled or self._fd is not None:
      return
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(os.path.join(self.workdir, FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise UserError(f"--workdir={self.workdir} is in use by another run ({holder}); wait for it to end or stop it, "
                      "or use another --workdir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                   f"{' '.join(sys.argv)}\n").encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
