"""fmjax entry point.

  python -m fmjax.main --config=configs/pretrain.py[:variant] --workdir=DIR [--config.section.key=value ...]
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from fmjax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and variant, e.g. configs/pretrain.py:smoke.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config.json, metrics.jsonl, TensorBoard, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Keeps orbax's and grain's per-save / per-worker INFO lines out of the run log (warnings still show)."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain"))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_logger().addFilter(_QuietLibraries())
  loop.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
