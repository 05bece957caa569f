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

import dataclasses

import jax
import jax.numpy as jnp

from fmjax import checks
from fmjax.errors import UserError
from fmjax.objectives import options
from fmjax.objectives.base import Frozen, Head, LossContext, LossOutput
from fmjax.objectives.lm import token_nll

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  teacher: str = options.field("", "the teacher's run directory (frozen; same tokenizer)")
  teacher_step: int = options.field(-1, "the teacher's checkpoint step; -1 = newest", checks.STEP)
  teacher_bootstrap: str = options.field("", "with no teacher: pre-train this config into WORKDIR/teacher first")
  divergence: str = options.field("forward_kl", "forward_kl | reverse_kl | jsd", checks.one_of(DIVERGENCES))
  jsd_beta: float = options.field(0.5, "jsd: weight of the teacher in the mixture",
                                  checks.in_range(0, 1, "()", "the teacher's weight in the mixture"))
  temperature: float = options.field(1.0, "softmax temperature of both (the divergence is scaled by T²)",
                                     checks.positive())
  alpha: float = options.field(0.5, "weight of the hard-label cross-entropy; 1 − alpha on the divergence",
                               checks.in_range(0, 1, "[]", "the weight of the hard-label loss"))
  top_k: int = options.field(0, "the teacher's top-k tokens only; 0 = all",
                             checks.non_negative("0 = the whole vocabulary"))


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


def make(cfg: Options) -> Head:
  """The distillation loss; metrics `nll`, `divergence`. Reads the frozen teacher (another run)."""

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


HEAD = options.HeadType(Options, make)
