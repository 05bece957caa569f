"""REFT: representation fine-tuning (Wu et al. 2024, arXiv 2404.03592; reference code stanfordnlp/pyreft). The base
stays frozen; trained low-rank edits change the residual stream (each chosen block's output) at a few prompt
positions, and the model's later layers and the KV cache carry the change to every later token.

  loreft  Φ(h) = h + Rᵀ(W h + b − R h), R ∈ ℝ^{r×d} with orthonormal rows: the edit replaces h's coordinates
          in R's row space with W h + b, and leaves the orthogonal complement alone
  noreft  the same with R unconstrained
  direft  Φ(h) = h + Rᵀ(W h + b), R unconstrained

R's orthonormal rows come from a QR factorisation of a free float32 matrix A [d, r] (R = Qᵀ, columns' signs fixed
by diag of the triangular factor), so they stay orthonormal to float32 precision at every step, whatever the
optimizer does. W starts equal to R (direft: at zero) and b at zero, so training starts from exactly the base
model (pyreft starts W at random; an identity start is what lets a head's frozen reference be the base with REFT off).

Positions (`reft.positions`, pyreft's syntax): `f5+l5` edits the first 5 and the last 5 tokens of each example's
prompt, each side capped at half the prompt; `f3` or `l7` one side. The prompt is the tokens up to and including
the last one before the first loss-bearing target (a text segment with loss on every token: the whole segment).
The pipeline marks them per token (`intervene`: 0 none, 1 first, 2 last) from each packed segment's own prompt, so
packing cannot shift them. With `share_weights` (or one side only) one intervention per layer serves both; else each
side has its own. Generation edits the prompt during prefill only, as pyreft's generate does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.adapters.base import Adapter
from fmjax.checks import option
from fmjax.errors import UserError

METHODS = ("loreft", "noreft", "direft")
_POSITIONS = re.compile(r"^(?:f(\d+))?(\+)?(?:l(\d+))?$")


def parse_positions(spec: str) -> tuple[int, int]:
  """(first k, last k) of a positions spec such as 'f5+l5', 'f3', 'l7'."""
  m = _POSITIONS.match(spec.strip())
  if not m or not (m.group(1) or m.group(3)) or bool(m.group(2)) != bool(m.group(1) and m.group(3)):
    raise UserError(f"reft.positions={spec!r} is not 'f<k>+l<k>', 'f<k>' or 'l<k>' (e.g. 'f5+l5').")
  return int(m.group(1) or 0), int(m.group(3) or 0)


def _layers_ok(v: str) -> bool:
  return v == "all" or all(p.strip().isdigit() for p in v.split(","))


def _positions_ok(v: str) -> bool:
  try:
    parse_positions(v)
    return True
  except UserError:
    return False


def segment_codes(n: int, first: int, last: int) -> np.ndarray:
  """`intervene` codes of one prompt of `n` tokens: 1 on its first k, 2 on its last k (each k capped at n // 2)."""
  codes = np.zeros(n, np.int32)
  f, l = min(first, n // 2), min(last, n // 2)
  codes[:f] = 1
  if l:
    codes[n - l:] = 2
  return codes


@dataclasses.dataclass(frozen=True)
class ReftConfig(Adapter):
  """Interventions of rank `rank` on the residual stream after the blocks `layers`, at prompt `positions`."""

  rank: int = option(4, "0 = off; r > 0: train rank-r interventions over a frozen base")
  method: str = option("loreft", "loreft h + Rᵀ(Wh + b − Rh), R orthonormal | noreft (R free) | direft h + Rᵀ(Wh + b)")
  layers: str = option("all", "the blocks whose output is edited: 'all' or indices '2,4,6'")
  positions: str = option("f5+l5", "prompt positions edited: first k / last k of each example's prompt ('f3', 'l7')")
  share_weights: bool = option(False, "one intervention per layer for first and last positions (else one each)")
  dropout: float = option(0.0, "dropout on the edit while training")

  title: ClassVar[str] = "REFT"
  section: ClassVar[str] = "reft"
  columns: ClassVar[tuple[str, ...]] = ("intervene",)
  off_hint: ClassVar[str] = "reft.rank=0"
  off: ClassVar[dict] = {"rank": 0}
  rules: ClassVar[tuple] = (
      ("rank", lambda v: v >= 0, ">= 0 (0 = off)"),
      ("method", lambda v: v in METHODS, f"one of {METHODS}"),
      ("layers", _layers_ok, "'all' or comma-separated block indices such as '0,2,4'"),
      ("positions", _positions_ok, "'f<k>+l<k>', 'f<k>' or 'l<k>' (e.g. 'f5+l5')"),
      ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
  )

  @classmethod
  def enabled(cls, section: Any) -> bool:
    return section.rank > 0

  @classmethod
  def owns_path(cls, path: tuple[str, ...]) -> bool:
    return path[-1].startswith("reft_")

  def validate(self) -> "ReftConfig":
    if self.rank <= 0:
      raise UserError(f"reft.rank={self.rank} must be positive (reft.rank=0 turns REFT off).")
    return super().validate()

  @property
  def sides(self) -> tuple[int, int]:
    return parse_positions(self.positions)

  @property
  def groups(self) -> int:
    """Interventions per edited layer: 2 (first, last) unless weights are shared or one side is edited."""
    first, last = self.sides
    return 1 if self.share_weights or not first or not last else 2

  def layer_indices(self, num_layers: int) -> list[int]:
    if self.layers == "all":
      return list(range(num_layers))
    idx = sorted({int(p) for p in self.layers.split(",")})
    if idx[-1] >= num_layers:
      raise UserError(f"reft.layers={self.layers!r} names block {idx[-1]}, but the model has {num_layers} (0 … "
                      f"{num_layers - 1}).")
    return idx

  def layer_params(self, module: nn.Module, num_layers: int) -> dict[str, jax.Array]:
    """{'R' [L,G,r,d], 'W' [L,G,d,r], 'b' [L,G,r], 'on' [L]} for every block L: the edited blocks' interventions
    and, for the others, a placeholder that `on` = 0 switches off (so the scanned blocks see one shape)."""
    d, r, g = module.cfg.d_model, self.rank, self.groups
    if r > d:
      raise UserError(f"reft.rank={r} must be at most model.d_model={d}.")
    idx = self.layer_indices(num_layers)
    n = len(idx)
    axes = ("layers", None, "embed", "adapter_rank")
    a = module.param("reft_rotation", nn.with_logical_partitioning(_orthonormal_init, axes), (n, g, d, r), jnp.float32)
    rows = self._rows(a)
    start_w = (lambda key, shape, dtype: jnp.zeros(shape, dtype)) if self.method == "direft" else (
        lambda key, shape, dtype: jnp.swapaxes(rows, -1, -2).astype(dtype))
    w = module.param("reft_weight", nn.with_logical_partitioning(start_w, axes), (n, g, d, r), jnp.float32)
    b = module.param("reft_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("layers", None, "adapter_rank")),
                     (n, g, r), jnp.float32)
    out = {"R": rows, "W": w, "b": b, "on": jnp.ones((n,), jnp.float32)}
    if n == num_layers:
      return out
    pos = jnp.asarray(idx)
    fill = {"R": jnp.broadcast_to(jnp.eye(r, d, dtype=jnp.float32), (num_layers, g, r, d)),
            "W": jnp.zeros((num_layers, g, d, r)), "b": jnp.zeros((num_layers, g, r)), "on": jnp.zeros((num_layers,))}
    return {k: fill[k].at[pos].set(v) for k, v in out.items()}

  def _rows(self, a: jax.Array) -> jax.Array:
    """R [.., r, d] from the free matrix A [.., d, r]: orthonormalised for loreft."""
    if self.method != "loreft":
      return jnp.swapaxes(a, -1, -2)
    q, t = jnp.linalg.qr(a)
    sign = jnp.where(jnp.diagonal(t, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
    return jnp.swapaxes(q * sign[..., None, :], -1, -2)

  def block_output(self, module: nn.Module, x: jax.Array, layer_params: Any,
                   inputs: dict[str, jax.Array] | None) -> jax.Array:
    if not inputs or "intervene" not in inputs:
      return x  # decoding steps after the prompt
    code_BxT = inputs["intervene"]
    h = x.astype(jnp.float32)
    R, W, b = layer_params["R"], layer_params["W"], layer_params["b"]  # [G,r,d], [G,d,r], [G,r]
    edit_GxBxTxR = jnp.einsum("btd,gdr->gbtr", h, W) + b[:, None, None, :]
    if self.method != "direft":
      edit_GxBxTxR = edit_GxBxTxR - jnp.einsum("btd,grd->gbtr", h, R)
    delta_GxBxTxD = jnp.einsum("gbtr,grd->gbtd", edit_GxBxTxR, R)
    if self.groups == 1:
      delta = jnp.where((code_BxT > 0)[..., None], delta_GxBxTxD[0], 0.0)
    else:
      delta = (jnp.where((code_BxT == 1)[..., None], delta_GxBxTxD[0], 0.0)
               + jnp.where((code_BxT == 2)[..., None], delta_GxBxTxD[1], 0.0))
    if self.dropout and module.has_rng("dropout"):
      delta = nn.Dropout(self.dropout, deterministic=False, name="reft_dropout")(delta)
    return (h + layer_params["on"] * delta).astype(x.dtype)

  def flops_per_token(self, cfg: Any, seq_len: int, trained: int) -> float:
    """Per edited layer and intervention, three d×r matmuls (W h, R h, Rᵀ e), computed at every token: 2·3·d·r
    FLOPs forward, times 3 with the backward."""
    n = len(self.layer_indices(cfg.num_layers))
    edits = 2 if self.method != "direft" else 1
    return 3.0 * 2 * (edits + 1) * cfg.d_model * self.rank * self.groups * n

  def batch_columns(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    first, last = self.sides
    seg, mask = row["segment_ids"], row["loss_mask"]
    codes = np.zeros(seg.shape, np.int32)
    for s in np.unique(seg[seg > 0]):
      at = np.flatnonzero(seg == s)
      weighted = np.flatnonzero(mask[at] > 0)
      n = len(at) if not len(weighted) or weighted[0] == 0 else int(weighted[0]) + 1
      codes[at[:n]] = segment_codes(n, first, last)
    return {"intervene": codes}

  def prompt_columns(self, prompt_lengths: np.ndarray, width: int) -> dict[str, np.ndarray]:
    first, last = self.sides
    codes = np.zeros((len(prompt_lengths), width), np.int32)
    for i, n in enumerate(prompt_lengths):
      codes[i, :n] = segment_codes(int(n), first, last)
    return {"intervene": codes}

  def describe(self, trained: int) -> str:
    return (f"{trained:,} trained: {self.method} rank {self.rank} at {self.positions} of blocks {self.layers}"
            f"{', shared' if self.groups == 1 else ''}")


def _orthonormal_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """Random [.., d, r] matrices with orthonormal columns, one per leading index."""
  return jnp.linalg.qr(jax.random.normal(key, shape, jnp.float32))[0].astype(dtype)
