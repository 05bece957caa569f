"""The code books of the quantized formats: QLoRA's 4-bit NormalFloat and the signed 8-bit dynamic map that double
quantisation stores block scales in. bitsandbytes uses the same tables (tests/test_quant.py compares them)."""

from __future__ import annotations

import functools

import numpy as np

# NF4 (Dettmers et al. 2023, QLoRA, appendix E): quantiles of N(0, 1) scaled to [-1, 1], an exact zero, 8 positive and
# 7 negative values. An index is a position in this table, not a float encoding.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
NF4_MIDPOINTS = (NF4[:-1] + NF4[1:]) / np.float32(2)  # the thresholds between neighbouring codes, float32


@functools.cache
def dynamic8() -> np.ndarray:
  """The signed 8-bit dynamic map (Dettmers 2016, "8-bit approximations for parallelism"), sorted, 256 float32
  values in [-1, 1]: for each decade 10^(e-6), e = 0..6, 2^e evenly spaced fractions in (0.1, 1) (the midpoints of
  2^e + 1 boundaries) with both signs, then 0 and 1."""
  values: list[float] = []

  def decade(e: int, items: int) -> None:
    edges = _linspace32(0.1, 1.0, items + 1)
    mids = (edges[:-1] + edges[1:]) / np.float32(2)  # float32 throughout, as the table was made
    for sign in (1, -1):
      values.extend((mids * np.float32(sign * 10.0 ** (e - 6))).tolist())

  for e in range(7):
    decade(e, 2 ** e)
  values += [0.0, 1.0]
  return np.sort(np.array(values, np.float32))


def _linspace32(start: float, stop: float, n: int) -> np.ndarray:
  """float32 evenly spaced values as torch.linspace rounds them (the table was made with it): a float32 step, the
  first half counted up from `start` and the second down from `stop`, each a fused multiply-add (one rounding)."""
  start32, stop32 = np.float64(np.float32(start)), np.float64(np.float32(stop))
  step = np.float64((np.float32(stop) - np.float32(start)) / np.float32(n - 1))
  i = np.arange(n)
  return np.where(i < n // 2, start32 + step * i, stop32 - step * (n - 1 - i)).astype(np.float32)
