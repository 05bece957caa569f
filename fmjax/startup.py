"""Process start-up for fmjax's entry points: the memory allocator, the JAX platform to use, and a readable run log.

`select_platform()` must run before JAX creates a backend (before the first `jax.devices()`, jit or array): it is
the first thing `fmjax.main` does, and a tool can call it the same way.
"""

from __future__ import annotations

import glob
import inspect
import logging
import os
import sys
import time
from typing import Callable, Mapping, Sequence

from fmjax import errors

# Set on a TPU VM or GKE TPU node, read by libtpu and JAX's cluster detection; any of them: keep the TPU platform.
# (Not TPU_SKIP_MDS_QUERY or TPU_LIBRARY_PATH: `import jax` / `import libtpu` set those on any machine.)
TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "TPU_TOPOLOGY",
           "TPU_PROCESS_BOUNDS", "TPU_CHIPS_PER_PROCESS_BOUNDS", "TPU_VISIBLE_CHIPS", "MEGASCALE_COORDINATOR_ADDRESS",
           "JAX_FORCE_TPU_INIT")
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio")  # a TPU chip's device files: v2-v4 accel, v5e and later vfio
# Allocators that return freed memory to the process, not the OS, in order of preference (Debian / Ubuntu paths of
# libtcmalloc-minimal4, libgoogle-perftools4 and libjemalloc2).
ALLOCATORS = tuple(f"/usr/lib/{arch}-linux-gnu/{lib}" for lib in (
    "libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2") for arch in ("x86_64", "aarch64"))
ALLOCATOR_ENV = "FMJAX_ALLOCATOR"  # "system": keep glibc malloc; a path: preload that library
_PRELOADED = "FMJAX_ALLOCATOR_PRELOADED"  # set on the re-executed process, so it never loops


def choose_allocator(environ: Mapping[str, str], present: Sequence[str]) -> str | None:
  """The allocator library to preload into this process, or None to keep what it has.

  Why: glibc's malloc hands the large, short-lived buffers of an XLA:CPU step back to the OS and takes them again
  every step (hundreds of thousands of page faults and most of a second of system time per step of the `small`
  model on this project's benchmark machine); tcmalloc keeps them, which made that step 7% faster. So: the first
  allocator of `present` (those of ALLOCATORS on this machine), unless FMJAX_ALLOCATOR=system, another allocator is
  already preloaded, or this process is the re-executed one. FMJAX_ALLOCATOR=PATH names the library instead."""
  choice = environ.get(ALLOCATOR_ENV, "")
  preload = environ.get("LD_PRELOAD", "")
  if choice == "system" or environ.get(_PRELOADED) or "malloc" in preload:
    return None
  if choice:
    return choice
  return present[0] if present else None


def preload_allocator() -> None:
  """Re-executes this process with `choose_allocator`'s library in LD_PRELOAD (an allocator must be loaded before
  the interpreter's first malloc, so it cannot be switched in place); returns only when nothing is to change."""

  lib = choose_allocator(os.environ, [p for p in ALLOCATORS if os.path.isfile(p)])
  if lib is None:
    return
  if not os.path.isfile(lib):
    errors.report(errors.UserError(f"{ALLOCATOR_ENV}={lib!r} is not a file; name an allocator library (e.g. "
                                   f"{ALLOCATORS[0]}), or use {ALLOCATOR_ENV}=system."))
  env = {**os.environ, _PRELOADED: lib, "LD_PRELOAD": ":".join(p for p in (lib, os.environ.get("LD_PRELOAD")) if p)}
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def choose_platforms(environ: Mapping[str, str], *, configured: str | None, libtpu: bool, tpu_chips: int,
                     tpu_device_paths: Sequence[str], gpu: bool) -> str | None:
  """The JAX_PLATFORMS this process should use, or None to leave JAX's own choice alone.

  Why: with JAX_PLATFORMS unset, JAX's first backend request (`xla_bridge.backends()`) tries every registered
  backend, 'tpu' first and "quietly"; creating it loads libtpu.so, whose initialisation on a machine without a TPU
  (no TPU environment, and `import jax` told it to skip the metadata server) prints `Failed to find host bounds for
  accelerator type` and `E0000 ... unexpected worker hostname ... TPU_WORKER_HOSTNAMES` (it parses its own 'could
  not determine' placeholder as a hostname) to stderr before it fails and JAX falls back to CPU. So: 'cpu' when libtpu
  is installed and the machine has no TPU (JAX's PCI scan finds no chip, no TPU device files, no TPU VM environment)
  and no GPU. An explicit JAX_PLATFORMS (even empty) or jax_platforms setting always wins; on a TPU VM `import jax`
  itself sets jax_platforms to 'tpu,cpu'."""
  if "JAX_PLATFORMS" in environ or configured:
    return None
  if not libtpu or tpu_chips > 0 or tpu_device_paths or any(environ.get(k) for k in TPU_ENV):
    return None
  if gpu:  # naming 'cuda' would make a missing CUDA plugin fatal; leave a GPU machine to JAX
    return None
  return "cpu"


def select_platform(environ: dict[str, str] | None = None) -> str | None:
  """Applies `choose_platforms` to this machine: sets jax_platforms (and JAX_PLATFORMS, for child processes) to
  'cpu' where the TPU platform cannot work; returns what it set, or None. Does nothing once backends exist."""
  environ = os.environ if environ is None else environ
  if "JAX_PLATFORMS" in environ:  # decided already; do not even import jax here
    return None
  import jax
  from jax._src import cloud_tpu_init, hardware_utils, xla_bridge

  if xla_bridge.backends_are_initialized():
    return None
  platforms = choose_platforms(
      environ, configured=jax.config.jax_platforms, libtpu=cloud_tpu_init.get_tpu_library_path() is not None,
      tpu_chips=hardware_utils.num_available_tpu_chips_and_device_id()[0],
      tpu_device_paths=[p for pattern in TPU_DEVICE_GLOBS for p in glob.glob(pattern)],
      gpu=hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_amd_gpus(stop_at=1) != 0)
  if platforms is not None:
    environ["JAX_PLATFORMS"] = platforms
    jax.config.update("jax_platforms", platforms)
    logging.debug("JAX_PLATFORMS=%s: libtpu is installed but this machine has no TPU", platforms)
  return platforms


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class ShortInfoFormatter(logging.Formatter):
  """fmjax's own INFO lines (the progress line, the run's notes) as `HH:MM:SS message`; every other line, and every
  WARNING or worse, keeps absl's prefix (`W1201 12:00:00.123456 140000 file.py:123] `), which names its source."""

  def __init__(self, fallback: logging.Formatter | None):
    super().__init__()
    self.fallback = fallback or logging.Formatter()

  def format(self, record: logging.LogRecord) -> str:
    if record.levelno == logging.INFO and record.pathname.startswith(_PACKAGE_DIR):
      return time.strftime("%H:%M:%S ", time.localtime(record.created)) + super().format(record)
    return self.fallback.format(record)


def use_short_info_format() -> None:
  """Installs `ShortInfoFormatter` on absl's log handler (call after absl's app has started)."""
  from absl import logging as absl_logging

  handler = absl_logging.get_absl_handler().python_handler
  if not isinstance(handler.formatter, ShortInfoFormatter):
    handler.setFormatter(ShortInfoFormatter(handler.formatter))


def _drop_closed_loop_callbacks() -> None:
  """tensorstore's I/O threads report their results to orbax's asyncio loop; after a failed save or read orbax closes
  that loop, and each late result prints a `RuntimeError: Event loop is closed` traceback (an unraisable exception)
  that says nothing the one-line error does not. Those are dropped, unless debugging; every other one is shown."""
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed" and not errors.debug_requested():
      return
    previous(unraisable)

  sys.unraisablehook = hook


def run(main: Callable[..., object]) -> None:
  """Runs a tool's or fmjax.main's `main`: the allocator and the JAX platform chosen (fmjax/startup.py), then the error
  boundary: user errors (and bad flags) are one line.
  `--debug` (or FMJAX_DEBUG=1) shows the traceback instead.

  An absl `main(argv)` runs as `absl.app.run(main)` with flags parsed here; a `main()` whose arguments are all
  optional (an argparse tool, see `ArgumentParser`) is called as it is."""
  preload_allocator()  # re-executes with tcmalloc / jemalloc preloaded where one is installed
  _drop_closed_loop_callbacks()
  select_platform()  # before anything creates a JAX backend: no TPU probing where there is no TPU
  required = [p for p in inspect.signature(main).parameters.values()
              if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  if not required:
    errors.cli(main)()
    return
  from absl import app, flags

  if "debug" not in flags.FLAGS:  # shown by --help; read from argv (debug_requested), so it works before parsing
    flags.DEFINE_bool("debug", False, f"On an error, show its traceback instead of one line (or {errors.DEBUG_ENV}=1).")
  app.run(errors.cli(main), flags_parser=errors.parse_flags)
