"""`lm`: next-token cross-entropy for pre-training and continuous pre-training, with optional z-loss."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fmjax.model.token_stats import TokenStats, from_logits
from fmjax.objectives.base import Head, LossContext, LossOutput


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(negative log-likelihood, log-partition) per token, in float32."""
  stats = from_logits(logits_BxTxV, targets_BxT)
  return -stats.logp, stats.logz


def masked_nll(stats: TokenStats, mask_BxT: jax.Array, z_loss: float) -> LossOutput:
  """(Σ nll + z_loss·Σ logz², Σ mask, {nll[, z_loss]} sums) over the tokens where `mask_BxT` is 1."""
  nll_sum = -jnp.sum(stats.logp * mask_BxT)
  z_sum = jnp.sum(jnp.square(stats.logz) * mask_BxT)
  metrics = {"nll": nll_sum}
  if z_loss:
    metrics["z_loss"] = z_sum
  return nll_sum + z_loss * z_sum, jnp.sum(mask_BxT), metrics


def make(objective_cfg: Any) -> Head:
  """Next-token cross-entropy on the loss mask; metrics `nll` (and `z_loss`)."""
  z_loss = float(objective_cfg.z_loss)

  def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
    return masked_nll(ctx.token_stats(params, batch), batch["loss_mask"].astype(jnp.float32), z_loss)

  return Head(loss, reports_nll=True)
