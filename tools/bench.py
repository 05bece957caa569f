"""Benchmarks the train step of a config on this machine's devices.

  python tools/bench.py --config=configs/pretrain.py --cpu_devices=1   # the fixed shape: `small`, batch 8, seq 256
  python tools/bench.py --config=configs/pretrain.py --cpu_devices=2

Prints compile time, median step time, tokens/s, MFU (against the device peak, or on CPU a measured float32 matmul
peak) and memory. The step is timed on one fixed batch so the figures are the step's own, not the input pipeline's;
the input pipeline is timed apart (a fresh iterator of the same config, on the host) and compared with the step.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

from fmjax import errors, startup


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/pretrain.py", help="config file[:variant]")
  p.add_argument("--cpu_devices", type=int, default=0, help="virtual CPU devices (XLA host device count); 0 = as is")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--pipeline_batches", type=int, default=200, help="batches to time the input pipeline on")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.remat=full (repeatable)")
  args = p.parse_args()
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()

  import ast

  import jax

  from fmjax import config_lib, data, spec
  from fmjax.train import experiment, peak

  config = config_lib.load(args.config)
  for item in args.set:
    key, _, value = item.partition("=")
    node = config
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value  # a bare string
  s = spec.resolve(config)
  exp = experiment.build(s)
  batch = exp.next_batch()
  state = exp.state
  for _ in range(args.warmup):
    state, metrics = exp.run.step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = exp.run.step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)

  step = statistics.median(times)
  tokens = config.train.batch_size * config.train.seq_len
  it = iter(data.train_dataset(s.data, s.train, exp.run.tokenizer, adapter=s.adapter, num_labels=s.model.num_labels)[0])
  t0 = time.perf_counter()
  for _ in range(args.pipeline_batches):
    next(it)
  pipeline_rate = args.pipeline_batches * tokens / (time.perf_counter() - t0)
  peak_flops, source = peak.total_peak_flops(jax.devices(), config.log.peak_flops)
  achieved = exp.run.flops_per_token * tokens / step
  mem = exp.run.step.memory_analysis()
  rows = [
      ("devices", f"{jax.device_count()} × {jax.devices()[0].device_kind}, mesh {dict(exp.run.mesh.shape)}"),
      ("model", f"{config.model.name}: {exp.run.num_params:,} params, {exp.run.flops_per_token / 1e6:.1f} MFLOP/token"),
      ("batch", f"{config.train.batch_size} × {config.train.seq_len} = {tokens} tokens/step"),
      ("compile", f"{exp.run.compile_seconds:.1f} s"),
      ("step time", f"median {step * 1e3:.0f} ms (min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}, "
                    f"{args.steps} steps)"),
      ("tokens/s", f"{tokens / step:,.0f}"),
      ("input pipeline", f"{pipeline_rate:,.0f} tokens/s = {pipeline_rate * step / tokens:,.0f}× the step "
                         f"(data.workers={config.data.workers}, {args.pipeline_batches} batches, first one included)"),
      ("achieved", f"{achieved / 1e9:.1f} GFLOP/s"),
      ("peak", f"{peak_flops / 1e9:.1f} GFLOP/s ({source})"),
      ("MFU", f"{100 * achieved / peak_flops:.1f}%" if peak_flops else "n/a"),
      ("peak host RSS", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"),
  ]
  if mem is not None:
    rows.append(("step buffers", f"arguments {mem.argument_size_in_bytes / 2**20:.0f} MiB, temporaries "
                                 f"{mem.temp_size_in_bytes / 2**20:.0f} MiB, outputs "
                                 f"{mem.output_size_in_bytes / 2**20:.0f} MiB"))
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    rows.append(("peak device memory", f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB per device"))
  for k, v in rows:
    print(f"{k:>18}: {v}")


if __name__ == "__main__":
  startup.run(main)
