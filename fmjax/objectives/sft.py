"""`sft`: supervised / instruction fine-tuning: cross-entropy on the response tokens of prompt/completion and chat
examples (the data's loss mask: completions, assistant turns with their end marker, and EOS), with token accuracy.

With `objective.completion_only=False` every real token of an example trains (prompt included), as TRL's
`completion_only_loss=False`; padding never does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fmjax.objectives import lm, options
from fmjax.objectives.base import Head, LossContext, LossOutput
from fmjax.objectives.lm import masked_nll


@dataclasses.dataclass(frozen=True)
class Options(lm.Options):
  completion_only: bool = options.field(True, "loss on responses only (False: on every real token of an example)")


def make(o: Options) -> Head:
  """Response cross-entropy; metrics `nll`, `accuracy` (and `z_loss`)."""
  z_loss, completion_only = float(o.z_loss), bool(o.completion_only)

  def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
    stats = ctx.token_stats(params, batch, extra=("argmax",))
    if completion_only:
      mask_BxT = batch["loss_mask"].astype(jnp.float32)
    else:
      mask_BxT = (batch["segment_ids"] > 0).astype(jnp.float32)
    loss_sum, weight, metrics = masked_nll(stats, mask_BxT, z_loss)
    hit_BxT = (stats.argmax == batch["targets"]).astype(jnp.float32)
    metrics["accuracy"] = jnp.sum(hit_BxT * mask_BxT)  # greedy next-token accuracy on the trained tokens
    return loss_sum, weight, metrics

  return Head(loss, reports_nll=True)


HEAD = options.HeadType(Options, make)
