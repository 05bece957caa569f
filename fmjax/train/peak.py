"""Peak FLOP/s of the devices a run uses: a table for accelerators, a short matmul probe for CPUs."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Per chip (vendor figures), matched against `device.device_kind` in order: dense bf16 peak FLOP/s, and HBM
# bytes/s, the memory roofline of an analytic kernel cost (fmjax.train.aot).
CHIPS = (
    ("TPU v6 lite", 918e12, 1640e9),  # v6e (Trillium)
    ("TPU v5 lite", 197e12, 819e9),  # v5e
    ("TPU v5p", 459e12, 2765e9),
    ("TPU v5", 459e12, 2765e9),  # v5p reports "TPU v5" on some runtimes
    ("TPU v4", 275e12, 1200e9),
    ("H200", 989e12, 4.8e12),
    ("H100", 989e12, 3.35e12),  # SXM
    ("A100", 312e12, 2.0e12),
)


def hbm_bandwidth(device_kind: str) -> float:
  """HBM bytes/s of one chip of `device_kind`, 0 when the table does not know it."""
  return next((bandwidth for key, _, bandwidth in CHIPS if key in device_kind), 0.0)


def cpu_matmul_peak(n: int = 2048, repeats: int = 5, seconds: float = 1.0) -> float:
  """Best FLOP/s of a jitted float32 n³ matmul on the default device: the CPU's practical ceiling.

  Virtual CPU devices (--xla_force_host_platform_device_count) share the same cores, so this figure is the peak of
  the whole host, not of one virtual device. It runs at least `repeats` times and for at least `seconds`: another
  process busy for a moment slows single samples (1.6× with one busy process, measured), and a low peak would report MFU above 100%.
  """
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best, start, runs = float("inf"), time.perf_counter(), 0
  while runs < repeats or time.perf_counter() - start < seconds:
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best, runs = min(best, time.perf_counter() - t0), runs + 1
  return 2 * n**3 / best


def total_peak_flops(devices: list, configured_per_device: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of all `devices` together, where the figure came from)."""
  hosts = len({getattr(d, "process_index", 0) for d in devices})  # a CPU figure is per host, not per device
  if configured_per_device > 0:
    per = configured_per_device
    return (per * hosts if devices[0].platform == "cpu" else per * len(devices)), "configured"
  if devices[0].platform == "cpu":
    return cpu_matmul_peak() * hosts, "measured f32 matmul probe" + (f" × {hosts} processes" if hosts > 1 else "")
  kind = devices[0].device_kind
  for key, peak, _ in CHIPS:
    if key in kind:
      return peak * len(devices), f"table ({key})"
  return 0.0, f"unknown device kind {kind!r}: set log.peak_flops to get MFU"
