"""fmjax entry point.

  python -m fmjax.main --config=configs/pretrain.py[:variant] --workdir=DIR [--config.section.key=value ...]

On several hosts run the same command on each: a multi-host Cloud TPU slice needs nothing more; elsewhere add
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or FMJAX_* environment variables).
Bad input is reported as one line, `fmjax: error: ...`, with exit code 2; `--debug` shows the traceback.
"""

import logging as std_logging

from fmjax import startup

if __name__ == "__main__":  # before jax is imported: the process re-executes itself with tcmalloc if it can
  startup.preload_allocator()

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fmjax import distributed, errors  # noqa: E402
from fmjax.train import loop  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant, e.g. configs/pretrain.py:smoke; override any key with "
    "--config.section.key=value. Every key with its default and doc, the objective section's per head and each "
    "parameterisation's: docs/config-keys.md (python tools/config_keys.py prints it).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config.json, metrics.jsonl, TensorBoard, checkpoints; "
                                "on several hosts, one that every host sees (a shared filesystem).")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Several processes: HOST:PORT of process 0, which serves the coordinator (env "
    f"{distributed.ENV_ADDRESS}). Not needed on a multi-host Cloud TPU slice: it is detected.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, f"Processes in the run (env {distributed.ENV_COUNT}).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, f"This process's id, 0..N-1 (env {distributed.ENV_ID}).")
_TIMEOUT = flags.DEFINE_float("distributed_timeout", 300.0, "Seconds to wait for every process to join before giving "
                              "up with a message.")


class _QuietLibraries:
  """Keeps orbax's and grain's per-save / per-worker INFO lines, and JAX's (e.g. "Unable to initialize backend
  'tpu'" where no TPU exists, which reads as a failure), out of the run log; warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(f"/{lib}/" in record.pathname
                                                            for lib in ("orbax", "grain", "jax/_src"))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  startup.use_short_info_format()
  logging.get_absl_handler().addFilter(_QuietLibraries())  # the handler: it sees every library's records
  try:
    settings = distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if settings is not None:
      distributed.initialize(settings, _TIMEOUT.value)
  except distributed.DistributedError as e:
    raise errors.UserError(str(e)) from e
  if settings is not None and jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # one log for the run, process 0's; the others still report problems
  loop.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  startup.run(main)
