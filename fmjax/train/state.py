"""Train state, created already sharded: eval_shape → shardings → jitted init."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fmjax import sharding
from fmjax.model import init_params, lora
from fmjax.objectives.base import LossContext


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # trainable parameters
  opt_state: Any  # optimizer state for `params`
  rng: jax.Array  # PRNG key for stochastic heads and dropout
  frozen: Any = flax.struct.field(default_factory=dict)  # frozen trees: reference policy, teacher, LoRA base


def _plan(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules,
          seed: int) -> tuple[Callable, jax.Array, TrainState]:
  """(init fn: rng -> state, its rng, state shardings) of `create` and `abstract`; nothing is allocated."""
  rng = jax.random.PRNGKey(seed)
  init_rng, state_rng = jax.random.split(rng)
  boxed = jax.eval_shape(lambda r: init_params(model.cfg, r, boxed=True, lora=model.lora), init_rng)
  param_sh = sharding.logical_shardings(boxed, mesh, rules)
  split = _split if model.lora is not None else (lambda tree: (tree, {}))
  if model.lora is not None:
    lora.targeted_paths(split(nn.unbox(boxed))[1]["base"], model.lora)  # a regex that selects nothing fails here
  param_sh, frozen_sh = split(param_sh)
  opt_abstract = jax.eval_shape(tx.init, split(nn.unbox(boxed))[0])
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh, transform_non_params=lambda _: repl)
  shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl, frozen=frozen_sh)

  def init(r):
    params, frozen = split(init_params(model.cfg, r, lora=model.lora))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng,
                      frozen=frozen)

  return init, init_rng, shardings


def _with_reference(state: TrainState, shardings: TrainState, copy: Callable) -> tuple[TrainState, TrainState]:
  """Adds `frozen['reference']`: `copy` of the initial params, sharded as they are."""
  frozen_sh = {"reference": shardings.params}
  return state.replace(frozen={"reference": copy(state.params)}), shardings.replace(frozen=frozen_sh)


def create(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int,
           reference: bool = False) -> tuple[TrainState, TrainState]:
  """(state, state shardings): params and optimizer state are initialised directly into their shards. With LoRA
  (`model.lora`), `params` holds only the adapters and `frozen['base']` the base weights, once; the optimizer
  state covers the adapters alone. With `reference` (a head that compares with the initial policy) and no LoRA,
  `frozen['reference']` is a copy of the initial params; under LoRA the base itself is the reference."""
  init, init_rng, shardings = _plan(model, tx, mesh, rules, seed)
  state = jax.jit(init, out_shardings=shardings)(init_rng)
  if reference and model.lora is None:
    state, shardings = _with_reference(state, shardings, _copy)
  return state, shardings


def abstract(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int,
             reference: bool = False) -> tuple[TrainState, TrainState]:
  """(state, state shardings) as `create` makes them, but the state's leaves are `jax.ShapeDtypeStruct`s carrying
  their shardings: enough to lower and compile the train step for any mesh (e.g. a TPU topology) with no arrays."""
  init, init_rng, shardings = _plan(model, tx, mesh, rules, seed)
  shapes = jax.eval_shape(init, init_rng)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  if reference and model.lora is None:
    state, shardings = _with_reference(state, shardings, lambda tree: tree)
  return state, shardings


def _copy(tree: Any) -> Any:
  """New buffers (a donated state must not hold one buffer twice)."""
  return jax.tree.map(jnp.copy, tree)


def _split(tree: Any) -> tuple[Any, dict]:
  """(trainable adapters, {'base': the rest})."""
  adapters, base = lora.split(tree)
  return adapters, {"base": base}


def base_params(state: TrainState) -> Any:
  """The model weights that `init_from` fills: the frozen base under LoRA, else the trained params."""
  return state.frozen["base"] if "base" in state.frozen else state.params


def with_base_params(state: TrainState, params: Any, frozen_only: bool = False) -> TrainState:
  """`state` with the weights read from a run: the frozen base (LoRA) or, unless `frozen_only` (a resume, whose
  trained params come from the checkpoint), the params; and the frozen reference policy, if the run has one."""
  frozen = dict(state.frozen)
  if "base" in frozen:
    frozen["base"] = params
  elif not frozen_only:
    state = state.replace(params=params)
  if "reference" in frozen:
    frozen["reference"] = _copy(params)
  return state.replace(frozen=frozen)


def make_context(model: nn.Module, teacher: nn.Module | None = None) -> Callable[..., LossContext]:
  """`context(frozen, rng=None) -> LossContext` for a head: `apply(params, tokens, segment_ids, positions) -> logits`
  runs the model on the trained params (under LoRA: the adapters over `frozen['base']`; with `rng`, dropout is on),
  `reference(tokens, segment_ids, positions)` the frozen reference policy: `frozen['reference']`, or under LoRA
  the base with its adapters off (no second copy of the weights), and `teacher(...)` the `teacher` model on
  `frozen['teacher']`."""
  plain = type(model)(model.cfg)  # the same network without adapters

  def context(frozen: Any, rng: jax.Array | None = None) -> LossContext:
    def apply(params, tokens, segment_ids, positions):
      full = lora.combine(frozen["base"], params) if "base" in frozen else params
      return model.apply({"params": full}, tokens, segment_ids, positions,
                         rngs=None if rng is None else {"dropout": rng})

    reference = None
    if "base" in frozen or "reference" in frozen:
      weights = frozen.get("base", frozen.get("reference"))
      reference = lambda *batch: plain.apply({"params": weights}, *batch)  # noqa: E731
    teach = None
    if teacher is not None:
      teach = lambda *batch: teacher.apply({"params": frozen["teacher"]}, *batch)  # noqa: E731
    return LossContext(apply=apply, frozen=frozen, reference=reference, teacher=teach)

  return context


def count_params(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
