"""The one train step every stage shares: `(state, batch) -> (state, metrics)`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax.objectives import LossContext, LossOutput
from fmjax.sharding import BATCH_AXES
from fmjax.train.state import TrainState


def split_microbatches(batch: dict[str, jax.Array], n: int, mesh) -> dict[str, jax.Array]:
  """[B,...] -> [n, B/n, ...] with micro-batch i = rows i, i+n, i+2n, ... so every micro-batch stays spread over
  all batch shards (a contiguous split would put each micro-batch on a fraction of the devices)."""

  def split(x):
    y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, BATCH_AXES)))

  return jax.tree.map(split, batch)


def make_train_step(loss_fn: Callable[..., LossOutput], context: Callable[..., LossContext],
                    tx: optax.GradientTransformation, schedule: optax.Schedule, *, grad_accum: int = 1,
                    skip_nonfinite: bool = False, mesh=None) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """Builds the pure step. Losses are (sum, weight) pairs: gradients and metrics are summed over micro-batches and
  divided once by the total weight, so accumulation gives exactly the full-batch token mean. `context(frozen, rng)`
  gives what a head calls (state.make_context); each micro-batch gets its own dropout rng."""

  def sums(params, batch, frozen, rng):
    ctx = context(frozen, rng)

    def f(p):
      loss_sum, weight, metrics = loss_fn(p, batch, ctx)
      return loss_sum, (weight, metrics)

    (loss_sum, (weight, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return grads, loss_sum, weight, metrics

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum == 1:
      grads, loss_sum, weight, metric_sums = sums(state.params, batch, state.frozen, rng)
    else:
      micro = split_microbatches(batch, grad_accum, mesh)
      first = jax.tree.map(lambda x: x[0], micro)
      carry0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: sums(state.params, first, state.frozen, rng)))

      def body(carry, mb_i):
        mb, i = mb_i
        return jax.tree.map(jnp.add, carry, sums(state.params, mb, state.frozen, jax.random.fold_in(rng, i))), None

      (grads, loss_sum, weight, metric_sums), _ = jax.lax.scan(body, carry0, (micro, jnp.arange(grad_accum)))
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # keep the old params and optimizer state; only the step counter moves on
      keep = lambda n, o: jnp.where(finite, n, o)  # noqa: E731
      new = new.replace(params=jax.tree.map(keep, params, state.params),
                        opt_state=jax.tree.map(keep, opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step), "tokens": weight,
               "skipped": (~finite).astype(jnp.int32),
               **{k: v / denom for k, v in metric_sums.items()}}
    return new, metrics

  return step
