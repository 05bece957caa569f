"""A direct-runner worker process: Beam's SDK harness, quiet. Its start-up lines are off, and so is the traceback it
prints for a failed bundle: the driver raises that error and reports it once (with the traceback under --debug or
FMJAX_DEBUG=1, which also keeps this worker's own output). A crash still prints."""

import logging
import os
import sys

if __name__ == "__main__":
  if os.environ.get("FMJAX_DEBUG", "") in ("", "0"):
    logging.disable(logging.ERROR)
    sys.stderr = open(os.devnull, "w")
  from apache_beam.runners.worker import sdk_worker_main

  sdk_worker_main.main(sys.argv)
