"""`ppo`: PPO with a learned value model (InstructGPT, Llama-2-Chat; TRL's PPOTrainer), on rollouts of the current
policy (fmjax/train/rollout.py).

Each rollout, under the params that sampled it (`prepare`): the policy's log-probs π_old, the critic's values V_old
and, with β = objective.kl_coef > 0, the reference's log-probs. Then on the host (`finish`, fmjax/rl/gae.py): the
per-token reward −β·kl_t (objective.kl_penalty='reward'; with 'loss', β·k3 joins the loss instead, as in grpo) plus
the completion's score on its last token, GAE(γ, λ) advantages and returns, the advantages whitened over the rollout
(and the rewards, with whiten_rewards). The next num_ppo_epochs passes over num_mini_batches minibatches train, per
completion token:

  policy  max(−Â·ρ, −Â·clip(ρ, 1 − ε, 1 + ε)),   ρ = π/π_old   (times objective.sampler_correction's weight)
  value   ½·max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²)
  loss    token mean of policy + vf_coef · value

The critic (objective.critic): `trunk`, a linear value head over the policy's final hidden states (one network, one
pass); or `separate`, a network of its own with one score per position, started from objective.critic_init (a
reward model's run, as InstructGPT and TRL do; empty: the policy's starting weights). Metrics, TRL's names: loss/policy,
loss/value, policy/approxkl (½·mean (log ρ)²), policy/clipfrac, policy/entropy, val/clipfrac, val/ratio, val/values;
per rollout: objective/kl, objective/non_score_reward, objective/rlhf_reward, objective/scores, val/returns,
val/explained_variance.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax import checks
from fmjax.errors import UserError
from fmjax.model import Transformer
from fmjax.objectives import options, sampling
from fmjax.objectives.base import REFERENCE, REWARD_MODEL, Head, LossContext, LossOutput, Part, Rollout
from fmjax.rl import gae

CRITICS = ("trunk", "separate")
KL_PENALTIES = ("reward", "loss")
_field = options.field


@dataclasses.dataclass(frozen=True)
class Options(sampling.Corrected):
  num_generations: int = _field(1, "completions sampled per prompt; train.batch_size = prompts × this",
                                checks.positive("completions sampled per prompt"))
  num_ppo_epochs: int = _field(4, "passes over each rollout", checks.positive("passes over each rollout"))
  num_mini_batches: int = _field(1, "minibatches (train.batch_size rows each) per rollout",
                                 checks.positive("minibatches per rollout"))
  cliprange: float = _field(0.2, "ε of the policy ratio's clip", checks.in_range(0, 1, "()", "the ratio's clip"))
  cliprange_value: float = _field(0.2, "ε_v: how far a value may move from the rollout's per step",
                                  checks.positive("the value clip"))
  vf_coef: float = _field(0.1, "weight of the value loss", checks.non_negative())
  gamma: float = _field(1.0, "discount γ of GAE", checks.in_range(0, 1, "[]", "the discount"))
  lam: float = _field(0.95, "λ of GAE (1: Monte Carlo returns, 0: one-step TD)", checks.in_range(0, 1, "[]", "λ"))
  kl_coef: float = _field(0.05, "β of the per-token KL penalty in the reward; 0 = no reference model",
                          checks.non_negative("0 = no KL penalty and no reference model"))
  kl_estimator: str = _field("k1", "k1 (log-ratio) | k3 (non-negative) for the penalty",
                             checks.one_of(gae.KL_ESTIMATORS))
  kl_penalty: str = _field("reward", "reward (−β·kl_t in each token's reward: InstructGPT, TRL) | loss (β·k3 added to "
                           "the loss, as grpo)", checks.one_of(KL_PENALTIES))
  whiten_rewards: bool = _field(False, "scale the per-token rewards to unit variance over the rollout")
  whiten_advantages: bool = _field(True, "advantages to zero mean, unit variance over the rollout")
  critic: str = _field("trunk", "trunk (a value head over the policy's hidden states) | separate (its own network)",
                       checks.one_of(CRITICS))
  critic_init: str = _field("", "critic=separate: a run (e.g. the reward model's) to start it from; '' = the policy")
  critic_init_step: int = _field(-1, "its checkpoint step; -1 = newest", checks.STEP)


class ValueHead(nn.Module):
  """A scalar per position from the trunk's final hidden states [B,T,D] (zero at the start)."""
  d_model: int

  @nn.compact
  def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
    w = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
                   (self.d_model, 1), jnp.float32)
    b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (1,), jnp.float32)
    return (hidden_BxTxD.astype(jnp.float32) @ w + b)[..., 0]


TRUNK_VALUE = Part("value", lambda cfg: ValueHead(cfg.d_model))


def losses(logp: jax.Array, old: jax.Array, adv: jax.Array, value: jax.Array, old_value: jax.Array,
           returns: jax.Array, cfg: Any, weight: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-token [B,T] policy and value losses and their clip indicators (all inputs [B,T]; `weight`: the sampler
  correction of the policy term)."""
  log_ratio = logp - old
  ratio = jnp.exp(log_ratio)
  pg1, pg2 = -adv * ratio, -adv * jnp.clip(ratio, 1 - cfg.cliprange, 1 + cfg.cliprange)
  policy = jnp.maximum(pg1, pg2)
  if weight is not None:
    policy = policy * weight
  clipped = jnp.clip(value, old_value - cfg.cliprange_value, old_value + cfg.cliprange_value)
  vf1, vf2 = jnp.square(value - returns), jnp.square(clipped - returns)
  return {"loss/policy": policy, "loss/value": 0.5 * jnp.maximum(vf1, vf2),
          "policy/clipfrac": (pg2 > pg1).astype(jnp.float32), "val/clipfrac": (vf2 > vf1).astype(jnp.float32),
          "policy/approxkl": 0.5 * jnp.square(log_ratio), "val/ratio": ratio}


def finish(rows: dict[str, np.ndarray], scores: np.ndarray, cfg: Any) -> tuple[dict[str, np.ndarray], dict]:
  """Advantages and returns of a rollout (host, float64) and its per-rollout metrics."""
  mask = rows["loss_mask"] > 0
  kl = gae.kl(rows["old_logps"], rows["ref_logps"], cfg.kl_estimator) * mask if cfg.kl_coef else np.zeros(mask.shape)
  rewards = gae.rewards(scores, kl, mask, cfg.kl_coef if cfg.kl_penalty == "reward" else 0.0)
  if cfg.whiten_rewards:
    rewards = gae.whiten(rewards, mask, shift_mean=False)
  adv, returns = gae.advantages(rewards, rows["old_values"], mask, cfg.gamma, cfg.lam)
  if cfg.whiten_advantages:
    adv = gae.whiten(adv, mask)
  non_score = float((-cfg.kl_coef * kl).sum(axis=1).mean()) if cfg.kl_penalty == "reward" else 0.0
  metrics = {"objective/kl": float(kl.sum(axis=1).mean()), "objective/non_score_reward": non_score,
             "objective/scores": float(np.mean(scores)), "objective/rlhf_reward": non_score + float(np.mean(scores)),
             "val/returns": float(returns[mask].mean()) if mask.any() else 0.0,
             "val/explained_variance": gae.explained_variance(rows["old_values"], returns, mask)}
  return {"advantages": adv, "returns": returns}, metrics


class Critic(nn.Module):
  """A separate critic: a network of the policy's architecture with one score per position (so a run it starts from,
  objective.critic_init, has the policy's architecture: a reward model trained from the same base, as in TRL's
  examples)."""
  cfg: Any

  @nn.compact
  def __call__(self, tokens, segment_ids, positions) -> jax.Array:
    return Transformer(self.cfg, name="net")(tokens, segment_ids, positions)[..., 0]


def make(cfg: Options) -> Head:
  temperature = float(cfg.temperature)
  corrected = cfg.sampler_correction != "none"
  if cfg.critic_init and cfg.critic != "separate":
    raise UserError(f"objective.critic_init={cfg.critic_init!r} starts a separate critic, but objective.critic="
                    f"{cfg.critic!r}; set objective.critic='separate' or leave critic_init empty.")
  part = TRUNK_VALUE if cfg.critic == "trunk" else Part(
      "critic", lambda model_cfg: Critic(dataclasses.replace(model_cfg, num_labels=1)), reads="inputs",
      init=cfg.critic_init, init_step=cfg.critic_init_step, init_key="critic_init")

  def values(params, batch, ctx: LossContext, extra=()):
    stats, parts = ctx.forward(params, batch, temperature, extra, parts=(part.name,))
    return stats, parts[part.name]

  def prepare(params, batch: dict[str, jax.Array], ctx: LossContext) -> dict[str, jax.Array]:
    stats, value = values(params, batch, ctx)
    out = {"old_logps": stats.logp, "old_values": value}
    if cfg.kl_coef:
      out["ref_logps"] = ctx.frozen_stats(REFERENCE.role, batch, temperature).logp
    return out

  def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
    mask = batch["loss_mask"].astype(jnp.float32)
    stats, value = values(params, batch, ctx, extra=("entropy",))
    weight = sampling.correction(batch["old_logps"], batch["sampler_logps"], mask, cfg) if corrected else None
    per_token = losses(stats.logp, batch["old_logps"], batch["advantages"], value, batch["old_values"],
                       batch["returns"], cfg, weight)
    if cfg.kl_coef and cfg.kl_penalty == "loss":  # k3 to the reference, with gradient, as grpo's
      delta = batch["ref_logps"] - stats.logp
      per_token["loss/kl"] = jnp.exp(delta) - delta - 1
    total = lambda x: jnp.sum(x * mask)  # noqa: E731
    metrics = {k: total(v) for k, v in per_token.items()}
    metrics.update({"policy/entropy": total(stats.entropy), "val/values": total(jax.lax.stop_gradient(value))})
    if weight is not None:
      metrics["sampler_correction"] = total(weight)
    loss_BxT = per_token["loss/policy"] + cfg.vf_coef * per_token["loss/value"]
    if "loss/kl" in per_token:
      loss_BxT = loss_BxT + cfg.kl_coef * per_token["loss/kl"]
    return total(loss_BxT), jnp.sum(mask), metrics

  prepared = ("old_logps", "old_values") + (("ref_logps",) if cfg.kl_coef else ())
  rollout = Rollout(
      group=cfg.num_generations, max_completion_length=cfg.max_completion_length, rewards=cfg.rewards,
      per_completion=lambda r, group: {}, columns=(), sampler_logps="sampler_logps" if corrected else "",
      iterations=cfg.num_ppo_epochs, minibatches=cfg.num_mini_batches, prepare=prepare, prepared=prepared,
      finish=lambda rows, scores: finish(rows, scores, cfg), finished=("advantages", "returns"),
      temperature=temperature, top_k=cfg.top_k, top_p=cfg.top_p, missing_eos_penalty=cfg.missing_eos_penalty,
      reward_timeout=cfg.reward_timeout, iterations_key="num_ppo_epochs")
  return Head(loss, frozen=((REFERENCE,) if cfg.kl_coef else ()) + ((REWARD_MODEL,) if cfg.uses_reward_model() else ()),
              rollout=rollout, parts=(part,))


HEAD = options.HeadType(Options, make)
