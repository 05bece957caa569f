"""Multi-process (multi-host) start: `jax.distributed.initialize`, decided once, before JAX touches a device.

- Flags or environment: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or FMJAX_COORDINATOR_ADDRESS
  / FMJAX_NUM_PROCESSES / FMJAX_PROCESS_ID (JAX's own JAX_COORDINATOR_ADDRESS also names the coordinator). Values left
  out are filled in by JAX's cluster detection (Cloud TPU, Slurm, Open MPI, ...). `num_processes=1` means one process.
- Automatic on Cloud TPU: a VM whose TPU environment lists several workers (a multi-host slice; MEGASCALE_* for several
  slices) initialises with no arguments: JAX reads the coordinator, the process count and this worker's id itself.
- Otherwise: one process, nothing to initialise.

A peer that never arrives does not hang the start: after `timeout` seconds the process exits with a message naming the
coordinator, this process's id and the expected count, and what to check (JAX itself would abort with a C++ trace).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import threading
from typing import Mapping

import jax
import numpy as np

ENV_ADDRESS, ENV_COUNT, ENV_ID = "FMJAX_COORDINATOR_ADDRESS", "FMJAX_NUM_PROCESSES", "FMJAX_PROCESS_ID"
TIMEOUT_EXIT_CODE = 3  # the run could not start: a peer or the coordinator never answered


class DistributedError(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `jax.distributed.initialize` gets; None = JAX detects it."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  source: str  # where the decision came from, for the log


def _int(value: str | None, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer.") from None


def tpu_workers(environ: Mapping[str, str] = os.environ) -> int:
  """Processes of this Cloud TPU job as its environment describes them: hosts per slice × slices; 1 off Cloud TPU."""
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""  # GKE
  per_slice = len([h for h in hosts.split(",") if h.strip()])
  slices = _int(environ.get("MEGASCALE_NUM_SLICES"), "MEGASCALE_NUM_SLICES") or 1
  if per_slice:
    return per_slice * slices
  if slices > 1:
    return slices
  try:  # a GCE TPU VM lists its workers in the metadata server; JAX's own detection reads it (only on a TPU VM)
    from jax._src.clusters import cloud_tpu_cluster

    gce = cloud_tpu_cluster.GceTpuCluster
    return gce.get_process_count() if gce.is_env_present() else 1
  except Exception as e:  # noqa: BLE001 - detection is best-effort; flags and env still work
    logging.warning("could not read the Cloud TPU worker list (%s: %s); assuming one host. Pass --num_processes "
                    "and friends to run on several.", type(e).__name__, e)
    return 1


def resolve(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            environ: Mapping[str, str] = os.environ) -> Settings | None:
  """The initialisation this process needs (flags win over the environment), or None for a single process."""
  address = coordinator_address or environ.get(ENV_ADDRESS) or environ.get("JAX_COORDINATOR_ADDRESS") or None
  count = num_processes if num_processes is not None else _int(environ.get(ENV_COUNT), ENV_COUNT)
  pid = process_id if process_id is not None else _int(environ.get(ENV_ID), ENV_ID)
  if count is not None and count < 1:
    raise DistributedError(f"num_processes={count} must be >= 1.")
  if count == 1:
    return None
  if count is not None and pid is not None and not 0 <= pid < count:
    raise DistributedError(f"process_id={pid} must be in [0, {count}) for num_processes={count}.")
  if (address, count, pid) != (None, None, None):
    return Settings(address, count, pid, "flags/environment")
  if tpu_workers(environ) > 1:
    return Settings(None, None, None, "Cloud TPU environment")
  return None


def _resolved(settings: Settings) -> tuple[str, str, str]:
  """(coordinator, process count, process id) for a message: as given, else as JAX detected them, else '?'."""
  address, count, pid = settings.coordinator_address, settings.num_processes, settings.process_id
  try:  # JAX records what its cluster detection found before it waits for the peers
    from jax._src import distributed as jax_distributed

    s = jax_distributed.global_state
    if s.coordinator_address:
      address, count = address or s.coordinator_address, count or s.num_processes
      pid = s.process_id if pid is None else pid
  except (ImportError, AttributeError):
    pass
  return (address or "?", "?" if count is None else str(count), "?" if pid is None else str(pid))


def timeout_message(settings: Settings, timeout: float) -> str:
  address, count, pid = _resolved(settings)
  ids = f"0..{int(count) - 1}" if count != "?" else "0..N-1"
  return (f"fmjax: jax.distributed did not start within {timeout:g}s: process {pid} of {count} expected processes "
          f"could not meet the others at the coordinator {address} ({settings.source}). Check that the same command "
          f"runs on every host with each process id {ids} exactly once (process 0 starts the coordinator, so it "
          f"must run on the host at {address}), that this host can reach that address and port (firewall, "
          "hostname), that no earlier run still holds the port, and raise --distributed_timeout if hosts start "
          "slowly.")


def initialize(settings: Settings, timeout: float = 300.0) -> None:
  """Joins the other processes (blocks until all have arrived); exits the process after `timeout` seconds."""
  logging.info("jax.distributed (%s): coordinator %s, %s processes, this is process %s; waiting up to %gs for all",
               settings.source, settings.coordinator_address or "auto", settings.num_processes or "auto",
               "auto" if settings.process_id is None else settings.process_id, timeout)

  def give_up() -> None:  # JAX would abort with a C++ stack trace; say what to check instead
    sys.stderr.write(timeout_message(settings, timeout) + "\n")
    sys.stderr.flush()
    os._exit(TIMEOUT_EXIT_CODE)

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id,
                               initialization_timeout=int(timeout) + 60)  # the watchdog speaks first
  except (ValueError, TypeError, RuntimeError) as e:
    raise DistributedError(f"jax.distributed.initialize failed ({settings.source}): {e}. Set --coordinator_address, "
                           "--num_processes and --process_id (or FMJAX_COORDINATOR_ADDRESS / FMJAX_NUM_PROCESSES / "
                           "FMJAX_PROCESS_ID) on every process.") from e
  finally:
    watchdog.cancel()
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):  # JAX 0.10 defaults to it
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes


def check_same(what: str, text: str) -> None:
  """Fails on every process unless all processes hold the same `text` (e.g. the resolved config)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint32)
  digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
  differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
  if differ:
    raise DistributedError(f"processes {differ} have a different {what} from process 0; start every process with "
                           "the same command, code and files.")
