"""Everything a run needs, built once from a run spec: mesh, model, data, sharded state, compiled step."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from fmjax import adapters, data, objectives, sharding
from fmjax.data import layout as layout_lib
from fmjax.data import tokenizers
from fmjax.model import ModelConfig, Transformer
from fmjax.spec import Spec
from fmjax.data import prompts
from fmjax.train import checks
from fmjax.train import frozen as frozen_lib
from fmjax.train import position_loss
from fmjax.train import rollout as rollout_lib
from fmjax.train import state as train_state
from fmjax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Run:
  """What `build` makes once, and nothing changes: the spec, mesh, model, tokenizer, data source, head, layout, the
  compiled train and eval steps."""
  spec: Spec
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  model: Transformer
  tokenizer: Any
  dataset: Any  # grain dataset of this process's rows of each global batch
  head: objectives.Head
  layout: layout_lib.Layout  # of the training batches; its rows_per_example count in tokens/s and MFU
  frozen_plan: frozen_lib.Plan  # the frozen models the head declared, its parts
  state_shardings: train_state.TrainState  # of the state as its weights are read (frozen trees unquantized)
  quantize: Callable  # state as read -> the state the step takes (quant.*: frozen trees stored quantized)
  step: Callable  # compiled (state, batch) -> (state, metrics); donates state
  compile_seconds: float  # of the train step
  num_params: int  # trained parameters (under a parameterisation: its tree)
  flops_per_token: float
  # compiled (state, batch) -> (loss_sum, weight, metric_sums, position buckets: (NLL sums, weights) or ())
  eval_fn: Callable | None = None
  eval_batches: Mapping[str, list] = dataclasses.field(default_factory=dict)  # eval source -> fixed global batches

  def evaluate(self, state: train_state.TrainState) -> dict[str, jax.Array]:
    """Token-mean held-out loss and head metrics over each eval source's fixed batches, plus perplexity where the
    head reports an NLL, and the NLL by position bucket (eval.position_buckets; fmjax/train/position_loss.py);
    with several sources, per source as `eval_<metric>/<name>` and over all tokens as `eval_<metric>`. Returns
    device scalars, so the caller need not wait for them."""
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
      if self.head.reports_nll:
        result[f"eval_perplexity{suffix}"] = jnp.exp(result[f"eval_nll{suffix}"])
      result.update(position_loss.metrics(outs, self.spec.train.seq_len, suffix))
    return result


@dataclasses.dataclass
class Experiment:
  """A run and the loop's state of it: the train state, the data iterator and the rollout driver (whose cache
  holds the rollout being trained on)."""
  run: Run
  state: train_state.TrainState
  stream: Any  # the dataset's iterator (get_state / set_state)
  rollout: Any = None  # an RL head's rollout driver (fmjax/train/rollout.py): it makes each batch from prompts

  def batch(self, state: train_state.TrainState, step: int) -> tuple[dict[str, jax.Array], dict[str, float]]:
    """The batch of `step` and the metrics of making it (a rollout's; none for data batches)."""
    return (self.next_batch(), {}) if self.rollout is None else self.rollout.batch(state, step)

  def boundary(self, step: int) -> bool:
    """Whether a checkpoint or a stop may follow `step` (an RL run's: only after a rollout's last step)."""
    return self.rollout is None or self.rollout.boundary(step)

  def next_batch(self) -> dict[str, jax.Array]:
    return sharding.global_batch(next(self.stream), self.run.mesh)


def build(spec: Spec, devices: list | None = None) -> Experiment:
  """Mesh, tokenizer, data, the compiled step and eval step, and the state: initialised (seed), with the frozen
  models the head declares ('policy' copies of the initial params, 'run' models read from their directories)."""
  model_cfg, head, t = spec.model, spec.head, spec.train
  mesh = sharding.make_mesh(spec.mesh, devices)
  checks.check_mesh(spec, mesh)

  tokenizer = data.make_tokenizer(spec.data)
  data.check_vocab(tokenizer, model_cfg.vocab_size)
  if head.rollout is not None:  # the data yields prompts; the rollout makes each batch with the current params
    records = prompts.open_records(spec.data)
    dataset = prompts.dataset(spec.data, t.batch_size, t.seq_len, head.rollout, tokenizer, records)
    batch_layout = layout_lib.with_adapter(layout_lib.for_head(head.layouts, head.columns), spec.adapter)
  else:
    dataset, batch_layout = data.train_dataset(spec.data, t, tokenizer, *sharding.data_shard(mesh), spec.adapter,
                                               model_cfg.num_labels)
  layout_lib.check(batch_layout, spec.head_name, head.layouts, head.columns)

  plan = step_lib.plan(spec, mesh, batch_layout)
  t0 = time.perf_counter()
  compiled = plan.lower().compile()
  compile_seconds = time.perf_counter() - t0
  model, rules = plan.model, plan.rules
  state, _ = train_state.create(model, plan.tx, mesh, rules, t.seed, t.spike_window, head.parts)
  frozen = {**frozen_lib.policy_copies(plan.frozen, train_state.base_params(state)),
            **frozen_lib.load_runs(spec.frozen_runs, plan.frozen, tokenizers.tokenizer_id(tokenizer))}
  state = state.replace(frozen={**state.frozen, **frozen})
  eval_fn, eval_batches = None, {}
  if spec.eval.every_steps:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      local = data.eval_batches(spec.eval, spec.data, t, tokenizer, *sharding.data_shard(mesh), spec.adapter,
                                model_cfg.num_labels)
      eval_batches = {name: [sharding.global_batch(b, mesh) for b in batches] for name, batches in local.items()}
      eval_step = position_loss.eval_step(head.loss, plan.context, t.seq_len, spec.eval.position_buckets)
      eval_fn = jax.jit(eval_step, in_shardings=(plan.shardings, sharding.batch_sharding(mesh)),
                        out_shardings=sharding.replicated(mesh)).lower(plan.state, plan.batch).compile()
  trained = train_state.count_params(state.params)
  flops_per_token = adapters.train_flops_per_token(model_cfg, t.seq_len, model.adapter, trained)
  run = Run(spec, model_cfg, mesh, model, tokenizer, dataset, head, batch_layout, plan.frozen, plan.plain_shardings,
            plan.quantize, compiled, compile_seconds, trained, flops_per_token, eval_fn, eval_batches)
  exp = Experiment(run, state, iter(dataset))
  if head.rollout is not None:
    exp.rollout = rollout_lib.Driver(head.rollout, t.seq_len, spec.data.chat_template, model, tokenizer, records,
                                     exp.stream, mesh, plan.frozen, t.batch_size, rules)
  base = train_state.count_params(state.base)
  notes = ([model.adapter.describe(run.num_params)] if model.adapter else []) + \
      [f"+ frozen {s.role}" + (" (a copy)" if s.role in state.frozen and s.source == "policy" else "")
       for s in head.frozen]
  logging.info("model %s: %s parameters%s, %.1f MFLOP/token (training); mesh %s; step compiled in %.1fs",
               spec.record["model"]["name"], f"{run.num_params + base:,}", f" ({'; '.join(notes)})" if notes else "",
               run.flops_per_token / 1e6, dict(mesh.shape), run.compile_seconds)
  return exp
