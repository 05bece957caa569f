"""`online_dpo`: DPO on the policy's own samples (TRL's OnlineDPOTrainer). Each rollout samples two completions of
each prompt with the current params; the judge (objective.rewards: reward functions and/or the reward model) scores
both (less objective.missing_eos_penalty for a completion that hit the length limit), the higher-scored one is
chosen (a tie: the first, as TRL's `first >= second`), and the pair trains with the DPO loss against the reference
(the starting policy; under a parameterisation the base with it off):

  sigmoid  −logσ(β·h)          h = (log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))
  ipo      (h − 1/(2β))²       on the same sums (TRL's online IPO does not average over tokens)

log π(y) sums the completion's token log-probs at temperature 1: TRL samples at objective.temperature but scores
with the plain logits. The loss is a mean over pairs.

Pairs stay exact under any train.grad_accum: the driver lays prompt k's two completions on rows 2k, 2k+1, and a
micro-batch takes rows i, i+n, ... (train/step.py), so a pair's rows are in different micro-batches. So the rollout
`prepare`s, under the params that sampled it (the ones the step trains, as there is one step per rollout), each
row's reference sum and its partner's policy and reference sums as columns; each row then holds its pair's loss
alone: the chosen row adds ℓ(own, partner), the rejected row adds ℓ − sg[ℓ] (no value, its side's gradient). The
gradient is the pair loss's exactly; the price is one forward pass of the policy per rollout without gradient.

Metrics (means over pairs, TRL's names): rewards/chosen = β·(log π − log π_ref)(y_c), rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, objective/kl (Σ_t log π − log π_ref, mean over
completions), objective/entropy (−Σ_t log π, mean over completions), objective/non_score_reward (−β·kl),
objective/scores (the judge's mean score), objective/scores_margin, objective/rlhf_reward (scores + non_score_reward).
TRL's val/contain_eos_token is the rollout's completions/terminated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import checks
from fmjax.objectives import options, sampling
from fmjax.objectives import preference_losses as L
from fmjax.objectives.base import REFERENCE, REWARD_MODEL, Head, LossContext, LossOutput, Rollout

LOSS_TYPES = ("sigmoid", "ipo")
JUDGED = ("chosen", "score", "partner_score")  # per_completion's columns
PREPARED = ("ref_logp", "partner_logp", "partner_ref_logp")  # prepare's: per-row constants
_field = options.field


@dataclasses.dataclass(frozen=True)
class Options(sampling.Options):
  temperature: float = _field(0.9, "sampling temperature (the loss scores at 1, as TRL)", checks.positive())
  beta: float = _field(0.1, "β, the inverse temperature of the implicit reward", checks.positive())
  loss_type: str = _field("sigmoid", "sigmoid (DPO) | ipo", checks.one_of(LOSS_TYPES))


def judge(scores: np.ndarray, group: int = 2) -> dict[str, np.ndarray]:
  """Each completion's columns from the judge's scores [N] (rows 2k, 2k+1: prompt k's pair): `chosen` 1.0 for the
  pair's higher score (a tie: the first, as TRL's `first >= second`), its own and its partner's score."""
  if group != 2:  # the head's rollout fixes it; a driver that changed it would pair the wrong rows
    raise ValueError(f"online DPO judges pairs of completions, not groups of {group}")
  pairs = np.asarray(scores, np.float64).reshape(-1, 2)
  first = pairs[:, 0] >= pairs[:, 1]
  chosen = np.stack([first, ~first], axis=1).astype(np.float32).reshape(-1)
  return {"chosen": chosen, "score": pairs.reshape(-1), "partner_score": pairs[:, ::-1].reshape(-1)}


def _swap(x_N: jax.Array) -> jax.Array:
  """Each row's partner's value (rows 2k <-> 2k+1)."""
  return x_N.reshape(-1, 2)[:, ::-1].reshape(-1)


def _sums(logp_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  return jnp.sum(logp_BxT * mask_BxT, axis=1)


def prepare(params, batch: dict[str, jax.Array], ctx: LossContext) -> dict[str, jax.Array]:
  """Per-row constants over whole pairs (run by the driver on train.batch_size rows of the laid-out rollout):
  the row's reference log-prob sum and its partner's policy and reference sums, broadcast over the row."""
  mask = batch["loss_mask"].astype(jnp.float32)
  own = _sums(ctx.token_stats(params, batch).logp, mask)
  ref = _sums(ctx.frozen_stats(REFERENCE.role, batch).logp, mask)
  row = lambda x: jnp.broadcast_to(x[:, None], mask.shape)  # noqa: E731
  return {"ref_logp": row(ref), "partner_logp": row(_swap(own)), "partner_ref_logp": row(_swap(ref))}


def pair_loss(pc, pr, rc, rr, cfg) -> jax.Array:
  if cfg.loss_type == "ipo":
    return L.ipo(pc, pr, rc, rr, 1.0, 1.0, cfg.beta)  # on sums, as TRL's online IPO
  return L.dpo(pc, pr, rc, rr, cfg.beta)


def make(cfg: Options) -> Head:
  beta = float(cfg.beta)

  def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
    mask = batch["loss_mask"].astype(jnp.float32)
    own = _sums(ctx.token_stats(params, batch).logp, mask)
    ref, partner, partner_ref = (jax.lax.stop_gradient(jnp.max(batch[k], axis=1)) for k in PREPARED)
    tokens = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    per_row = lambda k: jnp.sum(batch[k] * mask, axis=1) / tokens  # noqa: E731  (its value on its completion)
    chosen = per_row("chosen") > 0.5
    side = lambda mine, other: (jnp.where(chosen, mine, other), jnp.where(chosen, other, mine))  # noqa: E731
    (pc, pr), (rc, rr), (sc, sr) = side(own, partner), side(ref, partner_ref), side(per_row("score"),
                                                                                    per_row("partner_score"))
    losses = pair_loss(pc, pr, rc, rr, cfg)
    real = jnp.sum(batch["segment_ids"] > 0, axis=1) > 0
    first = (chosen & real).astype(jnp.float32)  # each pair once: on its chosen row
    second = (~chosen & real).astype(jnp.float32)
    loss_sum = jnp.sum(first * losses + second * (losses - jax.lax.stop_gradient(losses)))
    reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
    kl = ((pc - rc) + (pr - rr)) / 2  # per completion, the pair's mean
    scores = (sc + sr) / 2
    values = {"rewards/chosen": reward_c, "rewards/rejected": reward_r, "rewards/margins": reward_c - reward_r,
              "rewards/accuracies": (reward_c > reward_r).astype(jnp.float32), "logps/chosen": pc, "logps/rejected": pr,
              "objective/kl": kl, "objective/entropy": -(pc + pr) / 2, "objective/non_score_reward": -beta * kl,
              "objective/scores": scores, "objective/scores_margin": sc - sr,
              "objective/rlhf_reward": scores - beta * kl}
    metrics = {k: jnp.sum(first * jax.lax.stop_gradient(v)) for k, v in values.items()}
    return loss_sum, jnp.sum(first), metrics

  rollout = Rollout(
      group=2, max_completion_length=cfg.max_completion_length, rewards=cfg.rewards, per_completion=judge,
      columns=JUDGED, prepare=prepare, prepared=PREPARED, temperature=cfg.temperature, top_k=cfg.top_k,
      top_p=cfg.top_p, missing_eos_penalty=cfg.missing_eos_penalty, reward_timeout=cfg.reward_timeout, group_key="")
  return Head(loss, frozen=(REFERENCE,) + ((REWARD_MODEL,) if cfg.uses_reward_model() else ()), rollout=rollout)


HEAD = options.HeadType(Options, make)
