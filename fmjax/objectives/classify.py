"""`classify`: sequence classification (a score model with `model.num_labels` ≥ 2) on {text | prompt, label}
records: cross-entropy of the label against the scores at each sequence's last token (fmjax/objectives/score.py),
averaged over sequences. Metric `accuracy` (argmax = label); `eval_` on held-out records."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.objectives import options
from fmjax.objectives.base import Head, LossContext, LossOutput
from fmjax.objectives.preference import segment_sums
from fmjax.objectives.score import last_token_scores


def make(o: options.Options) -> Head:
  del o  # no options

  def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
    pooled_BxSxK, present_BxS = last_token_scores(ctx.apply(params, batch), batch["segment_ids"])
    label_BxS = segment_sums(batch["label"], batch["segment_ids"]).astype(jnp.int32)
    logp_BxSxK = jax.nn.log_softmax(pooled_BxSxK, axis=-1)
    nll_BxS = -jnp.take_along_axis(logp_BxSxK, label_BxS[..., None], axis=-1)[..., 0]
    hit_BxS = (jnp.argmax(pooled_BxSxK, axis=-1) == label_BxS).astype(jnp.float32)
    return jnp.sum(present_BxS * nll_BxS), jnp.sum(present_BxS), {"accuracy": jnp.sum(present_BxS * hit_BxS)}

  return Head(loss, layouts=("labelled",), output="labels")


HEAD = options.HeadType(options.Options, make)
