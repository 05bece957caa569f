"""`grpo`: the policy loss of on-policy RL on rollout batches (fmjax/rl/rollout.py makes them from the current
params: G sampled completions per prompt, their rewards and advantages). Per completion token t, with
ρ = π(t) / π_old(t) at the sampling temperature and Â the completion's advantage:

  loss_t = −min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â) + β·k3_t,   k3_t = e^(ref − logπ) − (ref − logπ) − 1 ≥ 0

where β = objective.kl_coef and ref is the log-prob under the reference (the starting policy; under a
parameterisation the base with it off); β = 0 builds no reference at all. π_old is the rollout params' log-prob (the batch's `old_logps`); with one
optimizer step per rollout (objective.num_iterations = 1) it is the current log-prob without gradient, so ρ = 1
exactly, as in TRL. Normalisations (objective.loss_type), as (sum, weight) pairs so that gradient accumulation and
several hosts give exactly the full-batch value:
  grpo     mean over completions of each one's token mean          (Σ_i Σ_t loss·m / n_i,  weight: completions)
  dr_grpo  Σ loss·m / (completions · max_completion_length)        (a constant normaliser: no length bias)
  dapo     Σ loss·m / Σ m, a token mean over the global batch      (weight: completion tokens)
m is the completion mask (through the first EOS; zero for a truncated completion under
objective.mask_truncated_completions). Metrics, token means weighted like the loss: kl, entropy,
clip_ratio/low (ρ < 1 − ε_low where Â < 0), clip_ratio/high (ρ > 1 + ε_high where Â > 0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fmjax.errors import UserError
from fmjax.objectives.base import Frozen, Head, LossContext, LossOutput
from fmjax.rl import rewards

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
REFERENCE = Frozen("reference")  # the starting policy (under a parameterisation: the base with it off)
REWARD_MODEL = Frozen("reward_model", source="run", key="reward_model")  # read by the rollout, not the loss


def policy_loss(logp: jax.Array, old: jax.Array, ref: jax.Array | None, advantages: jax.Array, mask: jax.Array,
                cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(per-token loss [B,T], per-token metric values) of the clipped surrogate plus β·k3; all arrays [B,T]."""
  ratio = jnp.exp(logp - old)
  clipped = jnp.clip(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
  loss = -jnp.minimum(ratio * advantages, clipped * advantages)
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


def uses_reward_model(cfg: Any) -> bool:
  return rewards.MODEL in [name for name, _ in rewards.parse(cfg.rewards)]


def make(objective_cfg: Any) -> Head:
  cfg = objective_cfg
  if cfg.loss_type not in LOSS_TYPES:
    raise UserError(f"objective.loss_type={cfg.loss_type!r} must be one of {LOSS_TYPES}.")
  temperature, reuse = float(cfg.temperature), int(cfg.num_iterations) > 1

  def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
    mask = batch["loss_mask"].astype(jnp.float32)
    stats = ctx.token_stats(params, batch, temperature, extra=("entropy",))
    logp, entropy = stats.logp, stats.entropy
    old = batch["old_logps"] if reuse else jax.lax.stop_gradient(logp)
    ref = None
    if cfg.kl_coef:
      ref = jax.lax.stop_gradient(ctx.frozen_stats(REFERENCE.role, batch, temperature).logp)
    per_token, values = policy_loss(logp, old, ref, batch["advantages"], mask, cfg)
    rows = (jnp.sum(batch["segment_ids"] > 0, axis=1) > 0).astype(jnp.float32)
    loss_sum, weight = normalise(per_token, mask, rows, cfg.loss_type, int(cfg.max_completion_length))
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    # token means, scaled by the weight so that the step's division by the summed weight averages them
    metrics = {k: jnp.sum(v * mask) / tokens * weight for k, v in {**values, "entropy": entropy}.items()}
    return loss_sum, weight, metrics

  return Head(loss, layouts=("rollouts",), columns=("advantages", "old_logps"),
              frozen=((REFERENCE,) if cfg.kl_coef else ()) + ((REWARD_MODEL,) if uses_reward_model(cfg) else ()),
              rollout=True)

