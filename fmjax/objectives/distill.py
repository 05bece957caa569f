"""`distill`: a student learns from a frozen teacher's next-token distributions, mixed with the hard labels.

Per loss-bearing token (the data's loss mask; padding never enters the mean):
  loss = α · CE(student, target) + (1 − α) · T² · D(teacher_T, student_T)
where `_T` are the softmaxes at temperature T (Hinton et al. 2015; T² keeps gradient scale as T changes) and D is
  forward_kl   KL(teacher ‖ student): mass-covering, the classic KD loss;
  reverse_kl   KL(student ‖ teacher): mode-seeking (MiniLLM);
  jsd          the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), TRL's `generalized_jsd_loss`
               convention: M = β·teacher + (1 − β)·student, JSD_β = β·KL(teacher ‖ M) + (1 − β)·KL(student ‖ M),
               0 < β < 1 (`objective.jsd_beta`); β = 0.5 is the symmetric JSD, and JSD_β(T, S) = JSD_(1−β)(S, T).
With `top_k` > 0 both distributions are restricted to the teacher's k most likely tokens and renormalised there
(what a cache of the teacher's top-k logits allows). The teacher must share the student's vocabulary.
Metrics: `nll` (the hard-label CE: comparable with the `lm` head's), `divergence` (D, without T²).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fmjax.objectives.base import Frozen, Head, LossContext, LossOutput
from fmjax.objectives.lm import token_nll
from fmjax.errors import UserError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p ‖ q) over the last axis, from log-probabilities."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def divergence(teacher_logits: jax.Array, student_logits: jax.Array, kind: str = "forward_kl",
               temperature: float = 1.0, beta: float = 0.5, top_k: int = 0) -> jax.Array:
  """D(teacher, student) per position (the last axis is the vocabulary), at `temperature`, optionally on the
  teacher's top-k tokens."""
  t = teacher_logits.astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  if top_k:
    t, index = jax.lax.top_k(t, top_k)
    s = jnp.take_along_axis(s, index, axis=-1)
  log_t, log_s = jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)
  if kind == "forward_kl":
    return _kl(log_t, log_s)
  if kind == "reverse_kl":
    return _kl(log_s, log_t)
  if kind == "jsd":
    log_m = jnp.logaddexp(log_t + jnp.log(beta), log_s + jnp.log1p(-beta))
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
  raise UserError(f"objective.divergence={kind!r} is not one of {DIVERGENCES}.")


TEACHER = Frozen("teacher", source="run")  # objective.teacher / teacher_step / teacher_bootstrap


def make(objective_cfg: Any) -> Head:
  """The distillation loss; metrics `nll`, `divergence`. Reads the frozen teacher (another run)."""
  cfg = objective_cfg
  if cfg.divergence not in DIVERGENCES:
    raise UserError(f"objective.divergence={cfg.divergence!r} is not one of {DIVERGENCES}.")
  if not 0 <= cfg.alpha <= 1 or cfg.temperature <= 0 or not 0 < cfg.jsd_beta < 1 or cfg.top_k < 0:
    raise UserError(f"distill: need 0 <= objective.alpha <= 1 (got {cfg.alpha}), objective.temperature > 0 "
                    f"({cfg.temperature}), 0 < objective.jsd_beta < 1 ({cfg.jsd_beta}), objective.top_k >= 0 "
                    f"({cfg.top_k}).")

  def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
    student = ctx.apply(params, batch)
    teacher = jax.lax.stop_gradient(ctx.frozen[TEACHER.role](batch))
    mask = batch["loss_mask"].astype(jnp.float32)
    nll = token_nll(student, batch["targets"])[0]
    div = divergence(teacher, student, cfg.divergence, cfg.temperature, cfg.jsd_beta, cfg.top_k)
    per_token = cfg.alpha * nll + (1 - cfg.alpha) * cfg.temperature ** 2 * div
    masked = lambda x: jnp.sum(jnp.where(mask > 0, x, 0.0))  # noqa: E731  (padding logits may be anything)
    return masked(per_token), jnp.sum(mask), {"nll": masked(nll), "divergence": masked(div)}

  return Head(loss, frozen=(TEACHER,), reports_nll=True)
