"""Cloud TPU slices by name (v5p-8, v5e-16, v6e-256, ...) as libtpu's compile-only devices, with no TPU attached:
what `tools/aot_compile.py` compiles the train step for."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from fmjax.errors import UserError

GiB = 2**30

# Generation -> (libtpu's name, chip-grid dims, its accelerator names count TensorCores (2 per chip), chip config,
# HBM per chip as Google's spec sheet states it). Peak FLOP/s come from fmjax.train.peak, the table MFU uses.
GENERATIONS = {
    "v4": ("v4", 3, True, "megacore", "32 GiB"),
    "v5p": ("v5", 3, True, "megacore", "95 GB"),
    "v5e": ("v5e", 2, False, "default", "16 GB"),
    "v6e": ("v6e", 2, False, "default", "32 GB"),
}
_ALIASES = {"v5litepod": "v5e"}


class TopologyError(UserError, RuntimeError):
  """libtpu cannot describe a slice: it is not installed, or the slice is not one Cloud TPU offers."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given: v5p-8, v5e-16, v6e:8x16, ...
  generation: str  # v4 | v5p | v5e | v6e
  grid: tuple[int, ...]  # chips along each ICI axis of one slice
  num_slices: int = 1

  @property
  def chips(self) -> int:  # in all slices
    return math.prod(self.grid) * self.num_slices

  @property
  def libtpu_name(self) -> str:
    return f"{GENERATIONS[self.generation][0]}:{'x'.join(map(str, self.grid))}"

  @property
  def hbm_spec(self) -> str:
    return GENERATIONS[self.generation][4]

  def cloud_name(self, chips: int) -> str:
    """The accelerator type of a `chips`-chip slice of this generation (v4/v5p count TensorCores)."""
    gen = "v5litepod" if self.generation == "v5e" else self.generation
    return f"{gen}-{chips * 2 if GENERATIONS[self.generation][2] else chips}"


def parse(name: str, num_slices: int = 1) -> Topology:
  """`v5p-8` (4 chips, 2x2x1), `v4-32`, `v5e-16` / `v5litepod-16`, `v6e-256`, or a chip grid `v5p:4x4x12`."""
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)([-:])([0-9x]+)", name.strip().lower())
  if not m or num_slices < 1:
    raise UserError(f"--topology={name!r} (--num_slices={num_slices}) is not a Cloud TPU slice; use e.g. v5p-8, "
                    "v4-32, v5e-16 (v5litepod-16), v6e-256 or a chip grid such as v5p:4x4x12, and num_slices >= 1.")
  gen = _ALIASES.get(m[1], m[1])
  _, dims, counts_cores, _, _ = GENERATIONS[gen]
  if m[2] == ":":
    grid = tuple(int(s) for s in m[3].split("x") if s)
    if len(grid) != dims or min(grid) < 1:
      raise UserError(f"--topology={name!r}: a {gen} chip grid has {dims} positive sizes, e.g. "
                      f"{gen}:{'x'.join(['2'] * dims)}.")
    return Topology(name, gen, grid, num_slices)
  n = int(m[3])
  chips = n // 2 if counts_cores else n
  grid = _grid(chips, dims)
  if grid is None or (counts_cores and n % 2):
    raise UserError(f"--topology={name!r}: no {gen} slice of that size is known here ({gen} names count "
                    f"{'TensorCores, 2 per chip' if counts_cores else 'chips'}); pass its chip grid instead, e.g. "
                    f"--topology={gen}:{'4x4x12' if dims == 3 else '8x16'}.")
  return Topology(name, gen, grid, num_slices)


def _grid(chips: int, dims: int) -> tuple[int, ...] | None:
  """Cloud TPU's shape of a power-of-two slice: 4 chips 2x2x1, then 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (3D) or 1x1,
  2x2, 2x4, 4x4, 4x8, ... (2D): the last of the smallest sides doubles."""
  if dims == 2 and chips == 1:
    return (1, 1)
  shape = [2, 2] + [1] * (dims - 2)
  shape.sort()
  while math.prod(shape) < chips:
    i = max(j for j, s in enumerate(shape) if s == min(shape))
    shape[i] *= 2
    shape.sort()
  if math.prod(shape) != chips:
    return None
  return tuple(shape[1:] + shape[:1]) if shape[0] == 1 else tuple(shape)  # 2x2x1, as Cloud TPU names it


def devices(topo: Topology) -> list:
  """libtpu's compile-only devices (one per chip: v4/v5p as megacore) of `topo`, all slices."""
  from jax.experimental import topologies

  _, dims, _, chip_config, _ = GENERATIONS[topo.generation]
  per_slice = math.prod(topo.grid)
  host = (1, 1, 1) if per_slice == 1 else (2, 4, 1) if dims == 2 and per_slice == 8 else (2, 2, 1)
  # libtpu reads the TPU VM's environment when it first loads: off a TPU VM these keep it from guessing (and
  # warning), and compile-only use touches no chip, so other processes (another AOT compile, a pytest worker) may
  # load libtpu at the same time instead of failing on its one-process lockfile.
  quiet = {"TPU_ACCELERATOR_TYPE": topo.cloud_name(per_slice), "TPU_WORKER_HOSTNAMES": "localhost",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  saved = {k: os.environ.get(k) for k in quiet}
  os.environ.update({k: v for k, v in quiet.items() if saved[k] is None})
  try:
    desc = topologies.get_topology_desc(topology_name=topo.libtpu_name, platform="tpu", chip_config_name=chip_config,
                                        chips_per_host_bounds=host, num_slices=topo.num_slices)
  except Exception as e:  # noqa: BLE001  (no libtpu, or a grid libtpu does not accept)
    raise TopologyError(f"libtpu could not describe TPU topology {topo.libtpu_name} x {topo.num_slices} slice(s): {e}. "
                        "AOT compilation needs libtpu (pip install -e '.[tpu]') and a slice shape Cloud TPU offers."
                        ) from e
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
  return list(desc.devices)


_SIZE = r"([\d.]+)([KMGTP]?)i?B?"


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * 1024 ** " KMGTP".index(unit or " "))


def refusal(message: str) -> tuple[int, int] | None:
  """(bytes required, bytes available) from the TPU compiler's out-of-memory message."""
  for pattern in (rf"required for HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)",
                  rf"Used {_SIZE} of {_SIZE} hbm"):
    m = re.search(pattern, message)
    if m:
      return _bytes(m[1], m[2]), _bytes(m[3], m[4])
  return None


def usable_hbm(device: Any) -> int | None:
  """HBM a program may use on `device`'s chip: the compiler names it when it refuses a 1 TiB program."""
  mesh = Mesh(np.array([device]), ("x",))
  try:
    jax.jit(lambda: jnp.zeros((2**40,), jnp.int8), out_shardings=NamedSharding(mesh, P())).lower().compile()
  except Exception as e:  # noqa: BLE001
    parsed = refusal(str(e))
    return parsed[1] if parsed else None
  return None
