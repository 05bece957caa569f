"""Held-out loss by token position (`eval.position_buckets`): does the model use context past a given length?

Positions 0..T-1 (T = train.seq_len) fall into N equal buckets, bucket i = [ceil(i·T/N), ceil((i+1)·T/N) − 1], logged
as `eval_loss_pos/<lo>-<hi>` (and `eval_loss_pos/<lo>-<hi>/<source>` with several eval sources): the held-out NLL
of the targets at those positions. The eval step does not run the model again: it keeps the per-token statistics
the head itself asked the model for (`ctx.token_stats` of the batch) and sums NLL and loss-mask weight per bucket
beside the head's own (sum, weight). A position is the one RoPE sees (`positions`): within the row under
data.text_packing='stream', within its document (restarting at a row's start) under 'documents'. A bucket no
held-out token reaches reads NaN.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import UserError
from fmjax.objectives import LossContext, LossOutput

PREFIX = "eval_loss_pos/"


def bucket_of_position(seq_len: int, buckets: int) -> np.ndarray:
  """[seq_len] int32: the bucket of each position, floor(p·N/T), computed in int64 (p·N overflows int32 at 64k)."""
  return (np.arange(seq_len, dtype=np.int64) * buckets // seq_len).astype(np.int32)


def names(seq_len: int, buckets: int) -> list[str]:
  """`<lo>-<hi>` (inclusive) of each bucket."""
  of = bucket_of_position(seq_len, buckets)
  return [f"{np.flatnonzero(of == i)[0]}-{np.flatnonzero(of == i)[-1]}" for i in range(buckets)]


def bucket_sums(nll_BxT: jax.Array, mask_BxT: jax.Array, positions_BxT: jax.Array, seq_len: int,
                buckets: int) -> tuple[jax.Array, jax.Array]:
  """(Σ nll·mask, Σ mask) per position bucket, each [buckets] float32."""
  table_T = jnp.asarray(bucket_of_position(seq_len, buckets))
  bucket_BxT = table_T[jnp.clip(positions_BxT, 0, seq_len - 1)]
  mask_BxT = mask_BxT.astype(jnp.float32)
  sums = jax.ops.segment_sum((nll_BxT * mask_BxT).ravel(), bucket_BxT.ravel(), num_segments=buckets)
  weights = jax.ops.segment_sum(mask_BxT.ravel(), bucket_BxT.ravel(), num_segments=buckets)
  return sums, weights


def eval_step(loss: Callable[..., LossOutput], context: Callable[..., LossContext], seq_len: int,
              buckets: int) -> Callable[..., tuple]:
  """`(state, batch) -> (loss_sum, weight, metric_sums, (bucket NLL sums, bucket weights))`: the head's `loss` under
  `context(base, frozen)`, whose per-token statistics of the batch are also summed per bucket (`buckets` 0: no
  buckets, an empty tuple). A head that never asks for them (a preference or score head) is an error at trace time."""

  def step(state: Any, batch: dict[str, jax.Array]) -> tuple:
    ctx = context(state.base, state.frozen)
    if not buckets:
      return (*loss(state.params, batch, ctx), ())
    seen = []

    def stats(params, inputs, temperature=1.0, extra=()):
      out = ctx.token_stats(params, inputs, temperature, extra)
      if inputs.get("targets") is batch["targets"]:  # the batch's own targets, not a preference side's
        seen.append(out)
      return out

    out = loss(state.params, batch, dataclasses.replace(ctx, stats=stats))
    if not seen:
      raise UserError(f"eval.position_buckets={buckets} needs a head that asks for the batch's per-token "
                      "statistics (a next-token loss); set eval.position_buckets=0 for this head.")
    return (*out, bucket_sums(-seen[0].logp, batch["loss_mask"], batch["positions"], seq_len, buckets))

  return step


def metrics(outs: list[tuple], seq_len: int, suffix: str = "") -> dict[str, jax.Array]:
  """`eval_loss_pos/<lo>-<hi><suffix>` over the eval steps' outputs `outs` (none when they hold no buckets)."""
  parts = [o[3] for o in outs if o[3]]
  if not parts:
    return {}
  sums, weights = sum(p[0] for p in parts), sum(p[1] for p in parts)
  means = jnp.where(weights > 0, sums / jnp.maximum(weights, 1e-9), jnp.nan)
  return {f"{PREFIX}{name}{suffix}": means[i] for i, name in enumerate(names(seq_len, len(sums)))}
