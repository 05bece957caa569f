"""Everything a run needs, built once from a config: mesh, model, data, sharded state, compiled step."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

from fmjax import config_lib, data, objectives, sharding
from fmjax.model import ModelConfig, Transformer, flops
from fmjax.train import optimizer as optim
from fmjax.train import state as train_state
from fmjax.train.step import make_train_step


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  model: Transformer
  tokenizer: Any
  stream: Any  # iterator of this process's rows of each global batch
  state: train_state.TrainState
  state_shardings: train_state.TrainState
  step_fn: Callable  # compiled (state, batch) -> (state, metrics); donates state
  compile_seconds: float
  num_params: int
  flops_per_token: float

  def next_batch(self) -> dict[str, jax.Array]:
    return sharding.global_batch(next(self.stream), self.mesh)


def build(config: ml_collections.ConfigDict, devices: list | None = None) -> Experiment:
  config_lib.validate(config)
  model_cfg = config_lib.resolved_model(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  config_lib.check_batch(config, mesh.shape["data"] * mesh.shape["fsdp"])
  rules = tuple(tuple(r) for r in config.mesh.rules)

  tokenizer = data.make_tokenizer(config.data)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={model_cfg.vocab_size}; "
                     "set model.vocab_size to at least the tokenizer's size.")
  stream = data.make_train_stream(config, tokenizer, jax.process_index(), jax.process_count())

  model = Transformer(model_cfg)
  schedule = optim.make_schedule(config.optimizer, config.train.steps)
  tx = optim.make_optimizer(config.optimizer, schedule)
  state, shardings = train_state.create(model, tx, mesh, rules, config.train.seed)

  apply_fn = lambda p, tokens, seg, pos: model.apply({"params": p}, tokens, seg, pos)  # noqa: E731
  step = make_train_step(objectives.get(config.objective), apply_fn, tx, schedule,
                         grad_accum=config.train.grad_accum, skip_nonfinite=config.train.skip_nonfinite, mesh=mesh)
  jitted = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  batch_spec = {k: jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len), v.dtype,
                                        sharding=sharding.batch_sharding(mesh))
                for k, v in stream.batch(0).items()}
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jitted.lower(state, batch_spec).compile()
  exp = Experiment(config, model_cfg, mesh, model, tokenizer, stream, state, shardings, compiled,
                   time.perf_counter() - t0, train_state.count_params(state.params),
                   flops.train_flops_per_token(model_cfg, config.train.seq_len))
  logging.info("model %s: %s parameters, %.1f MFLOP/token (training); mesh %s; step compiled in %.1fs",
               config.model.name, f"{exp.num_params:,}", exp.flops_per_token / 1e6, dict(mesh.shape),
               exp.compile_seconds)
  return exp
