"""The one train step every stage shares, `(state, batch) -> (state, metrics)`: `make` builds the pure function,
`plan` jits it for a run spec on a mesh over an abstract state (nothing allocated), which both `experiment.build`
and the AOT planner (fmjax/train/aot.py) compile."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import objectives, quant, sharding
from fmjax.data.layout import Layout
from fmjax.model import ModelConfig, Transformer
from fmjax.objectives import LossContext, LossOutput
from fmjax.sharding import BATCH_AXES
from fmjax.spec import Spec
from fmjax.train import frozen as frozen_lib
from fmjax.train import optimizer as optim
from fmjax.train import state as train_state
from fmjax.train.state import TrainState

def split_microbatches(batch: dict[str, jax.Array], n: int, mesh) -> dict[str, jax.Array]:
  """[B,...] -> [n, B/n, ...] with micro-batch i = rows i, i+n, i+2n, ... so every micro-batch stays spread over
  all batch shards (a contiguous split would put each micro-batch on a fraction of the devices)."""

  def split(x):
    y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, BATCH_AXES)))

  return jax.tree.map(split, batch)


def is_spike(loss: jax.Array, recent_losses: jax.Array, factor: float) -> tuple[jax.Array, jax.Array]:
  """(spike, median): a loss above median + factor · max(median, 1) of the recent accepted losses is a spike.
  max(median, 1) keeps small losses (a converged preference head's 0.01) from calling ordinary noise a spike. It judges
  from the second step on (against the first loss, then the median of more): a run diverging in its first steps
  must not fill the window with diverged losses before it is judged."""
  median = jnp.nan_to_num(jnp.nanmedian(recent_losses))  # 0 before any loss was accepted
  enough = jnp.any(~jnp.isnan(recent_losses))
  return (factor > 0) & enough & (loss > median + factor * jnp.maximum(median, 1.0)), median


def make(loss_fn: Callable[..., LossOutput], context: Callable[..., LossContext], tx: optax.GradientTransformation,
         schedule: optax.Schedule, *, grad_accum: int = 1, skip_nonfinite: bool = False, spike_factor: float = 0.0,
         mesh=None) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """The pure step. Losses are (sum, weight) pairs: gradients and metrics are summed over micro-batches and divided
  once by the total weight, so accumulation gives exactly the full-batch token mean. `context(base, frozen, rng)`
  gives what a head calls (frozen.make_context); each micro-batch gets its own dropout rng. A step whose loss is a spike
  (`is_spike`) or, with `skip_nonfinite`, not finite keeps the old params and optimizer state."""

  def sums(params, batch, state, rng):
    ctx = context(state.base, state.frozen, rng)

    def f(p):
      loss_sum, weight, metrics = loss_fn(p, batch, ctx)
      model_terms = getattr(ctx, "model_terms", None)  # tests' bare contexts have none
      terms = model_terms() if model_terms is not None else None
      if terms is not None:  # per-token terms of the model's own (an MoE router's): summed as the head's loss is
        loss_sum = loss_sum + terms[0] * weight
        metrics = {**metrics, **{k: v * weight for k, v in terms[1].items()}}
      return loss_sum, (weight, metrics)

    (loss_sum, (weight, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return grads, loss_sum, weight, metrics

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum == 1:
      grads, loss_sum, weight, metric_sums = sums(state.params, batch, state, rng)
    else:
      micro = split_microbatches(batch, grad_accum, mesh)
      first = jax.tree.map(lambda x: x[0], micro)
      carry0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: sums(state.params, first, state, rng)))

      def body(carry, mb_i):
        mb, i = mb_i
        return jax.tree.map(jnp.add, carry, sums(state.params, mb, state, jax.random.fold_in(rng, i))), None

      (grads, loss_sum, weight, metric_sums), _ = jax.lax.scan(body, carry0, (micro, jnp.arange(grad_accum)))
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    spike, median = is_spike(loss, state.recent_losses, spike_factor)
    keep_old = spike | (~finite if skip_nonfinite else False)
    keep = lambda n, o: jnp.where(keep_old, o, n)  # noqa: E731  (the step counter still moves on)
    accepted = finite & ~spike
    recent = jnp.where(accepted, jnp.roll(state.recent_losses, 1).at[0].set(loss), state.recent_losses)
    new = state.replace(step=state.step + 1, params=jax.tree.map(keep, params, state.params),
                        opt_state=jax.tree.map(keep, opt_state, state.opt_state), recent_losses=recent)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step), "tokens": weight,
               "skipped": keep_old.astype(jnp.int32), **{k: v / denom for k, v in metric_sums.items()}}
    if spike_factor > 0:
      metrics.update(spike=spike.astype(jnp.int32), loss_median=median)
    return new, metrics

  return step


@dataclasses.dataclass
class Plan:
  """The train step of a run spec on a mesh, jitted with its shardings, and the abstract arguments it compiles for.
  Nothing is allocated: `experiment.build` compiles it and then creates the state; the AOT planner compiles it for
  a TPU topology that is not attached."""
  mesh: jax.sharding.Mesh
  rules: tuple
  model: Transformer
  head: objectives.Head
  layout: Layout
  frozen: frozen_lib.Plan
  tx: Any  # optax.GradientTransformation
  context: Callable  # frozen.make_context's: frozen trees -> LossContext
  state: TrainState  # leaves are jax.ShapeDtypeStructs carrying their shardings
  shardings: TrainState
  batch: dict[str, jax.ShapeDtypeStruct]  # one global batch
  jitted: Callable  # (state, batch) -> (state, metrics), state donated
  plain_shardings: TrainState | None = None  # before quant.* stores frozen trees quantized: what weights are read into
  schemes: dict = dataclasses.field(default_factory=dict)  # 'base' / frozen role -> quant.Scheme of that tree

  def lower(self) -> jax.stages.Lowered:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted.lower(self.state, self.batch)

  def quantize(self, state: TrainState) -> TrainState:
    """`state` (its frozen trees as read) with the trees `schemes` names stored quantized, as the step takes them;
    each plain tree's buffers are freed as it is quantized."""
    if "base" in self.schemes:
      state = state.replace(base=quant.quantizer(self.schemes["base"], self.shardings.base)(state.base))
    frozen = {role: quant.quantizer(self.schemes[role], self.shardings.frozen[role])(tree)
              if role in self.schemes else tree for role, tree in state.frozen.items()}
    return state.replace(frozen=frozen)


def _quantized(spec: Spec, state: TrainState, shardings: TrainState, mesh) -> tuple[TrainState, TrainState, dict]:
  """The abstract state and shardings with the frozen trees that quant.* stores quantized, and their schemes."""
  q, schemes = spec.quant, {}
  if q.base != "none" and state.base is not None:
    schemes["base"] = q.scheme(q.base)
    quant.check(state.base, schemes["base"], "quant.base")
    base, base_sh = quant.plan(state.base, shardings.base, schemes["base"], mesh)
    state, shardings = state.replace(base=base), shardings.replace(base=base_sh)
  if q.frozen != "none":
    frozen, frozen_sh = dict(state.frozen), dict(shardings.frozen)
    for role in frozen:
      schemes[role] = q.scheme(q.frozen)
      quant.check(frozen[role], schemes[role], "quant.frozen")
      frozen[role], frozen_sh[role] = quant.plan(frozen[role], frozen_sh[role], schemes[role], mesh)
    state, shardings = state.replace(frozen=frozen), shardings.replace(frozen=frozen_sh)
  return state, shardings, schemes


def plan(spec: Spec, mesh: jax.sharding.Mesh, layout: Layout, archs: dict[str, ModelConfig] | None = None) -> Plan:
  """The jitted step of `spec` on `mesh` for batches of `layout`, over an abstract state: the trained params and
  optimizer state plus the frozen trees (a parameterisation's base; the frozen models the head declares, 'run' ones
  with the networks `archs` gives, default: `frozen.architectures`)."""
  rules = tuple(tuple(r) for r in spec.mesh.rules)
  head, t = spec.head, spec.train
  model = Transformer(spec.model, spec.adapter)
  schedule = optim.make_schedule(spec.optimizer, t.steps)
  tx = optim.make_optimizer(spec.optimizer, schedule)
  state, shardings = train_state.abstract(model, tx, mesh, rules, t.seed, t.spike_window, head.parts)
  start, start_sh = train_state.base_params(state), train_state.base_params(shardings)
  archs = frozen_lib.architectures(spec) if archs is None else archs
  fp = frozen_lib.plan(head, model, start, start_sh, mesh, rules, archs)
  state = state.replace(frozen={**state.frozen, **fp.abstract})
  shardings = shardings.replace(frozen={**shardings.frozen, **fp.shardings})
  plain_shardings = shardings
  state, shardings, schemes = _quantized(spec, state, shardings, mesh)
  context = frozen_lib.make_context(model, fp)
  pure = make(head.loss, context, tx, schedule, grad_accum=t.grad_accum, skip_nonfinite=t.skip_nonfinite,
              spike_factor=t.spike_factor, mesh=mesh)
  batch_sh = sharding.batch_sharding(mesh)
  jitted = jax.jit(pure, in_shardings=(shardings, batch_sh), out_shardings=(shardings, sharding.replicated(mesh)),
                   donate_argnums=0)
  batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), dtype, sharding=batch_sh)
           for k, dtype in layout.dtypes().items()}
  return Plan(mesh, rules, model, head, layout, fp, tx, context, state, shardings, batch, jitted, plain_shardings,
              schemes)
