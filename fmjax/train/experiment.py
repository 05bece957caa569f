"""Everything a run needs, built once from a config: mesh, model, data, sharded state, compiled step."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fmjax import config_lib, data, objectives, sharding
from fmjax.model import ModelConfig, Transformer, flops
from fmjax.data import prepared
from fmjax.train import optimizer as optim
from fmjax.train import teacher
from fmjax.train import state as train_state
from fmjax.train.step import make_train_step


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  model: Transformer
  tokenizer: Any
  dataset: Any  # grain dataset of this process's rows of each global batch
  stream: Any  # its iterator (get_state / set_state)
  state: train_state.TrainState
  state_shardings: train_state.TrainState
  step_fn: Callable  # compiled (state, batch) -> (state, metrics); donates state
  compile_seconds: float  # of the train step
  num_params: int  # trained parameters (under LoRA: the adapters)
  flops_per_token: float
  sequences_per_row: int = 1  # 2 for preference batches: a chosen and a rejected row both train
  eval_fn: Callable | None = None  # compiled (state, batch) -> (loss_sum, weight, metric_sums)
  eval_batches: dict = dataclasses.field(default_factory=dict)  # eval source name -> fixed global batches, on device

  def next_batch(self) -> dict[str, jax.Array]:
    return sharding.global_batch(next(self.stream), self.mesh)

  def evaluate(self, state: train_state.TrainState) -> dict[str, jax.Array]:
    """Token-mean held-out loss and head metrics over each eval source's fixed batches, plus perplexity where the
    head reports an NLL; with several sources, per source as `eval_<metric>/<name>` and over all tokens as
    `eval_<metric>`. Returns device scalars, so the caller need not wait for them."""
    sums = {name: [self.eval_fn(state, b) for b in batches] for name, batches in self.eval_batches.items()}
    groups = {"": [o for outs in sums.values() for o in outs]}
    if len(sums) > 1:
      groups.update({f"/{name}": outs for name, outs in sums.items()})
    result = {}
    for suffix, outs in groups.items():
      weight = jnp.maximum(sum(o[1] for o in outs), 1.0)
      result[f"eval_loss{suffix}"] = sum(o[0] for o in outs) / weight
      for k in outs[0][2]:
        result[f"eval_{k}{suffix}"] = sum(o[2][k] for o in outs) / weight
      if f"eval_nll{suffix}" in result:
        result[f"eval_perplexity{suffix}"] = jnp.exp(result[f"eval_nll{suffix}"])
    return result


@dataclasses.dataclass
class TrainStep:
  """The train step of a config on a mesh, jitted with its shardings, and the abstract arguments it compiles for.
  Nothing is allocated: `build` compiles it and then creates the state; tools/aot_compile.py compiles it for a TPU
  topology that is not attached."""
  mesh: jax.sharding.Mesh
  rules: tuple
  model: Transformer
  tx: Any  # optax.GradientTransformation
  loss_fn: Callable
  context: Callable  # state.make_context's: frozen trees -> LossContext
  state: train_state.TrainState  # leaves are jax.ShapeDtypeStructs carrying their shardings
  shardings: train_state.TrainState
  batch: dict[str, jax.ShapeDtypeStruct]  # one global batch
  jitted: Callable  # (state, batch) -> (state, metrics), state donated

  def lower(self) -> jax.stages.Lowered:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted.lower(self.state, self.batch)


def train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch_dtypes: dict,
               teacher_cfg: ModelConfig | None = None) -> TrainStep:
  """The jitted step of `config` on `mesh` for batches with `batch_dtypes` (key -> dtype), over an abstract state:
  the trained params and optimizer state, plus the frozen trees the run holds (the LoRA base, a reference policy,
  and, for a head that needs a teacher, a `teacher_cfg` model)."""
  rules = tuple(tuple(r) for r in config.mesh.rules)
  model = Transformer(config_lib.resolved_model(config), config_lib.lora_config(config))
  schedule = optim.make_schedule(config.optimizer, config.train.steps)
  tx = optim.make_optimizer(config.optimizer, schedule)
  loss_fn = objectives.get(config.objective)
  state, shardings = train_state.abstract(model, tx, mesh, rules, config.train.seed,
                                          reference=getattr(loss_fn, "needs_reference", False))
  teacher_model = None
  if getattr(loss_fn, "needs_teacher", False):
    if teacher_cfg is None:
      raise ValueError(f"objective.name={config.objective.name!r} needs a teacher; pass its model config.")
    teacher_model, teacher_params, teacher_sh = teacher.abstract(teacher_cfg, mesh, rules)
    state = state.replace(frozen={**state.frozen, "teacher": teacher_params})
    shardings = shardings.replace(frozen={**shardings.frozen, "teacher": teacher_sh})
  context = train_state.make_context(model, teacher_model)
  step = make_train_step(loss_fn, context, tx, schedule,
                         grad_accum=config.train.grad_accum, skip_nonfinite=config.train.skip_nonfinite, mesh=mesh)
  jitted = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  batch = {k: jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len), dtype,
                                   sharding=sharding.batch_sharding(mesh))
           for k, dtype in batch_dtypes.items()}
  return TrainStep(mesh, rules, model, tx, loss_fn, context, state, shardings, batch, jitted)


def build(config: ml_collections.ConfigDict, devices: list | None = None) -> Experiment:
  config_lib.validate(config)
  model_cfg = config_lib.resolved_model(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  config_lib.check_batch(config, mesh.shape["data"] * mesh.shape["fsdp"])

  tokenizer = data.make_tokenizer(config.data)
  data.check_vocab(tokenizer, model_cfg.vocab_size)
  dataset, batch_dtypes = data.train_dataset(config, tokenizer, jax.process_index(), jax.process_count())

  teacher_cfg = None
  if getattr(objectives.get(config.objective), "needs_teacher", False):
    teacher_cfg = teacher.model_config(config, model_cfg.vocab_size, prepared.tokenizer_id(tokenizer))
  plan = train_step(config, mesh, batch_dtypes, teacher_cfg)
  t0 = time.perf_counter()
  compiled = plan.lower().compile()
  compile_seconds = time.perf_counter() - t0
  model, loss_fn, context, rules = plan.model, plan.loss_fn, plan.context, plan.rules
  state, _ = train_state.create(model, plan.tx, mesh, rules, config.train.seed,
                                reference=getattr(loss_fn, "needs_reference", False))
  if teacher_cfg is not None:  # read at every start: frozen trees are not checkpointed
    state = state.replace(frozen={**state.frozen, "teacher": teacher.load(config, plan.state.frozen["teacher"])})
  eval_fn, eval_batches = None, {}
  if config.eval.every_steps:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      local = data.eval_batches(config, tokenizer, jax.process_index(), jax.process_count())
      eval_batches = {name: [sharding.global_batch(b, mesh) for b in batches] for name, batches in local.items()}
      eval_step = lambda st, b: loss_fn(st.params, b, context(st.frozen))  # noqa: E731
      eval_fn = jax.jit(eval_step, in_shardings=(plan.shardings, sharding.batch_sharding(mesh)),
                        out_shardings=sharding.replicated(mesh)).lower(plan.state, plan.batch).compile()
  flops_per_token = flops.train_flops_per_token(model_cfg, config.train.seq_len, frozen_weights=model.lora is not None)
  exp = Experiment(config, model_cfg, mesh, model, tokenizer, dataset, iter(dataset), state, plan.shardings, compiled,
                   compile_seconds, train_state.count_params(state.params), flops_per_token,
                   2 if "chosen_tokens" in batch_dtypes else 1, eval_fn, eval_batches)
  base = train_state.count_params(state.frozen.get("base", {}))
  notes = ([f"{exp.num_params:,} trained: LoRA adapters"] if model.lora else []) + \
      (["+ a frozen copy as the reference policy"] if "reference" in state.frozen else [])
  logging.info("model %s: %s parameters%s, %.1f MFLOP/token (training); mesh %s; step compiled in %.1fs",
               config.model.name, f"{exp.num_params + base:,}", f" ({'; '.join(notes)})" if notes else "",
               exp.flops_per_token / 1e6, dict(mesh.shape), exp.compile_seconds)
  return exp
