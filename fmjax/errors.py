"""User errors and the one boundary that reports them.

A `UserError` is bad input — a config value, a data file, a tokenizer, a checkpoint, a workdir, an `init_from` or a
teacher — and its message names the value and the fix. `fmjax.main` and every tool run under `cli`, which prints
`fmjax: error: <message>` on one line and exits 2; a traceback only with `--debug` (or FMJAX_DEBUG=1).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable

EXIT_CODE = 2  # a user error: nothing ran (or nothing more), no checkpoint was touched
DEBUG_ENV = "FMJAX_DEBUG"


class UserError(ValueError):
  """Bad input; the message says what is wrong, which key or file, and the fix."""


# Raised by the standard library for a path the user gave; their message names the path.
_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
# A disk that is full, over quota or read-only: the machine's state, not a bug; the fix is the same everywhere.
STORAGE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _user_os_error(e: BaseException) -> bool:
  return isinstance(e, _OS_ERRORS) or (isinstance(e, OSError) and e.errno in STORAGE)


def debug_requested(argv: list[str] | None = None) -> bool:
  argv = sys.argv if argv is None else argv
  return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def message(e: BaseException) -> str:
  """One line: the error's message with its lines joined."""
  text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
  if _user_os_error(e) and getattr(e, "filename", None):
    text = f"{e.strerror or type(e).__name__}: {e.filename!r}"
  if isinstance(e, OSError) and e.errno in STORAGE:
    text += "; free space (or make it writable) or use another directory, and run the same command again"
  return text or type(e).__name__


def report(e: BaseException) -> None:
  """Prints the one-line error and exits with EXIT_CODE."""
  sys.stderr.write(f"fmjax: error: {message(e)}\n")
  sys.stderr.flush()
  raise SystemExit(EXIT_CODE)


def cli(main: Callable[..., object]) -> Callable[..., object]:
  """Wraps an absl `main(argv)` (or any entry) so user errors become one line and exit 2, unless debugging."""

  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except (UserError, *_OS_ERRORS) as e:
      if debug_requested():
        raise
      report(e)
    except Exception as e:  # absl's app.UsageError (e.g. stray positional arguments) is a user error too
      if not (type(e).__name__ == "UsageError" or _user_os_error(e)) or debug_requested():
        raise
      report(e)

  wrapped.__name__, wrapped.__doc__ = getattr(main, "__name__", "main"), main.__doc__
  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config (a ValueError raised by a config file's `get_config`, a key
  that does not exist, a value of the wrong type) reported as one line."""
  from absl import flags

  try:
    rest = flags.FLAGS([a for a in argv if a != "--debug"])
    for name in flags.FLAGS:  # ml_collections defers a config file that failed to load until it is read
      flag = flags.FLAGS[name]
      if type(flag).__name__ == "_ConfigFlag" and type(flag.value).__name__ == "_ErrorConfig":
        raise UserError(f"--{name}={flag.serialize().split('=', 1)[-1]}: the config file does not exist or cannot "
                        "be read; pass a file such as configs/pretrain.py[:variant].")
    return rest
  except (flags.Error, UserError, ValueError, AttributeError, KeyError, *_OS_ERRORS) as e:
    if debug_requested(argv):
      raise
    report(_flag_error(argv, e))


def _flag_error(argv: list[str], e: BaseException) -> BaseException:
  """What to report for an exception raised while parsing flags."""
  cause = _root_cause(e)
  if isinstance(cause, KeyError):  # an override of a key the config does not have
    key = str(cause.args[0]).strip("'\"") if cause.args else ""
    arg = next((a for a in argv if a.startswith("--config.") and f".{key}" in a.split("=")[0]), key)
    return UserError(f"{arg}: the config has no key {key!r}; {_section_keys(argv, arg)}check the spelling (every "
                     "section's keys and what they do: docs/config-keys.md).")
  if cause is not e:  # a config file's own error, which ml_collections re-raises with its traceback as text
    flag = str(e).split(":", 1)[0]
    return UserError(f"{flag.removeprefix('flag ')}: {message(cause)}")
  return e


def _section_keys(argv: list[str], arg: str) -> str:
  """'objective (head 'lm') has: z_loss; ' for an override --config.objective.KEY=..., naming the keys the
  config's section does have (the objective section's are its head's options). The config file is loaded again:
  the flag holds no value once an override failed."""
  from absl import flags

  parts = arg.removeprefix("--config.").split("=")[0].split(".")
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  try:
    section = flags.FLAGS["config"].parser.parse(spec)[parts[0]]
    keys = ", ".join(sorted(k for k in section.keys() if k != "name"))
  except (KeyError, AttributeError, TypeError, IndexError):
    return ""
  head = f" (head {section['name']!r})" if parts[0] == "objective" and "name" in section else ""
  return f"{parts[0]}{head} has: {keys or 'no options'}; "


def _root_cause(e: BaseException) -> BaseException:
  """The innermost exception `e` was raised from or while handling (`raise ... from None` ends the chain)."""
  while True:
    inner = e.__cause__ if e.__cause__ is not None else None if e.__suppress_context__ else e.__context__
    if inner is None:
      return e
    e = inner


class ArgumentParser(argparse.ArgumentParser):
  """argparse for the tools: a bad or missing flag is one line, `fmjax: error: PROG: ...` (exit 2), and `--debug`
  is accepted (every sub-command's parser is one of these too)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.add_argument("--debug", action="store_true", help="on an error, show its traceback")

  def error(self, message: str):
    if debug_requested():
      super().error(message)
    report(UserError(f"{self.prog}: {message}; see --help."))
