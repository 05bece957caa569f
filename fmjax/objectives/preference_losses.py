"""The DPO family's per-pair losses, on sequence log-probabilities (sums over each response's tokens).

`pc`, `pr`: the policy's log-probs of the chosen / rejected response [P]; `rc`, `rr`: the reference's; `nc`, `nr`:
the responses' token counts. Each function returns per-pair losses [P], unreduced (a head sums them over real pairs).
Definitions follow the papers and TRL's trainers (trl/trainer/dpo_trainer.py `dpo_loss`, cpo_trainer.py,
orpo_trainer.py `odds_ratio_loss`, kto_trainer.py `kto_loss`); each docstring names its source.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

log_sigmoid = jax.nn.log_sigmoid


def dpo(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> jax.Array:
  """DPO (Rafailov et al. 2023), TRL loss_type="sigmoid": −logσ(β·h) with h = (pc − pr) − (rc − rr); ln 2 when the
  policy equals the reference. With label_smoothing ε > 0 it is conservative DPO (Mitchell 2023), the expected DPO
  loss when each label is flipped with probability ε: −(1−ε)·logσ(β·h) − ε·logσ(−β·h). TRL's DPOTrainer has no such
  loss: its "sigmoid" loss ignores `label_smoothing` (which smooths "robust", "exo_pair" and "aot" only); the same
  loss there is loss_type=["sigmoid", "robust"], loss_weights=[2(1−ε), −(1−2ε)], label_smoothing=ε."""
  h = (pc - pr) - (rc - rr)
  return -(1 - label_smoothing) * log_sigmoid(beta * h) - label_smoothing * log_sigmoid(-beta * h)


def ipo(pc, pr, rc, rr, nc, nr, beta: float) -> jax.Array:
  """IPO (Azar et al. 2023), TRL loss_type="ipo": (h − 1/(2β))², with h built from log-probs averaged over each
  response's tokens (TRL's concatenated_forward divides every log-prob, the reference's too, by its token count)."""
  h = (pc / nc - pr / nr) - (rc / nc - rr / nr)
  return jnp.square(h - 1 / (2 * beta))


def simpo(pc, pr, nc, nr, beta: float, gamma: float) -> jax.Array:
  """SimPO (Meng et al. 2024), reference-free, TRL CPOTrainer loss_type="simpo": −logσ(β·(pc/nc − pr/nr) − γ) on
  length-averaged log-probs with target margin γ (`simpo_gamma`; TRL writes it as β·(Δ − γ/β), the same value)."""
  return -log_sigmoid(beta * (pc / nc - pr / nr) - gamma)


def _log1mexp(a: jax.Array) -> jax.Array:
  """log(1 − e^a) for a < 0, accurate near 0 and far from it (Mächler 2012)."""
  return jnp.where(a > -0.6931472, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def orpo_log_odds(pc, pr, nc, nr) -> jax.Array:
  """ORPO's log odds ratio log(odds(chosen) / odds(rejected)), odds(y) = p/(1 − p) with p the per-token mean
  likelihood exp(logp/n) (TRL ORPOTrainer.odds_ratio_loss on average log-probs)."""
  a_c = jnp.minimum(pc / nc, -1e-7)  # log p < 0 strictly, so log(1 − p) stays finite
  a_r = jnp.minimum(pr / nr, -1e-7)
  return (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))


def orpo(pc, pr, nc, nr, beta: float) -> jax.Array:
  """ORPO (Hong et al. 2024): the odds-ratio term −β·logσ(log_odds) that is ADDED to the chosen responses' NLL
  (TRL: loss = nll − mean(β·logσ(log_odds))); reference-free."""
  return -beta * log_sigmoid(orpo_log_odds(pc, pr, nc, nr))


def kto_reference_point(policy_logps, ref_logps, weights) -> jax.Array:
  """KTO's reference point z0 = max(0, mean(policy − reference log-prob)), detached. TRL estimates it on mismatched
  prompt/completion pairs; here it is the weighted mean over the batch's own responses (both sides)."""
  kl = jnp.sum((policy_logps - ref_logps) * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto(pc, pr, rc, rr, beta: float, z0, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """KTO (Ethayarajh et al. 2024), TRL KTOTrainer.kto_loss: per desirable (chosen) response
  λ_D·(1 − σ(β·((pc − rc) − z0))), per undesirable (rejected) one λ_U·(1 − σ(β·(z0 − (pr − rr)))); returned as the
  two per-pair arrays (TRL averages over all responses of both kinds)."""
  chosen = desirable_weight * jax.nn.sigmoid(-beta * ((pc - rc) - z0))
  rejected = undesirable_weight * jax.nn.sigmoid(-beta * (z0 - (pr - rr)))
  return chosen, rejected
