"""Mixture-of-experts feed-forward (`model.num_experts > 0`): a router scores every token against `num_experts`
SwiGLU experts, each token goes to its `num_experts_per_tok` best, and their outputs are summed with the router's
weights.

Routing (float32): softmax over all experts, top-k; with `moe_norm_topk` the k weights are renormalised to sum to 1
(Mixtral; Qwen3-MoE's `norm_topk_prob`), else kept as they are. Optional shared experts (DeepSeek) are one plain
SwiGLU every token passes through, `moe_shared_experts * mlp_dim` wide.

Dispatch, per device (`jax.shard_map` under a mesh, so the sort never spans the global batch):
- dropless (default): the (token, choice) pairs are sorted by expert and each expert's rows go through one grouped
  matmul (`grouped_matmul`: `jax.lax.ragged_dot`, or megablox's Pallas kernel on TPU). With expert parallelism (the
  logical axis `exp` on a mesh axis) each device gathers the tokens of its expert-parallel peers, runs its own
  experts on the rows routed to them (the grouped matmul visits only those), and the partial outputs are summed and
  scattered back (one all-gather and one reduce-scatter over the expert axis): exact, dropless, and the same on
  every platform (XLA:CPU has no ragged all-to-all); its buffers hold every peer's rows.
- capacity (`moe_capacity_factor > 0`): each expert takes at most C = ceil(factor · tokens · k / experts) rows per
  device, earliest tokens first; the rest are dropped (they contribute 0 and pass through the residual). Rows travel
  in fixed [experts, C, D] buffers, exchanged over the expert axis by all-to-all (GShard / Switch).

Each layer sows its router statistics (`intermediates/.../router_stats`); `stats` stacks them over layers and
`aux_terms` gives the load-balancing loss as Hugging Face's `load_balancing_loss_func` computes it (over all layers'
tokens at once), the router z-loss, the expert load (max / mean rows per expert) and the dropped fraction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fmjax import sharding
from fmjax.model.config import ModelConfig
from fmjax.model.layers import SwiGLU, dense_param, project, swiglu
from fmjax.model.splash import target_platform

STATS = "router_stats"  # the sown entry in the intermediates collection


def grouped_matmul(x_MxD: jax.Array, w_ExDxF: jax.Array, sizes_E: jax.Array, impl: str) -> jax.Array:
  """Rows [sum(sizes[:e]), sum(sizes[:e+1])) of x times w[e]; rows past sum(sizes) give 0. `impl`: 'ragged_dot'
  (jax.lax.ragged_dot), 'megablox' (the Pallas TPU kernel; interpret mode elsewhere, exact but slow) or 'auto'
  (megablox when compiling for TPU)."""
  if impl == "auto":
    impl = "megablox" if target_platform() == "tpu" else "ragged_dot"
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(x_MxD, w_ExDxF, sizes_E.astype(jnp.int32), preferred_element_type=x_MxD.dtype)
  from jax.experimental.pallas.ops.tpu.megablox import ops  # optional Pallas kernel

  M = x_MxD.shape[0]
  dims = tiling(M, w_ExDxF.shape[1], w_ExDxF.shape[2])
  rows = jnp.arange(M + (-M % dims[0])) < jnp.sum(sizes_E)
  # the kernel takes whole row tiles and never visits rows past the groups, whose outputs (and, in the backward
  # pass, input cotangents) it leaves unwritten: both sides are masked, so nothing unwritten flows on
  x = jnp.where(rows[:, None], jnp.pad(x_MxD, ((0, rows.shape[0] - M), (0, 0))), 0)
  out = ops.gmm(x, w_ExDxF, sizes_E.astype(jnp.int32), x_MxD.dtype, dims, None, None, False,
                target_platform() != "tpu")
  return jnp.where(rows[:M, None], out[:M], 0).astype(x_MxD.dtype)


def tiling(rows: int, k: int, n: int) -> tuple[int, int, int]:
  """Megablox's tiles for [rows, k] x [E, k, n]: 512 rows (128 for few rows); k and n whole up to 1024, else the
  largest of 1024 / 512 / 256 / 128 that divides them. As MaxText's defaults (512 x 1024 x 1024): with 128-row
  tiles the weights stream once per 128 rows and the kernel is memory-bound (2.3x the bytes per Mixtral layer), and
  Qwen3-MoE's 768-wide experts in 256-wide tiles read each row three times."""
  edge = lambda d: d if d <= 1024 else next((t for t in (1024, 512, 256, 128) if d % t == 0), d)  # noqa: E731
  return (512 if rows >= 4096 else 128), edge(k), edge(n)


def _swiglu_experts(x_MxD, sizes_E, w_gate, w_up, w_down, impl):
  h_MxF = swiglu(grouped_matmul(x_MxD, w_gate, sizes_E, impl), grouped_matmul(x_MxD, w_up, sizes_E, impl))
  return grouped_matmul(h_MxF, w_down, sizes_E, impl)


def grouped_matmul_cost(rows: int, k: int, n: int, groups: int, tiling: tuple[int, int, int],
                        itemsize: int) -> dict[str, tuple[float, float]]:
  """Analytic work of megablox's grouped matmul [rows, k] x [groups, k, n] -> [rows, n]: {'forward' | 'backward':
  (FLOPs, HBM bytes)}, counted as the kernels' own cost estimates state them (jax.experimental.pallas.ops.tpu.
  megablox.gmm): every row the kernel is given costs 2·k·n FLOPs; the left operand is streamed once per column tile
  of the output, the weights once per row tile (a row tile that straddles a group boundary is visited once per
  group); the output is written once. The backward is a gmm against the transposed weights (d rows) and a tgmm
  (d weights: rows streamed once per column tile, the output gradient once per row-of-weights tile)."""
  tm, tk, tn = tiling
  ceil = lambda a, b: -(-a // b)  # noqa: E731
  row_tiles = ceil(rows, tm) + groups - 1
  flops = 2.0 * rows * k * n
  forward = rows * k * ceil(n, tn) + k * n * row_tiles + rows * n
  d_rows = rows * n * ceil(k, tn) + k * n * row_tiles + rows * k
  d_weights = rows * k * ceil(n, tn) + rows * n * ceil(k, tk) + groups * k * n
  return {"forward": (flops, itemsize * forward), "backward": (2 * flops, itemsize * (d_rows + d_weights))}


def layer_kernel_cost(cfg: ModelConfig, rows: int, groups: int, width: int) -> dict[str, tuple[float, float]]:
  """One MoE layer's three grouped matmuls (gate and up [rows, D] x [groups, D, width], down back) as `tiling` gives
  them to megablox, rows padded to whole row tiles: {'forward' | 'backward': (FLOPs, HBM bytes)}."""
  itemsize = jnp.dtype(cfg.dtype).itemsize
  out = {"forward": (0.0, 0.0), "backward": (0.0, 0.0)}
  for k, n in ((cfg.d_model, width), (cfg.d_model, width), (width, cfg.d_model)):
    tiles = tiling(rows, k, n)
    work = grouped_matmul_cost(rows + -rows % tiles[0], k, n, groups, tiles, itemsize)
    out = {p: (out[p][0] + work[p][0], out[p][1] + work[p][1]) for p in out}
  return out

@dataclasses.dataclass(frozen=True)
class Axes:
  """Mesh axes (tuples, possibly empty) the shard_map body talks over."""
  batch: tuple[str, ...] = ()  # tokens' leading dim
  expert: tuple[str, ...] = ()  # the experts dim of the expert weights
  embed: tuple[str, ...] = ()  # their model dim (FSDP): gathered before use
  mlp: tuple[str, ...] = ()  # their hidden dim (tensor): partial outputs summed

  @property
  def split_tokens(self) -> bool:
    """Whether each expert-parallel peer holds other tokens (the batch is split over the expert axes too)."""
    return bool(self.expert) and set(self.expert) <= set(self.batch)


def _gather(x, axes, axis):
  return jax.lax.all_gather(x, axes, axis=axis, tiled=True) if axes else x


def _local_dropless(x_NxD, idx_NxK, gate_NxK, w_gate, w_up, w_down, *, axes: Axes, impl: str):
  """One device's dropless MoE: returns (y [N,D], dropped=0)."""
  N, K = idx_NxK.shape
  E_local = w_gate.shape[0]
  if axes.split_tokens:  # every token of the expert-parallel group, routed to this device's experts only
    x_NxD, idx_NxK, gate_NxK = (_gather(a, axes.expert, 0) for a in (x_NxD, idx_NxK, gate_NxK))
  if axes.expert:
    local_NxK = idx_NxK - jax.lax.axis_index(axes.expert) * E_local
  else:
    local_NxK = idx_NxK
  mine_NxK = (local_NxK >= 0) & (local_NxK < E_local)
  flat = jnp.where(mine_NxK, local_NxK, E_local).reshape(-1)  # other devices' experts sort last, in no group
  order = jnp.argsort(flat, stable=True)
  sizes_E = jnp.bincount(flat, length=E_local + 1)[:E_local]
  ys_MxD = _swiglu_experts(x_NxD[order // K], sizes_E, w_gate, w_up, w_down, impl)
  y_NxKxD = ys_MxD[jnp.argsort(order)].reshape(*idx_NxK.shape, -1)
  y_NxD = jnp.einsum("NKD,NK->ND", y_NxKxD, jnp.where(mine_NxK, gate_NxK, 0).astype(y_NxKxD.dtype))
  if axes.mlp:
    y_NxD = jax.lax.psum(y_NxD, axes.mlp)
  if axes.split_tokens:
    y_NxD = jax.lax.psum_scatter(y_NxD, axes.expert, scatter_dimension=0, tiled=True)
  elif axes.expert:  # the same tokens on every peer (a batch the axes do not divide): sum the experts' parts
    y_NxD = jax.lax.psum(y_NxD, axes.expert)
  return y_NxD, jnp.zeros((), jnp.float32)


def capacity(tokens: int, k: int, experts: int, factor: float) -> int:
  """Rows each expert takes per device: ceil(factor · tokens · k / experts), at least 1."""
  return max(1, math.ceil(factor * tokens * k / experts))


def _local_capacity(x_NxD, idx_NxK, gate_NxK, w_gate, w_up, w_down, *, axes: Axes, factor: float, experts: int):
  """One device's capacity-factor MoE: returns (y [N,D], dropped assignments)."""
  N, K = idx_NxK.shape
  D = x_NxD.shape[1]
  C = capacity(N, K, experts, factor)
  flat = idx_NxK.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # by expert, earliest (token, choice) first
  expert_M = flat[order]
  sizes_E = jnp.bincount(flat, length=experts)
  rank_M = jnp.arange(flat.shape[0]) - (jnp.cumsum(sizes_E) - sizes_E)[expert_M]
  keep_M = rank_M < C
  slot_M = jnp.where(keep_M, expert_M * C + rank_M, experts * C)  # dropped rows go to a discarded extra slot
  buf = jnp.zeros((experts * C + 1, D), x_NxD.dtype).at[slot_M].set(x_NxD[order // K])[:-1]
  buf_ExCxD = buf.reshape(experts, C, D)
  E_local = w_gate.shape[0]
  if axes.split_tokens:  # [E, C, D] -> this device's experts, the rows of every peer: [E_local, ep·C, D]
    buf_ExCxD = jax.lax.all_to_all(buf_ExCxD, axes.expert, split_axis=0, concat_axis=1, tiled=True)
  elif axes.expert:  # the same tokens on every peer: each takes its own experts' rows
    buf_ExCxD = jax.lax.dynamic_slice_in_dim(buf_ExCxD, jax.lax.axis_index(axes.expert) * E_local, E_local)
  h = swiglu(jnp.einsum("ECD,EDF->ECF", buf_ExCxD, w_gate), jnp.einsum("ECD,EDF->ECF", buf_ExCxD, w_up))
  out_ExCxD = jnp.einsum("ECF,EFD->ECD", h, w_down)
  if axes.mlp:
    out_ExCxD = jax.lax.psum(out_ExCxD, axes.mlp)
  if axes.split_tokens:
    out_ExCxD = jax.lax.all_to_all(out_ExCxD, axes.expert, split_axis=1, concat_axis=0, tiled=True)
  elif axes.expert:
    out_ExCxD = _gather(out_ExCxD, axes.expert, 0)
  out = jnp.concatenate([out_ExCxD.reshape(experts * C, D), jnp.zeros((1, D), out_ExCxD.dtype)])
  ys_MxD = out[slot_M]  # dropped rows read the zero slot
  y_NxKxD = ys_MxD[jnp.argsort(order)].reshape(N, K, D)
  y_NxD = jnp.einsum("NKD,NK->ND", y_NxKxD, gate_NxK.astype(y_NxKxD.dtype))
  return y_NxD, jnp.sum(~keep_M).astype(jnp.float32)


def mesh_axes() -> Axes:
  """The mesh axes of the tokens and the experts' weights under the current logical-axis rules."""
  axes = sharding.logical_axes
  return Axes(batch=axes("act_batch"), expert=axes("exp"), embed=axes("embed"), mlp=axes("mlp"))


def experts(x_BxTxD: jax.Array, idx_BxTxK: jax.Array, gate_BxTxK: jax.Array, w_gate: jax.Array, w_up: jax.Array,
            w_down: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """The routed experts' weighted sum [B,T,D] and the number of dropped (token, choice) pairs."""
  B, T, D = x_BxTxD.shape
  mesh = jax.sharding.get_abstract_mesh()
  if cfg.moe_capacity_factor > 0:
    local = lambda *a, axes: _local_capacity(*a, axes=axes, factor=cfg.moe_capacity_factor,  # noqa: E731
                                             experts=cfg.num_experts)
  else:
    local = lambda *a, axes: _local_dropless(*a, axes=axes, impl=cfg.moe_matmul)  # noqa: E731

  def run(x, idx, gate, wg, wu, wd, axes=Axes()):
    b, t = x.shape[:2]
    wg, wu, wd = _gather(wg, axes.embed, 1), _gather(wu, axes.embed, 1), _gather(wd, axes.embed, 2)  # FSDP
    y, dropped = local(x.reshape(b * t, D), idx.reshape(b * t, -1), gate.reshape(b * t, -1), wg, wu, wd, axes=axes)
    return y.reshape(b, t, D), dropped

  if mesh.empty:
    return run(x_BxTxD, idx_BxTxK, gate_BxTxK, w_gate, w_up, w_down)
  axes = mesh_axes()
  if B % math.prod(mesh.shape[a] for a in axes.batch):
    axes = dataclasses.replace(axes, batch=())  # rows the batch axes do not divide (a sampler's): on every device
  length = sharding.logical_axes("act_len")  # a sequence split over context devices: more tokens, each routed alone
  if T % math.prod(mesh.shape[a] for a in length):
    length = ()
  batch, exp, embed, mlp = (getattr(axes, f) or None for f in ("batch", "expert", "embed", "mlp"))
  tok = P(batch, length or None)
  w_in, w_out = P(exp, embed, mlp), P(exp, mlp, embed)

  def body(x, idx, gate, wg, wu, wd):
    y, dropped = run(x, idx, gate, wg, wu, wd, axes)
    return y, jax.lax.psum(dropped, axes.batch + length)

  # check_vma=False: megablox's pallas_call declares no varying-axes type for its output, which the check requires
  # (as splash's shard_map does); the gradients are tested equal to one device's on every split
  run_sharded = jax.shard_map(body, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=(tok, P()),
                              check_vma=False)
  y, dropped = run_sharded(x_BxTxD, idx_BxTxK, gate_BxTxK, w_gate, w_up, w_down)
  return y, dropped


def route(logits_NxE: jax.Array, k: int, norm_topk: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(probs [N,E], top-k weights [N,K], top-k experts [N,K]) of float32 router logits."""
  probs = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
  weights, idx = jax.lax.top_k(probs, k)
  if norm_topk:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return probs, weights, idx


def router_stats(logits_BxTxE: jax.Array, probs_BxTxE: jax.Array, idx_BxTxK: jax.Array, valid_BxT: jax.Array,
                 dropped: jax.Array) -> dict[str, jax.Array]:
  """One layer's sums over its valid tokens: rows per expert, router probability per expert, tokens, Σ z², dropped."""
  E = probs_BxTxE.shape[-1]
  v = valid_BxT.astype(jnp.float32)
  onehot = jax.nn.one_hot(idx_BxTxK, E, dtype=jnp.float32).sum(axis=-2)  # [B,T,E]
  z = jax.nn.logsumexp(logits_BxTxE.astype(jnp.float32), axis=-1)
  return {"rows": jnp.einsum("BTE,BT->E", onehot, v), "probs": jnp.einsum("BTE,BT->E", probs_BxTxE, v),
          "tokens": jnp.sum(v), "z_sq": jnp.sum(z * z * v), "dropped": dropped}


def stats(intermediates: Any) -> dict[str, jax.Array] | None:
  """The sown router statistics of every MoE layer in an `intermediates` collection, each stacked with a leading
  layers axis; None when the model has no MoE layer."""
  found = []

  def visit(tree):
    if isinstance(tree, dict):
      for key, value in tree.items():
        if key == STATS:
          found.extend(value)  # sow keeps a tuple per call
        else:
          visit(value)

  visit(intermediates)
  if not found:
    return None
  # under a layer scan each leaf already has a leading layers axis; unscanned layers sow one value each
  layered = [s if s["tokens"].ndim else jax.tree.map(lambda a: a[None], s) for s in found]
  return jax.tree.map(lambda *a: jnp.concatenate(a), *layered)


def aux_terms(layer_stats: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """From per-layer statistics [L, ...]: the load-balancing loss E · Σₑ fₑ · Pₑ with fₑ and Pₑ the fraction of
  rows and the mean router probability of expert e over all layers' valid tokens (transformers'
  `load_balancing_loss_func`), the router z-loss (mean logsumexp² of the router logits), the expert load (max rows
  per expert over the mean, averaged over layers) and the fraction of rows dropped by a capacity."""
  rows_LxE, probs_LxE, tokens_L = layer_stats["rows"], layer_stats["probs"], layer_stats["tokens"]
  E = rows_LxE.shape[-1]
  total = jnp.maximum(jnp.sum(tokens_L), 1.0)
  balance = E * jnp.sum(jnp.sum(rows_LxE, 0) / total * jnp.sum(probs_LxE, 0) / total)
  mean_rows = jnp.maximum(tokens_L * k / E, 1e-9)
  return {"aux_loss": balance, "z_loss": jnp.sum(layer_stats["z_sq"]) / total,
          "load_max": jnp.mean(jnp.max(rows_LxE, -1) / mean_rows),
          "dropped": jnp.sum(layer_stats["dropped"]) / (total * k)}


def loss_terms(collected: list[dict[str, jax.Array]], cfg: ModelConfig
               ) -> tuple[jax.Array, dict[str, jax.Array]] | None:
  """What the router adds to a head's per-token loss, and its metrics, from the statistics of the model's calls in
  one loss evaluation (`stats` of each); None when there were none."""
  if not collected:
    return None
  terms = aux_terms(jax.tree.map(lambda *a: jnp.concatenate(a), *collected), cfg.num_experts_per_tok)
  loss = cfg.moe_aux_loss * terms["aux_loss"] + cfg.moe_z_loss * terms["z_loss"]
  return loss, {f"moe/{k}": v for k, v in terms.items()}


class MoE(nn.Module):
  """Router + routed SwiGLU experts (+ shared experts): [B,T,D] -> [B,T,D]; sows this layer's router statistics."""

  cfg: ModelConfig
  adapter: Any = None

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, valid_BxT: jax.Array) -> jax.Array:
    cfg = self.cfg
    D, F, E, K = cfg.d_model, cfg.mlp_dim, cfg.num_experts, cfg.num_experts_per_tok
    w_router = dense_param(self, "router", (D, E), ("embed", None), cfg)
    w_gate = dense_param(self, "expert_gate", (E, D, F), ("exp", "embed", "mlp"), cfg)
    w_up = dense_param(self, "expert_up", (E, D, F), ("exp", "embed", "mlp"), cfg)
    w_down = dense_param(self, "expert_down", (E, F, D), ("exp", "mlp", "embed"), cfg,
                         std=cfg.init_std / math.sqrt(2 * cfg.num_layers))
    logits_BxTxE = project(self, None, "router", "BTD,DE->BTE", x_BxTxD, w_router, ("embed", None), jnp.float32)
    probs_BxTxE, gate_BxTxK, idx_BxTxK = route(logits_BxTxE, K, cfg.moe_norm_topk)
    y_BxTxD, dropped = experts(x_BxTxD, idx_BxTxK, gate_BxTxK, w_gate, w_up, w_down, cfg)
    self.sow("intermediates", STATS, router_stats(logits_BxTxE, probs_BxTxE, idx_BxTxK, valid_BxT, dropped))
    if cfg.moe_shared_experts:
      shared = dataclasses.replace(cfg, mlp_dim=cfg.moe_shared_experts * F)
      y_BxTxD = y_BxTxD + SwiGLU(shared, self.adapter, name="shared")(x_BxTxD)
    return y_BxTxD.astype(x_BxTxD.dtype)


