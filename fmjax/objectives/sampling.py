"""What every head that trains on its own samples shares: the options of sampling and judging a rollout
(`Options`, which a head's options extend), and the correction of the sampler's log-probs (`correction`, with the
options of `Corrected`).

The sampler (KV-cache decoding, fmjax/sample.py) and the trainer's forward pass compute the same distribution with
different numerics (bf16 caches, another kernel): the tokens were drawn from π_sampler, not from the π_old the loss
assumes. Truncated importance sampling (TIS; Yao et al. 2025, TRL's `vllm_importance_sampling_mode`) weighs each
token's loss by w = π_old / π_sampler, with π_old the trainer's log-prob under the params that sampled (a rollout
`prepare` pass):
  token_truncate      w_t = min(max(w_t, C_min), C_max)
  token_mask          w_t, or 0 outside [C_min, C_max]
  sequence_truncate   one w per completion, the product over its tokens, truncated
  sequence_mask       that product, or 0 outside [C_min, C_max]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fmjax import checks
from fmjax.objectives import options
from fmjax.rl import rewards

CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_field = options.field


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  rewards: str = _field("sort_digits", "'name[:weight],...': built-ins, 'model' (reward_model), 'pkg.mod:fn'")
  reward_model: str = _field("", "with rewards 'model': a reward-model run directory (configs/reward.py)")
  reward_model_step: int = _field(-1, "its checkpoint step; -1 = newest", checks.STEP)
  reward_model_bootstrap: str = _field("", "with no directory: train this reward config into WORKDIR/reward_model")
  reward_timeout: float = _field(300.0, "seconds a reward function may run per rollout (else an error); 0 = no limit",
                                 checks.non_negative("seconds; 0 = no limit"))
  missing_eos_penalty: float = _field(0.0, "subtracted from the reward of a completion that hit the length limit",
                                      checks.non_negative("0 = none"))
  max_completion_length: int = _field(32, "tokens sampled per completion at most",
                                      checks.positive("tokens per completion"))
  temperature: float = _field(1.0, "sampling temperature (also of the log-probs trained on)", checks.positive())
  top_k: int = _field(0, "sample among the top k; 0 = all", checks.non_negative("0 = the whole vocabulary"))
  top_p: float = _field(1.0, "nucleus sampling", checks.in_range(0, 1, "(]", "1 = no nucleus filtering"))

  def uses_reward_model(self) -> bool:
    return rewards.MODEL in [name for name, _ in rewards.parse(self.rewards)]


@dataclasses.dataclass(frozen=True)
class Corrected(Options):
  """The options of a head whose loss reads the sampler's log-probs as π_old's stand-in (a policy-gradient head)."""
  sampler_correction: str = _field("none", "TIS weight π_old/π_sampler per token: none | token_truncate | token_mask "
                                   "| sequence_truncate | sequence_mask", checks.one_of(CORRECTIONS))
  sampler_correction_max: float = _field(3.0, "C_max of sampler_correction", checks.positive())
  sampler_correction_min: float = _field(0.0, "C_min of sampler_correction", checks.non_negative())


def correction(old_logps: jax.Array, sampler_logps: jax.Array, mask: jax.Array, cfg: Corrected) -> jax.Array:
  """The TIS weight [B,T] of each token (`cfg.sampler_correction`; see the module docstring), all arrays [B,T]."""
  diff = (old_logps - sampler_logps) * mask
  if cfg.sampler_correction.startswith("sequence"):
    diff = jnp.sum(diff, axis=1, keepdims=True)
  w = jnp.exp(diff)
  low, high = cfg.sampler_correction_min, cfg.sampler_correction_max
  if cfg.sampler_correction.endswith("truncate"):
    w = jnp.clip(w, low, high)
  else:
    w = jnp.where((w < low) | (w > high), 0.0, w)
  return jax.lax.stop_gradient(jnp.broadcast_to(w, mask.shape))
