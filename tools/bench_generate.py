"""Tokens/s of KV-cache generation (`sample.generate`: its device loop, and the host-driven loop stop strings use)
against full recomputation (`sample.greedy`), greedy decoding of a randomly initialised model; each is timed on its
second call, after a warm-up call that compiles.

  python tools/bench_generate.py                                     # `small` (~34M), batch 4, prompt 64, 128 new
  python tools/bench_generate.py --model=smoke --new_tokens=32       # any preset and shape
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

from fmjax import errors, startup

from fmjax import sample
from fmjax.model import Transformer, init_params, resolve


def timed(fn) -> tuple[float, list[np.ndarray]]:
  fn()  # warm-up: compiles
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="small", help="model preset")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=128)
  args = p.parse_args()

  cfg = resolve(args.model)
  params = jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(0))
  prompts = list(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt_len), np.int32))
  apply = lambda params, *batch: Transformer(cfg).apply({"params": params}, *batch)  # noqa: E731
  n = args.batch * args.new_tokens
  print(f"model={args.model} batch={args.batch} prompt={args.prompt_len} new={args.new_tokens} "
        f"device={jax.devices()[0].device_kind}")
  cached_s, cached = timed(lambda: sample.generate(cfg, None, params, prompts, args.new_tokens))
  print(f"kv cache       {cached_s:8.2f} s  {n / cached_s:9.1f} tokens/s   (device loop)")
  host_s, host = timed(lambda: sample.generate(cfg, None, params, prompts, args.new_tokens, device_loop=False))
  print(f"kv cache       {host_s:8.2f} s  {n / host_s:9.1f} tokens/s   (host loop, one dispatch per token)")
  full_s, full = timed(lambda: sample.greedy(apply, params, prompts, args.new_tokens))
  print(f"recomputation  {full_s:8.2f} s  {n / full_s:9.1f} tokens/s")
  same = np.mean([np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(cached, full, host)])
  print(f"speedup {full_s / cached_s:.1f}x; identical greedy outputs in {same:.0%} of rows")


if __name__ == "__main__":
  startup.run(main)
