"""`grpo`: the policy loss of on-policy RL on rollout batches (fmjax/train/rollout.py makes them from the current
params: G sampled completions per prompt, their rewards and advantages). Per completion token t, with
ρ = π(t) / π_old(t) at the sampling temperature and Â the completion's advantage:

  loss_t = −min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â) + β·k3_t,   k3_t = e^(ref − logπ) − (ref − logπ) − 1 ≥ 0

where β = objective.kl_coef and ref is the log-prob under the reference (the starting policy; under a
parameterisation the base with it off); β = 0 builds no reference at all. π_old is the rollout params' log-prob
(the batch's `old_logps`); with one optimizer step per rollout (objective.num_iterations = 1) it is the current
log-prob without gradient, so ρ = 1 exactly, as in TRL. Normalisations (objective.loss_type), as (sum, weight)
pairs so that gradient accumulation and several hosts give exactly the full-batch value:
  grpo     mean over completions of each one's token mean          (Σ_i Σ_t loss·m / n_i,  weight: completions)
  dr_grpo  Σ loss·m / (completions · max_completion_length)        (a constant normaliser: no length bias)
  dapo     Σ loss·m / Σ m, a token mean over the global batch      (weight: completion tokens)
m is the completion mask (through the first EOS; zero for a truncated completion under
objective.mask_truncated_completions). Metrics, token means weighted like the loss: kl, entropy,
clip_ratio/low (ρ < 1 − ε_low where Â < 0), clip_ratio/high (ρ > 1 + ε_high where Â > 0).

With objective.importance_sampling_level='sequence' (GSPO) every token of a completion takes its sequence's ratio
s = exp(mean_t log ρ_t), clipped as one (GSPO's clip ranges are ~1e-3: objective.epsilon_low/high); 'sequence_token'
(GSPO-token) takes sg[s]·π(t)/sg[π(t)]: the same value, each token's own gradient, so per-token advantages may differ
(with one advantage per completion its gradient is GSPO's). GSPO optimises per sequence: loss_type 'grpo' is its
normaliser (a token-sum normaliser weights each sequence by its length, as TRL warns).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fmjax import checks
from fmjax.objectives import options, sampling
from fmjax.objectives.base import REFERENCE, REWARD_MODEL, Head, LossContext, LossOutput, Rollout
from fmjax.rl import advantages

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
RATIO_LEVELS = ("token", "sequence", "sequence_token")
_field = options.field


@dataclasses.dataclass(frozen=True)
class Options(sampling.Corrected):
  num_generations: int = _field(4, "completions sampled per prompt (G); train.batch_size = prompts × G",
                                checks.positive("completions sampled per prompt"))
  num_iterations: int = _field(1, "optimizer steps on each rollout (μ); > 1 reuses it with clipping",
                               checks.positive("optimizer steps per rollout"))
  loss_type: str = _field("dapo", "grpo (per-sequence token mean) | dr_grpo (÷ G·L_max) | dapo (token mean)",
                          checks.one_of(LOSS_TYPES))
  scale_rewards: str = _field("group", "advantages ÷ std of the group | batch | none, or rloo (leave-one-out)",
                              checks.one_of(advantages.SCALES))
  importance_sampling_level: str = _field("token", "the ratio clipped: token (GRPO) | sequence (GSPO: exp of the "
                                          "completion's mean log-ratio) | sequence_token (GSPO-token)",
                                          checks.one_of(RATIO_LEVELS))
  epsilon_low: float = _field(0.2, "the ratio's lower clip 1 − ε_low",
                              checks.in_range(0, 1, "[)", "the ratio's lower clip 1 − ε_low"))
  epsilon_high: float = _field(0.28, "the upper clip 1 + ε_high (DAPO's clip-higher; 0.2 = symmetric)",
                               checks.non_negative("the ratio's upper clip 1 + ε_high"))
  mask_truncated_completions: bool = _field(False, "no loss on completions that hit the length limit")
  kl_coef: float = _field(0.0, "β of the k3 KL to the reference (TRL's beta); 0 = no reference model at all",
                          checks.non_negative("0 = no KL term and no reference model"))


def policy_loss(logp: jax.Array, old: jax.Array, ref: jax.Array | None, advantages: jax.Array, mask: jax.Array,
                cfg: Any, weight: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(per-token loss [B,T], per-token metric values) of the clipped surrogate (times the sampler correction
  `weight`, if any) plus β·k3; all arrays [B,T]."""
  log_ratio = logp - old
  if cfg.importance_sampling_level != "token":  # GSPO: one length-normalised ratio per completion
    log_ratio = jnp.broadcast_to(jnp.sum(log_ratio * mask, axis=1, keepdims=True)
                                 / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0), logp.shape)
    if cfg.importance_sampling_level == "sequence_token":  # its value, each token's own gradient
      log_ratio = jax.lax.stop_gradient(log_ratio) + logp - jax.lax.stop_gradient(logp)
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
  loss = -jnp.minimum(ratio * advantages, clipped * advantages)
  if weight is not None:
    loss = loss * weight
  values = {"clip_ratio/low": ((ratio < 1 - cfg.epsilon_low) & (advantages < 0)).astype(jnp.float32),
            "clip_ratio/high": ((ratio > 1 + cfg.epsilon_high) & (advantages > 0)).astype(jnp.float32)}
  if ref is not None:
    delta = ref - logp
    kl = jnp.exp(delta) - delta - 1
    loss = loss + cfg.kl_coef * kl
    values["kl"] = kl
  return loss * mask, values


def normalise(loss_BxT: jax.Array, mask_BxT: jax.Array, rows_B: jax.Array, loss_type: str,
              max_completion_length: int) -> tuple[jax.Array, jax.Array]:
  """(loss sum, weight) of masked per-token losses under `loss_type`; `rows_B` is 1 for rows holding a completion."""
  if loss_type == "grpo":
    per_row = jnp.sum(loss_BxT, axis=1) / jnp.maximum(jnp.sum(mask_BxT, axis=1), 1.0)
    return jnp.sum(per_row * rows_B), jnp.sum(rows_B)
  if loss_type == "dr_grpo":
    return jnp.sum(loss_BxT) / max_completion_length, jnp.sum(rows_B)
  return jnp.sum(loss_BxT), jnp.sum(mask_BxT)


def make(cfg: Options) -> Head:
  temperature, reuse = float(cfg.temperature), int(cfg.num_iterations) > 1
  corrected = cfg.sampler_correction != "none"

  def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
    mask = batch["loss_mask"].astype(jnp.float32)
    stats = ctx.token_stats(params, batch, temperature, extra=("entropy",))
    logp, entropy = stats.logp, stats.entropy
    # the trainer's log-probs under the params that sampled: with one step per rollout, the current ones
    old = batch["old_logps"] if reuse else jax.lax.stop_gradient(logp)
    weight = sampling.correction(old, batch["sampler_logps"], mask, cfg) if corrected else None
    ref = None
    if cfg.kl_coef:
      ref = jax.lax.stop_gradient(ctx.frozen_stats(REFERENCE.role, batch, temperature).logp)
    per_token, values = policy_loss(logp, old, ref, batch["advantages"], mask, cfg, weight)
    if weight is not None:
      values["sampler_correction"] = weight
    rows = (jnp.sum(batch["segment_ids"] > 0, axis=1) > 0).astype(jnp.float32)
    loss_sum, weight = normalise(per_token, mask, rows, cfg.loss_type, int(cfg.max_completion_length))
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    # token means, scaled by the weight so that the step's division by the summed weight averages them
    metrics = {k: jnp.sum(v * mask) / tokens * weight for k, v in {**values, "entropy": entropy}.items()}
    return loss_sum, weight, metrics

  def prepare(params, batch: dict[str, jax.Array], ctx: LossContext) -> dict[str, jax.Array]:
    return {"old_logps": ctx.token_stats(params, batch, temperature).logp}

  rollout = Rollout(
      group=cfg.num_generations, max_completion_length=cfg.max_completion_length, rewards=cfg.rewards,
      per_completion=lambda r, group: {"advantages": advantages.compute(r, group, cfg.scale_rewards)},
      columns=("advantages",), sampler_logps="sampler_logps" if corrected else "", iterations=cfg.num_iterations,
      prepare=prepare if reuse else None, prepared=("old_logps",) if reuse else (), temperature=cfg.temperature,
      top_k=cfg.top_k, top_p=cfg.top_p, mask_truncated=cfg.mask_truncated_completions,
      missing_eos_penalty=cfg.missing_eos_penalty, reward_timeout=cfg.reward_timeout)
  return Head(loss, frozen=((REFERENCE,) if cfg.kl_coef else ()) + ((REWARD_MODEL,) if cfg.uses_reward_model() else ()),
              rollout=rollout)


HEAD = options.HeadType(Options, make)

