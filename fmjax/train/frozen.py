"""The frozen models a loss head declares (`objectives.Frozen`), built in this one place for training, evaluation
and the AOT planner: their architectures, abstract sharded trees, weights, and the context a head calls."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from fmjax import config_lib, sharding
from fmjax.errors import UserError
from fmjax.adapters import combine
from fmjax.model import ModelConfig, Transformer, init_params, moe, resolve
from fmjax.objectives import Frozen, Head, LossContext
from fmjax.objectives.base import PARTS, Part
from fmjax.spec import FrozenRun, Spec
from fmjax.train import checkpoint, init_from, weights


def architecture(run: FrozenRun, head_name: str, vocab: int, preset: str = "") -> ModelConfig:
  """The network of a frozen 'run' model: `preset` (the AOT planner's override), else the run directory's
  config.json, else the config its bootstrap would pre-train. It must have this run's vocabulary (`vocab`)."""
  key = f"objective.{run.key}"
  if preset:
    cfg = resolve(preset)
  elif run.workdir:
    if not os.path.isfile(os.path.join(run.workdir, "config.json")):
      raise UserError(f"{key}={run.workdir!r} is not an fmjax run directory (no config.json); point it at a trained "
                      "run (any size, with this run's tokenizer).")
    cfg = config_lib.resolved_model(weights.run_config(run.workdir))
  elif run.bootstrap:
    cfg = config_lib.resolved_model(config_lib.load(run.bootstrap))
  else:
    raise UserError(f"objective.name={head_name!r} needs {key}=WORKDIR: a trained run (of any size, with this run's "
                    f"tokenizer) as its frozen {run.role}.")
  if cfg.vocab_size != vocab:
    raise UserError(f"{key}: the frozen {run.role} has vocab_size {cfg.vocab_size} but this run {vocab}; they share "
                    "one tokenizer: use a run (or preset) of the same vocabulary, or set model.vocab_size.")
  return cfg


def architectures(spec: Spec, presets: dict[str, str] | None = None) -> dict[str, ModelConfig]:
  """Role -> network of each 'run' model the head reads."""
  presets = presets or {}
  return {r.role: architecture(r, spec.head_name, spec.model.vocab_size, presets.get(r.role, ""))
          for r in spec.frozen_runs}


@dataclasses.dataclass
class Plan:
  """The frozen models of a run on a mesh, and the head's trainable parts; nothing allocated."""
  specs: tuple[Frozen, ...]
  networks: dict[str, Transformer]  # role -> network, for 'run' models
  abstract: dict[str, Any]  # role -> abstract params carrying their shardings, for every tree the state holds
  shardings: dict[str, Any]
  parts: tuple[Part, ...] = ()


def plan(head: Head, model: Transformer, params: Any, param_shardings: Any, mesh: Mesh, rules,
         archs: dict[str, ModelConfig]) -> Plan:
  """`params` / `param_shardings`: the run's own (abstract) model weights, which a 'policy' copy mirrors. Under a
  parameterisation the policy is the frozen base with it off: no tree is added for it."""
  networks, abstract, shardings = {}, {}, {}
  params, param_shardings = model_weights(params), model_weights(param_shardings)
  for spec in head.frozen:
    if spec.source == "policy":
      if model.adapter is None:
        abstract[spec.role], shardings[spec.role] = params, param_shardings
      continue
    cfg = archs[spec.role]
    boxed = jax.eval_shape(lambda r, c=cfg: init_params(c, r, boxed=True), jax.random.PRNGKey(0))
    shardings[spec.role] = sharding.logical_shardings(boxed, mesh, rules)
    abstract[spec.role] = checkpoint.abstract(nn.unbox(boxed), shardings[spec.role])
    networks[spec.role] = Transformer(cfg)
  return Plan(tuple(head.frozen), networks, abstract, shardings, tuple(head.parts))


def policy_roles(p: Plan) -> tuple[str, ...]:
  """The 'policy' models the state holds as copies (none under a parameterisation: the base serves)."""
  return tuple(s.role for s in p.specs if s.source == "policy" and s.role in p.abstract)


def policy_copies(p: Plan, start: Any) -> dict[str, Any]:
  """Role -> a copy of the starting weights, for each 'policy' copy the state holds (new buffers: a donated state
  must not hold one buffer twice)."""
  return {role: jax.tree.map(jnp.copy, model_weights(start)) for role in policy_roles(p)}


def model_weights(tree: Any) -> Any:
  """The model's own weights of a params tree: without the head's parts (a reference copies the policy, not its
  critic)."""
  return {k: v for k, v in tree.items() if k != PARTS} if isinstance(tree, dict) else tree


def load_runs(runs: tuple[FrozenRun, ...], p: Plan, tokenizer_id: str) -> dict[str, Any]:
  """Role -> weights of each 'run' model, read into its shardings (read at every start: not checkpointed)."""
  out = {}
  for run in runs:
    key = f"objective.{run.key}"
    init_from.check_tokenizer(run.workdir, {"id": tokenizer_id}, key=key)
    out[run.role] = init_from.read(run.workdir, run.step, p.abstract[run.role], key=key)
    cfg = p.networks[run.role].cfg
    logging.info("frozen %s: %s (%s parameters, d_model %d, %d layers)", run.role, run.workdir,
                 f"{sum(x.size for x in jax.tree.leaves(out[run.role])):,}", cfg.d_model, cfg.num_layers)
  return out


def make_context(model: Transformer, p: Plan) -> Callable[..., LossContext]:
  """`context(base, frozen, rng=None) -> LossContext`: `apply(params, inputs) -> logits` runs the model on the
  trained params (under a parameterisation: its tree over the frozen `base`, reading its columns of `inputs`; with
  `rng`, dropout is on), and `frozen[role](inputs)` each declared frozen model (`frozen`: role -> weights).
  `inputs`: tokens, segment_ids, positions."""
  plain = type(model)(model.cfg)  # the same network with no parameterisation
  columns = () if model.adapter is None else model.adapter.columns
  parts = {part.name: part.make(model.cfg) for part in p.parts}
  reads = {part.name: part.reads for part in p.parts}

  def context(base: Any, frozen: Any, rng: jax.Array | None = None) -> LossContext:
    router_stats = []  # of this context's calls: read by model_terms in the same trace

    def apply(params, inputs, **kw):
      full = params if base is None else combine(base, params)
      extra = {"adapter_inputs": {c: inputs[c] for c in columns}} if columns else {}
      rngs = None if rng is None else {"dropout": rng}
      if not model.cfg.num_experts:
        return model.apply({"params": full}, *model_inputs(inputs), rngs=rngs, **extra, **kw)
      out, state = model.apply({"params": full}, *model_inputs(inputs), rngs=rngs, mutable=["intermediates"],
                               **extra, **kw)
      router_stats.append(moe.stats(state["intermediates"]))
      return out

    def stats(params, inputs, temperature=1.0, extra=()):
      return apply(params, inputs, targets_BxT=inputs["targets"], temperature=temperature, extra_stats=extra)

    def forward(params, inputs, temperature=1.0, extra=(), names=()):
      out, hidden_BxTxD = apply(params, inputs, targets_BxT=inputs["targets"], temperature=temperature,
                                extra_stats=extra, return_hidden=True)
      args = {"inputs": model_inputs(inputs), "hidden": (hidden_BxTxD,)}
      return out, {n: parts[n].apply({"params": params[PARTS][n]}, *args[reads[n]]) for n in names}

    fns, stats_fns = {}, {}
    for spec in p.specs:
      if spec.source == "run":
        net, w = p.networks[spec.role], frozen[spec.role]
      else:  # the starting policy: its copy, or under a parameterisation the base with it off
        net, w = plain, frozen[spec.role] if spec.role in frozen else base
      fns[spec.role] = lambda inputs, net=net, w=w: net.apply({"params": w}, *model_inputs(inputs))
      stats_fns[spec.role] = lambda inputs, t=1.0, extra=(), net=net, w=w: net.apply(
          {"params": w}, *model_inputs(inputs), targets_BxT=inputs["targets"], temperature=t, extra_stats=extra)
    return LossContext(apply=apply, frozen=fns, stats=stats, frozen_stats_fns=stats_fns, forward_fn=forward,
                       model_terms=lambda: moe.loss_terms(router_stats, model.cfg))

  return context


def model_inputs(inputs: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  return inputs["tokens"], inputs["segment_ids"], inputs["positions"]
