"""Which Beam runner a data tool's pipeline runs on.

`--runner=direct` (the default) is Beam's portable FnApiRunner on this machine: `--num_workers=1` runs in this
process, N > 1 in N worker processes. It is named explicitly because Beam's DirectRunner may hand a pipeline to the
Prism runner, which downloads a binary. Any other runner (`dataflow`, `flink`, `spark`, ...) gets its name and every
pipeline option the tool did not know (`--project=... --region=... --temp_location=gs://...`) unchanged.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from fmjax.errors import UserError


def add_flags(parser: Any) -> None:
  """Adds --runner and --num_workers to an argparse parser."""
  parser.add_argument("--runner", default="direct",
                      help="direct (this machine) or any Beam runner, e.g. dataflow; unknown --flags go to Beam")
  parser.add_argument("--num_workers", type=int, default=1,
                      help="worker processes of the direct runner (Beam's own option for other runners)")


def beam():
  """The apache_beam module, or an error naming the extra to install."""
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)  # Beam's import warns about optional cloud clients on the root logger
  try:
    import apache_beam
  except ImportError as e:
    raise UserError(f"apache-beam is not installed ({e}); pip install -e '.[beam]'.") from e
  finally:
    root.setLevel(level)
  return apache_beam


def is_direct(runner: str) -> bool:
  return runner.lower() in ("direct", "directrunner")


def pipeline(runner: str, num_workers: int, beam_args: list[str]):
  """A `beam.Pipeline` for the runner; `beam_args` are passed to Beam's PipelineOptions as they are."""
  beam_ = beam()
  from apache_beam.options.pipeline_options import PipelineOptions

  bad = [a for a in beam_args if not a.startswith("--")]
  if bad:
    raise UserError(f"unexpected argument {bad[0]!r}; pipeline options are --name=value.")
  if num_workers < 1:
    raise UserError(f"--num_workers={num_workers} must be >= 1.")
  if is_direct(runner):
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)  # a worker's error is raised here, reported once

    unknown = [a for a in beam_args if not a.startswith(("--direct_", "--save_main_session", "--pickle_library"))]
    if unknown:
      raise UserError(f"{unknown[0]!r} is neither this tool's flag (see --help) nor a direct runner option; "
                      "options such as --project or --temp_location go with another --runner (e.g. --runner=dataflow).")
    options = PipelineOptions(beam_args, direct_num_workers=num_workers)
    environment = None
    if num_workers > 1:  # Beam's multi_processing mode, with a worker that keeps its start-up lines quiet
      from apache_beam.transforms import environments
      environment = environments.SubprocessSDKEnvironment.from_command_string(
          f"{sys.executable} -m fmjax.curation.worker")
    return beam_.Pipeline(runner=FnApiRunner(default_environment=environment), options=options)
  if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.]*", runner):
    raise UserError(f"--runner={runner!r} is not a runner name; use direct, dataflow, flink, spark, ...")
  return beam_.Pipeline(options=PipelineOptions([f"--runner={runner}", f"--num_workers={num_workers}", *beam_args]))


def failure(error: BaseException) -> str | None:
  """The message of a user error raised inside a worker (as the runner re-raises it, or in its text), or None."""
  if isinstance(error, UserError):  # the runner re-raised it, with the step's name appended
    return str(error).splitlines()[0].split(" [while running")[0].strip()
  m = re.search(r"(?:CurationError|DataError|UserError): (.+)", str(error))
  return m.group(1).split(" [while running")[0].strip().strip("'\"") if m else None
