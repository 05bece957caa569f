"""Peak memory and time of `tools/convert_hf.py` import and export on a synthetic checkpoint of a preset's shape.

  python tools/bench_convert.py --model=1b --dir=/tmp/bench_convert     # Llama-3.2-1B shape, bf16, 1 GB shards

Writes random bf16 weights in Hugging Face layout (sharded safetensors + config.json, no tokenizer), then runs the
import (to float32) and the export (back to bf16) as separate processes and prints each one's wall time and peak
resident memory next to the checkpoint's size and its largest tensor: tensor-by-tensor conversion keeps the peak
near the largest tensor, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

from fmjax import errors, startup


def synthetic_checkpoint(preset: str, directory: str, shard_gb: float) -> tuple[int, int]:
  """Random bf16 weights of `preset` in HF layout; returns (total bytes, largest tensor's bytes) in float32."""
  import ml_dtypes

  from fmjax.interop import hf, hf_config, safetensors_io
  from fmjax.model import resolve

  cfg = resolve(preset)
  rng = np.random.default_rng(0)
  specs = [(name, ml_dtypes.bfloat16, shape) for _, _, name, shape in hf.tensor_specs(cfg)]
  sizes = [4 * int(np.prod(shape)) for _, _, shape in specs]
  shapes = {name: shape for name, _, shape in specs}
  produce = lambda name: (0.02 * rng.standard_normal(shapes[name], dtype=np.float32)).astype(  # noqa: E731
      ml_dtypes.bfloat16)
  safetensors_io.write(directory, specs, produce, int(shard_gb * 2**30))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config.from_model_config(cfg, dtype="bfloat16"), f, indent=2)
  return sum(sizes), max(sizes)


def timed(tool: str, args: list[str]) -> tuple[float, float, float]:
  """(seconds, peak RSS, peak anonymous RSS in GiB) of `tool` with `args` run in a fresh process."""
  start = time.time()
  proc = subprocess.run([sys.executable, "-c", _MEASURED, tool, *args], capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(proc.stderr[-3000:])
  rss, anon = (int(x) for x in proc.stdout.rsplit("peak_kib", 1)[1].split())
  return time.time() - start, rss / 2**20, anon / 2**20


# Runs a script, sampling its anonymous memory (RssAnon: what cannot be paged out; memory-mapped checkpoint files
# count in RSS but not here) every 20 ms, and prints the peaks of RSS and RssAnon in KiB.
_MEASURED = """
import re, resource, runpy, sys, threading, time
peak = [0]
def sample():
  while True:
    with open('/proc/self/status') as f:
      peak[0] = max(peak[0], int(re.search(r'RssAnon:\\s+(\\d+)', f.read()).group(1)))
    time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, peak[0])
"""


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="1b", help="a preset of fmjax/model/config.py")
  p.add_argument("--dir", default="/tmp/fmjax/bench_convert")
  p.add_argument("--shard_gb", type=float, default=1.0)
  args = p.parse_args()
  shutil.rmtree(args.dir, ignore_errors=True)
  source, run, out = (os.path.join(args.dir, x) for x in ("hf", "run", "exported"))
  total, largest = synthetic_checkpoint(args.model, source, args.shard_gb)
  tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert_hf.py")
  t_import, rss_import, anon_import = timed(tool, ["import", f"--hf_dir={source}", f"--workdir={run}"])
  t_export, rss_export, anon_export = timed(tool, ["export", f"--workdir={run}", f"--hf_dir={out}", "--dtype=bfloat16",
                                      f"--max_shard_gb={args.shard_gb}"])
  gib = 2**30
  print(f"model {args.model}: {total / gib:.2f} GiB in float32 ({total / 2 / gib:.2f} GiB bf16 on disk), largest "
        f"tensor {largest / gib:.2f} GiB in float32")
  print(f"import (bf16 → float32 run): {t_import:.0f} s, peak RSS {rss_import:.2f} GiB, of it anonymous "
        f"{anon_import:.2f} GiB")
  print(f"export (run → bf16 shards):  {t_export:.0f} s, peak RSS {rss_export:.2f} GiB, of it anonymous "
        f"{anon_export:.2f} GiB")


if __name__ == "__main__":
  startup.run(main)
