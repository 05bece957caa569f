"""Two loss heads defined outside the package, each one module plus one `register` call, as a user writes them:

  smoothed_lm      next-token cross-entropy against label-smoothed targets, with its own option `smoothing`
  reinforce_value  REINFORCE with a learned value baseline: a value head (a part over the trunk's hidden states)
                   predicts each completion token's return, the policy gradient uses the return minus that
                   prediction, and the value loss fits it; its own rollout spec (returns, no group advantages)

Importing this module registers both (tests/plugin_config.py does, so `python -m fmjax.main` finds them).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax import checks, objectives
from fmjax.objectives import Head, Part, Rollout, options
from fmjax.objectives.ppo import ValueHead


@dataclasses.dataclass(frozen=True)
class SmoothedOptions(options.Options):
  smoothing: float = options.field(0.1, "mass spread uniformly over the vocabulary",
                                   checks.in_range(0, 1, "[)", "the smoothed mass"))


def make_smoothed(o: SmoothedOptions) -> Head:
  """Per token: (1 − ε)·(−log p(target)) + ε·mean over the vocabulary of −log p; metric `nll`."""

  def loss(params, batch, ctx):
    logp_BxTxV = jax.nn.log_softmax(ctx.apply(params, batch), axis=-1)
    mask_BxT = batch["loss_mask"].astype(jnp.float32)
    nll_BxT = -jnp.take_along_axis(logp_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]
    per_token = (1 - o.smoothing) * nll_BxT - o.smoothing * jnp.mean(logp_BxTxV, axis=-1)
    return jnp.sum(per_token * mask_BxT), jnp.sum(mask_BxT), {"nll": jnp.sum(nll_BxT * mask_BxT)}

  return Head(loss, reports_nll=True)


@dataclasses.dataclass(frozen=True)
class ReinforceOptions(options.Options):
  rewards: str = options.field("sort_digits", "reward functions, 'name[:weight],...'")
  num_generations: int = options.field(4, "completions sampled per prompt", checks.positive())
  max_completion_length: int = options.field(8, "tokens sampled per completion at most", checks.positive())
  temperature: float = options.field(1.0, "sampling temperature", checks.positive())
  value_coef: float = options.field(0.5, "weight of the value loss", checks.non_negative())


VALUE = Part("value", lambda cfg: ValueHead(cfg.d_model))  # the library's linear value head (configs/ppo.py's)


def make_reinforce(o: ReinforceOptions) -> Head:
  """loss_t = −(R − sg(V_t))·log π(t) + value_coef·(V_t − R)² on completion tokens; metrics `value_loss`,
  `advantage` (token means)."""

  def loss(params, batch, ctx):
    stats, parts = ctx.forward(params, batch, o.temperature, parts=(VALUE.name,))
    mask_BxT, returns_BxT = batch["loss_mask"].astype(jnp.float32), batch["returns"]
    value_BxT = parts[VALUE.name]
    advantage_BxT = returns_BxT - jax.lax.stop_gradient(value_BxT)
    value_loss_BxT = jnp.square(value_BxT - returns_BxT)
    per_token = -advantage_BxT * stats.logp + o.value_coef * value_loss_BxT
    total = lambda x: jnp.sum(x * mask_BxT)  # noqa: E731
    return total(per_token), jnp.sum(mask_BxT), {"value_loss": total(value_loss_BxT),
                                                 "advantage": total(advantage_BxT)}

  rollout = Rollout(group=o.num_generations, max_completion_length=o.max_completion_length, rewards=o.rewards,
                    per_completion=lambda r, group: {"returns": np.asarray(r, np.float32)}, columns=("returns",),
                    temperature=o.temperature)
  return Head(loss, rollout=rollout, parts=(VALUE,))


objectives.register("smoothed_lm", make_smoothed, SmoothedOptions)
objectives.register("reinforce_value", make_reinforce, ReinforceOptions)
