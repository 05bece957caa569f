"""`lm`: next-token cross-entropy for pre-training and continuous pre-training, with optional z-loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fmjax.model.token_stats import TokenStats, from_logits
from fmjax import checks
from fmjax.objectives import options
from fmjax.objectives.base import Head, LossContext, LossOutput


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  z_loss: float = options.field(0.0, "weight of logsumexp(logits)² (PaLM uses 1e-4)", checks.non_negative())


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


def make(o: Options) -> Head:
  """Next-token cross-entropy on the loss mask; metrics `nll` (and `z_loss`)."""
  z_loss = float(o.z_loss)

  def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
    return masked_nll(ctx.token_stats(params, batch), batch["loss_mask"].astype(jnp.float32), z_loss)

  return Head(loss, reports_nll=True)


HEAD = options.HeadType(Options, make)
