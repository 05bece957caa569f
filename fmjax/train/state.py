"""Train state, created already sharded: eval_shape → shardings → jitted init."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fmjax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # trainable parameters
  opt_state: Any  # optimizer state for `params`
  rng: jax.Array  # PRNG key for stochastic heads and dropout
  frozen: Any = flax.struct.field(default_factory=dict)  # frozen trees: reference policy, teacher, LoRA base


def abstract_params(model: nn.Module, rng: jax.Array) -> Any:
  """Boxed (logically partitioned) abstract parameters of `model`."""
  dummy = jnp.ones((1, 1), jnp.int32)
  return jax.eval_shape(lambda r: model.init(r, dummy, dummy, jnp.zeros_like(dummy))["params"], rng)


def create(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int
           ) -> tuple[TrainState, TrainState]:
  """(state, state shardings): params and optimizer state are initialised directly into their shards."""
  rng = jax.random.PRNGKey(seed)
  init_rng, state_rng = jax.random.split(rng)
  boxed = abstract_params(model, init_rng)
  param_sh = sharding.logical_shardings(boxed, mesh, rules)
  opt_abstract = jax.eval_shape(tx.init, nn.unbox(boxed))
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh, transform_non_params=lambda _: repl)
  shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl, frozen={})

  def init(r):
    dummy = jnp.ones((1, 1), jnp.int32)
    params = nn.unbox(model.init(r, dummy, dummy, jnp.zeros_like(dummy))["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)

  return jax.jit(init, out_shardings=shardings)(init_rng), shardings


def count_params(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
