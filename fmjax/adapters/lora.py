"""LoRA: low-rank adapters over a frozen base, as a parameterisation (it combines with every loss head).

A targeted kernel W (input dims I, output dims O) gets two adapters, A [I…, r] and B [r, O…], and the projection
becomes  y = x·W + s · (dropout(x)·A)·B  with s = alpha / r (or alpha / √r with rsLoRA). B starts at zero, so the
adapted model starts out computing exactly what the base computes. The adapters are parameters of the same module
as their kernel, named `<kernel>_lora_a` / `<kernel>_lora_b`; training keeps them as the trainable tree and the
rest (the base) as one frozen tree (`split` / `combine`). `merge` folds them into the base: W + s·A·B.

Targets are a regex searched in parameter paths such as `layers/attn/q_kernel` or `layers/mlp/down_kernel`
(`layers_3/...` without layer scan); only the projection kernels (`ADAPTABLE`) can be targets.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from fmjax.adapters.base import Adapter
from fmjax.adapters.base import combine
from fmjax.adapters.base import split as _split
from fmjax.checks import is_regex, option
from fmjax.model import layers, projection
from fmjax.errors import UserError

__all__ = ["ADAPTABLE", "DEFAULT_TARGETS", "LoraConfig", "combine", "delta", "merge", "project", "split",
           "targeted_paths"]

ADAPTABLE = ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "gate_kernel", "up_kernel", "down_kernel", "unembed")
SUFFIXES = ("_lora_a", "_lora_b")
DEFAULT_TARGETS = r"(q|k|v|o|gate|up|down)_kernel$"  # every attention and MLP projection


@dataclasses.dataclass(frozen=True)
class LoraConfig(Adapter):
  """Which kernels get adapters, and their rank, scale and dropout."""

  rank: int = option(8, "0 = off (every parameter trains); r > 0: train rank-r adapters over a frozen base")
  alpha: float = option(16.0, "adapter scale s = alpha / rank")
  dropout: float = option(0.0, "dropout on the adapters' input while training")
  targets: str = option(DEFAULT_TARGETS, "regex searched in parameter paths, e.g. 'layers/attn/q_kernel'")
  rslora: bool = option(False, "rank-stabilised scale alpha / sqrt(rank)")

  title: ClassVar[str] = "LoRA"
  section: ClassVar[str] = "lora"
  merge_command: ClassVar[str] = "python tools/lora.py merge --workdir={workdir} --output=DIR"
  off_hint: ClassVar[str] = "lora.rank=0"
  off: ClassVar[dict] = {"rank": 0}
  rules: ClassVar[tuple] = (
      ("rank", lambda v: v >= 0, ">= 0 (0 = off)"),
      ("alpha", lambda v: v > 0, "> 0 (the adapter scale is alpha / rank)"),
      ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
      ("targets", is_regex, "a valid regular expression"),
  )

  @classmethod
  def enabled(cls, section: Any) -> bool:
    if section.rank < 0:
      raise UserError(f"lora.rank={section.rank} must be >= 0 (0 = off).")
    return section.rank > 0

  @classmethod
  def owns_path(cls, path: tuple[str, ...]) -> bool:
    return path[-1].endswith(SUFFIXES)

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def targets_path(self, path: str) -> bool:
    return re.search(self.targets, path) is not None

  def validate(self) -> "LoraConfig":
    if self.rank <= 0:
      raise UserError(f"lora.rank={self.rank} must be positive (lora.rank=0 turns LoRA off).")
    return super().validate()

  def project(self, module: nn.Module, name: str, spec: str, x: jax.Array, w: jax.Array, axes: tuple[str, ...],
              out_dtype: Any = None) -> jax.Array:
    return project(module, name, spec, x, w, axes, self, out_dtype)

  def changes_projection(self, module: nn.Module, name: str) -> bool:
    return self.targets_path("/".join((*module.path, name)))

  def check(self, base: Any) -> None:
    targeted_paths(base, self)

  def merge(self, params: Any) -> dict:
    return merge(params, self)

  def flops_per_token(self, cfg: Any, seq_len: int, trained: int) -> float:
    """Every adapter weight does one multiply-add per token: 2 FLOPs forward, 4 backward."""
    return 6.0 * trained

  def describe(self, trained: int) -> str:
    return f"{trained:,} trained: LoRA adapters"


def project(module: nn.Module, name: str, spec: str, x: jax.Array, w: jax.Array, axes: tuple[str, ...],
            lora: LoraConfig | None, out_dtype: Any = None) -> jax.Array:
  """einsum(spec, x, w) for kernel `name` of `module`, plus the low-rank update when `lora` targets that kernel.

  `spec` is e.g. 'BTD,DNH->BTNH': the kernel's letters that also occur in x's are its input dims (they come first),
  the rest its output dims; `axes` are the kernel's logical axis names."""
  y = projection.apply(spec, x, w, out_dtype, int8=layers.int8_matmul(module, name))
  if lora is None or not lora.changes_projection(module, name):
    return y
  lhs, out = spec.split("->")
  xs, ws = lhs.split(",")
  n_in = sum(c in xs for c in ws)
  ins, outs = ws[:n_in], ws[n_in:]
  init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
  a = module.param(name + "_lora_a", nn.with_logical_partitioning(init_a, (*axes[:n_in], "adapter_rank")),
                   (*w.shape[:n_in], lora.rank), jnp.float32)  # PEFT's init: U(±1/√fan_in)
  b = module.param(name + "_lora_b",
                   nn.with_logical_partitioning(nn.initializers.zeros, ("adapter_rank", *axes[n_in:])),
                   (lora.rank, *w.shape[n_in:]), jnp.float32)
  if lora.dropout and module.has_rng("dropout"):
    x = nn.Dropout(lora.dropout, deterministic=False, name=name + "_lora_dropout")(x)
  batch = "".join(c for c in xs if c not in ins)
  h = jnp.einsum(f"{xs},{ins}r->{batch}r", x, a.astype(x.dtype))
  delta = jnp.einsum(f"{batch}r,r{outs}->{out}", h, b.astype(x.dtype))
  return y + (lora.scale * delta).astype(y.dtype)


def split(params: Any) -> tuple[dict, dict]:
  """(adapters, base): the adapter leaves and all other leaves, each as a nested dict of the same layout."""
  return _split(LoraConfig(), params)


def targeted_paths(base: Any, lora: LoraConfig) -> list[str]:
  """The kernel paths of `base` that `lora.targets` selects. A regex that selects nothing, or that selects a
  parameter that is not a projection kernel, is an error naming the fix."""
  paths = ["/".join(p) for p in traverse_util.flatten_dict(base)]
  selected = [p for p in paths if lora.targets_path(p)]
  wrong = [p for p in selected if p.rsplit("/", 1)[-1] not in ADAPTABLE]
  if wrong:
    raise UserError(f"lora.targets={lora.targets!r} selects {wrong[:3]}, which cannot take adapters; only the "
                    f"projection kernels {ADAPTABLE} can (e.g. the default {DEFAULT_TARGETS!r}).")
  if not selected:
    adaptable = [p for p in paths if p.rsplit("/", 1)[-1] in ADAPTABLE]
    raise UserError(f"lora.targets={lora.targets!r} matches no parameter path; paths look like {adaptable[:4]} "
                    f"(regex searched in each). The default is {DEFAULT_TARGETS!r}.")
  return selected


def delta(a: np.ndarray | jax.Array, b: np.ndarray | jax.Array, kernel_ndim: int) -> Any:
  """A·B in the kernel's shape. With layer scan both carry a leading layers axis (kept)."""
  lead = a.ndim + b.ndim - 2 - kernel_ndim  # 1 under layer scan, else 0
  xp = jnp if isinstance(a, jax.Array) else np
  ins, outs = a.shape[lead:-1], b.shape[lead + 1:]
  a2 = a.reshape(*a.shape[:lead], math.prod(ins), a.shape[-1])
  b2 = b.reshape(*b.shape[:lead], b.shape[lead], math.prod(outs))
  return xp.matmul(a2, b2).reshape(*a.shape[:lead], *ins, *outs)


def merge(params: Any, lora: LoraConfig) -> dict:
  """Base parameters with every adapter folded in (W + s·A·B, in W's dtype), adapters removed."""
  adapters, base = split(params)
  flat_base, flat_ad = traverse_util.flatten_dict(base), traverse_util.flatten_dict(adapters)
  out = dict(flat_base)
  for path, w in flat_base.items():
    a_key = (*path[:-1], path[-1] + "_lora_a")
    if a_key in flat_ad:
      b = flat_ad[(*path[:-1], path[-1] + "_lora_b")]
      d = delta(flat_ad[a_key], b, w.ndim)
      out[path] = (w.astype(np.float32) + lora.scale * d).astype(w.dtype)
  return traverse_util.unflatten_dict(out)
