"""`reward`: a reward model (a score model with `model.num_labels = 1`) trained on preference pairs, Bradley–Terry:
−log σ(r⁺ − r⁻ − objective.reward_margin) per pair, plus TRL's optional centring term
objective.center_rewards_coefficient · (r⁺ + r⁻)², which keeps the scores near zero. r is the score at a response
sequence's last token (fmjax/objectives/score.py); both sides of every pair go through ONE forward pass.

Metrics (means over pairs; `eval_` on held-out pairs): `accuracy` (r⁺ > r⁻, strictly: a tie is a miss),
`margin` (r⁺ − r⁻), `rewards/chosen`, `rewards/rejected`, `rewards/mean` (over both sides) and `rewards/std` (over
the pairs' scores of each micro-batch, weighted by its pairs: the spread the centring term acts on).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fmjax import checks
from fmjax.objectives import options
from fmjax.objectives.base import Head, LossContext, LossOutput
from fmjax.objectives.preference import stacked_sides
from fmjax.objectives.score import last_token_scores


def pair_scores(scores_2BxTx1: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(r⁺, r⁻, valid), each [B, T+1] per (row, segment): the pairs' scores and 1.0 where both responses exist."""
  seg = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])
  pooled, present = last_token_scores(scores_2BxTx1, seg)
  B = batch["chosen_tokens"].shape[0]
  return pooled[:B, :, 0], pooled[B:, :, 0], present[:B] * present[B:]


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  reward_margin: float = options.field(0.0, "the score gap a chosen response must clear, −log σ(r⁺ − r⁻ − margin)")
  center_rewards_coefficient: float = options.field(
      0.0, "weight of (r⁺ + r⁻)², which keeps scores centred (TRL's)", checks.non_negative("0 = no centring"))


def make(o: Options) -> Head:
  margin, center = float(o.reward_margin), float(o.center_rewards_coefficient)

  def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
    chosen, rejected, valid = pair_scores(ctx.apply(params, stacked_sides(batch)), batch)
    losses = -jax.nn.log_sigmoid(chosen - rejected - margin) + center * jnp.square(chosen + rejected)
    total = lambda x: jnp.sum(valid * x)  # noqa: E731
    pairs = jnp.sum(valid)
    mean = total(chosen + rejected) / jnp.maximum(2 * pairs, 1.0)
    std = jnp.sqrt(total(jnp.square(chosen - mean) + jnp.square(rejected - mean)) / jnp.maximum(2 * pairs - 1, 1.0))
    metrics = {"accuracy": total((chosen > rejected).astype(jnp.float32)), "margin": total(chosen - rejected),
               "rewards/chosen": total(chosen), "rewards/rejected": total(rejected),
               "rewards/mean": mean * pairs, "rewards/std": std * pairs}
    return total(losses), pairs, metrics

  return Head(loss, layouts=("pairs",), output="score")


HEAD = options.HeadType(Options, make)
