"""Train state, created already sharded: eval_shape → shardings → jitted init."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fmjax import adapters, sharding
from fmjax.model import init_params
from fmjax.objectives.base import PARTS, Part


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # trainable parameters
  opt_state: Any  # optimizer state for `params`
  rng: jax.Array  # PRNG key for stochastic heads and dropout
  recent_losses: jax.Array  # [train.spike_window] float32: the last accepted losses (NaN = none yet), for the guard
  base: Any = None  # under a parameterisation, the frozen base weights (held once; `full_params` joins them)
  frozen: Any = flax.struct.field(default_factory=dict)  # role -> the frozen models the head declares


def init_trained(model: nn.Module, parts: tuple[Part, ...], rng: jax.Array, boxed: bool = False) -> Any:
  """The model's params (with its parameterisation's) and, under PARTS, each head part's, from its own key."""
  params = init_params(model.cfg, rng, boxed=boxed, adapter=model.adapter)
  if not parts:
    return params
  hidden = (jnp.zeros((1, 1, model.cfg.d_model), jnp.dtype(model.cfg.dtype)),)
  inputs = (jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32))
  made = {p.name: p.make(model.cfg).init(jax.random.fold_in(rng, 2 + i), *(inputs if p.reads == "inputs" else hidden))
          ["params"] for i, p in enumerate(parts)}
  return {**params, PARTS: made if boxed else nn.unbox(made)}


def _plan(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int,
          window: int, parts: tuple[Part, ...] = ()) -> tuple[Callable, jax.Array, TrainState]:
  """(init fn: rng -> state, its rng, state shardings) of `create` and `abstract`; nothing is allocated."""
  rng = jax.random.PRNGKey(seed)
  init_rng, state_rng = jax.random.split(rng)
  adapter = model.adapter
  boxed = jax.eval_shape(lambda r: init_trained(model, parts, r, boxed=True), init_rng)
  param_sh = sharding.logical_shardings(boxed, mesh, rules)
  split = (lambda tree: (tree, None)) if adapter is None else (lambda tree: adapters.split(adapter, tree))
  if adapter is not None:
    adapter.check(split(nn.unbox(boxed))[1])  # e.g. targets that select nothing fail here
  param_sh, base_sh = split(param_sh)
  opt_abstract = jax.eval_shape(tx.init, split(nn.unbox(boxed))[0])
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh, transform_non_params=lambda _: repl)
  shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl, recent_losses=repl, base=base_sh)

  def init(r):
    params, base = split(init_trained(model, parts, r))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng,
                      recent_losses=jnp.full((max(window, 1),), jnp.nan, jnp.float32), base=base)

  return init, init_rng, shardings


def create(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int,
           window: int = 1, parts: tuple[Part, ...] = ()) -> tuple[TrainState, TrainState]:
  """(state, state shardings): params and optimizer state are initialised directly into their shards. Under a
  parameterisation (`model.adapter`), `params` holds only its trainable tree and `base` the base weights, once; the optimizer state covers the trainable tree alone. `window`: the divergence guard's loss history; `parts`:
  the head's own trainable modules (under PARTS)."""
  init, init_rng, shardings = _plan(model, tx, mesh, rules, seed, window, parts)
  return jax.jit(init, out_shardings=shardings)(init_rng), shardings


def abstract(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int,
             window: int = 1, parts: tuple[Part, ...] = ()) -> tuple[TrainState, TrainState]:
  """(state, state shardings) as `create` makes them, but the state's leaves are `jax.ShapeDtypeStruct`s carrying
  their shardings: enough to lower and compile the train step for any mesh (e.g. a TPU topology) with no arrays."""
  init, init_rng, shardings = _plan(model, tx, mesh, rules, seed, window, parts)
  shapes = jax.eval_shape(init, init_rng)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings), shardings


def full_params(params: Any, base: Any) -> Any:
  """The tree the model applies: the trained `params` over the frozen `base` (None: the params are the model)."""
  return params if base is None else adapters.combine(base, params)


def base_params(state: TrainState) -> Any:
  """The model weights that `init_from` fills: the frozen base under a parameterisation, else the trained params."""
  return state.params if state.base is None else state.base


def with_base_params(state: TrainState, params: Any, frozen_only: bool = False) -> TrainState:
  """`state` with the weights read from a run: the frozen base (under a parameterisation) or, unless `frozen_only`
  (a resume, whose trained params come from the checkpoint), the params."""
  if state.base is not None:
    return state.replace(base=params)
  return state if frozen_only else state.replace(params=params)


def count_params(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
