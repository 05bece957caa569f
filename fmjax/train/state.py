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
from fmjax.model import init_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # trainable parameters
  opt_state: Any  # optimizer state for `params`
  rng: jax.Array  # PRNG key for stochastic heads and dropout
  frozen: Any = flax.struct.field(default_factory=dict)  # frozen trees: reference policy, teacher, LoRA base


def create(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int
           ) -> tuple[TrainState, TrainState]:
  """(state, state shardings): params and optimizer state are initialised directly into their shards."""
  rng = jax.random.PRNGKey(seed)
  init_rng, state_rng = jax.random.split(rng)
  boxed = jax.eval_shape(lambda r: init_params(model.cfg, r, boxed=True), init_rng)
  param_sh = sharding.logical_shardings(boxed, mesh, rules)
  opt_abstract = jax.eval_shape(tx.init, nn.unbox(boxed))
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh, transform_non_params=lambda _: repl)
  shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl, frozen={})

  def init(r):
    params = init_params(model.cfg, r)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)

  return jax.jit(init, out_shardings=shardings)(init_rng), shardings


def count_params(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
