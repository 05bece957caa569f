"""An actor-critic head's per-token rewards, advantages and returns of a rollout, on the host in float64 (arrays
[N, T]: one row per completion, `mask` 1 on the completion's tokens, which are contiguous in their row).

  reward_t = −β·kl_t + (score on the completion's last token)     kl_t: k1 = logπ − logπ_ref, or k3 (≥ 0)
  δ_t = reward_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   returns_t = A_t + V_t
with V and A zero past the completion's last token (the episode ends there). γ = λ = 1 gives returns-to-go minus
the value; λ = 0 the one-step TD error. As InstructGPT and TRL's PPOTrainer (which puts the score one token
after the end-of-sequence token; here it is on the completion's last token, the EOS itself when it stopped).
"""

from __future__ import annotations

import numpy as np

KL_ESTIMATORS = ("k1", "k3")


def kl(logps: np.ndarray, ref_logps: np.ndarray, estimator: str = "k1") -> np.ndarray:
  """Per-token KL estimate of the sampled tokens (Schulman's k1: logπ − logπ_ref; k3: e^(−d) − 1 + d, d = that)."""
  d = np.asarray(logps, np.float64) - np.asarray(ref_logps, np.float64)
  return d if estimator == "k1" else np.expm1(-d) + d


def rewards(scores: np.ndarray, kl_BxT: np.ndarray, mask: np.ndarray, kl_coef: float) -> np.ndarray:
  """−β·kl on each completion token, plus each completion's score [N] on its last one."""
  m = np.asarray(mask, np.float64)
  out = -kl_coef * np.asarray(kl_BxT, np.float64) * m
  rows = np.flatnonzero(m.any(axis=1))
  last = m.shape[1] - 1 - np.argmax(m[rows, ::-1] > 0, axis=1)
  out[rows, last] += np.asarray(scores, np.float64)[rows]
  return out


def advantages(rewards_BxT: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float,
               lam: float) -> tuple[np.ndarray, np.ndarray]:
  """(advantages, returns), GAE(γ, λ) over each row's masked tokens; zero elsewhere."""
  m = np.asarray(mask, np.float64)
  r, v = np.asarray(rewards_BxT, np.float64) * m, np.asarray(values, np.float64) * m
  adv = np.zeros_like(r)
  running, next_value = np.zeros(len(r)), np.zeros(len(r))
  for t in reversed(range(r.shape[1])):
    delta = r[:, t] + gamma * next_value - v[:, t]
    running = np.where(m[:, t] > 0, delta + gamma * lam * running, 0.0)
    next_value = v[:, t]
    adv[:, t] = running
  return adv, (adv + v) * m


def whiten(x: np.ndarray, mask: np.ndarray, shift_mean: bool = True) -> np.ndarray:
  """(x − mean) / sqrt(var + 1e-8) over the masked entries (unbiased variance, as TRL's masked_whiten); with
  `shift_mean` False the mean is kept. Zero where the mask is."""
  m = np.asarray(mask, np.float64) > 0
  x = np.asarray(x, np.float64)
  values = x[m]
  if values.size < 2:
    return np.where(m, x, 0.0)
  mean, var = values.mean(), values.var(ddof=1)
  out = (x - mean) / np.sqrt(var + 1e-8)
  return np.where(m, out if shift_mean else out + mean, 0.0)


def explained_variance(values: np.ndarray, returns: np.ndarray, mask: np.ndarray) -> float:
  """1 − Var(returns − values) / Var(returns) over the masked tokens: 1 is a perfect critic, ≤ 0 none."""
  m = np.asarray(mask) > 0
  target = np.asarray(returns, np.float64)[m]
  var = target.var()
  return float(1 - (target - np.asarray(values, np.float64)[m]).var() / var) if var > 0 else float("nan")
