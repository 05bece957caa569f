"""The `lm` head against a float64 NumPy recomputation; masked positions never count."""

import jax.numpy as jnp
import numpy as np

from fmjax import objectives
from fmjax.objectives import LossContext

B, T, V = 2, 5, 7


def batch_and_logits(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)) * 3
  batch = dict(tokens=np.zeros((B, T), np.int32), segment_ids=np.ones((B, T), np.int32),
               positions=np.zeros((B, T), np.int32), targets=rng.integers(0, V, (B, T)).astype(np.int32),
               loss_mask=(rng.random((B, T)) > 0.3).astype(np.float32))
  return batch, logits


def head(z_loss):
  return objectives.get({"name": "lm", "z_loss": z_loss}).loss


def test_lm_loss_matches_float64_reference():
  batch, logits = batch_and_logits()
  ctx = LossContext(apply=lambda p, *a: jnp.asarray(logits, jnp.float32))
  loss_sum, weight, metrics = head(1e-2)(None, {k: jnp.asarray(v) for k, v in batch.items()}, ctx)
  logz = np.log(np.exp(logits).sum(-1))
  nll = logz - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
  m = batch["loss_mask"]
  assert float(weight) == m.sum()
  np.testing.assert_allclose(float(metrics["nll"]), (nll * m).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["z_loss"]), (logz**2 * m).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(loss_sum), (nll * m).sum() + 1e-2 * (logz**2 * m).sum(), rtol=1e-6)


def test_masked_positions_do_not_change_the_loss():
  batch, logits = batch_and_logits()
  changed = logits.copy()
  changed[batch["loss_mask"] == 0] += 100.0  # garbage where the mask is 0
  run = lambda lg: head(0.0)(None, {k: jnp.asarray(v) for k, v in batch.items()},  # noqa: E731
                              LossContext(apply=lambda p, *a: jnp.asarray(lg, jnp.float32)))
  np.testing.assert_allclose(float(run(changed)[0]), float(run(logits)[0]), rtol=1e-6)
