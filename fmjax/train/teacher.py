"""The frozen teacher of the `distill` head: another run's model and weights, read into this run's mesh."""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from fmjax import config_lib, sharding
from fmjax.model import ModelConfig, Transformer, init_params
from fmjax.train import checkpoint, init_from, weights


def model_config(config: ml_collections.ConfigDict, student_vocab: int, tokenizer_id: str) -> ModelConfig:
  """The architecture of run `objective.teacher` (its config.json), checked against this run: it must share this
  run's tokenizer and vocabulary."""
  workdir = config.objective.teacher
  if not workdir:
    raise ValueError(f"objective.name={config.objective.name!r} needs objective.teacher=WORKDIR: a trained run (of "
                     "any size, with this run's tokenizer) whose model teaches this one.")
  model_cfg = config_lib.resolved_model(weights.run_config(workdir))
  if model_cfg.vocab_size != student_vocab:
    raise ValueError(f"objective.teacher={workdir!r} has model.vocab_size={model_cfg.vocab_size} but this run has "
                     f"{student_vocab}; teacher and student need the same vocabulary (tokenizer).")
  init_from.check_tokenizer(workdir, {"id": tokenizer_id}, key="objective.teacher")
  return model_cfg


def abstract(model_cfg: ModelConfig, mesh: Mesh, rules) -> tuple[Transformer, Any, Any]:
  """(teacher model, abstract params carrying their shardings, the shardings): nothing is allocated."""
  boxed = jax.eval_shape(lambda r: init_params(model_cfg, r, boxed=True), jax.random.PRNGKey(0))
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  return Transformer(model_cfg), checkpoint.abstract(nn.unbox(boxed), shardings), shardings


def load(config: ml_collections.ConfigDict, target: Any) -> Any:
  """The params of run `objective.teacher` at `objective.teacher_step`, read into `target` (`abstract`'s)."""
  workdir = config.objective.teacher
  params = init_from.read(workdir, config.objective.teacher_step, target, key="objective.teacher")
  cfg = config_lib.resolved_model(weights.run_config(workdir))
  logging.info("teacher: %s (%s parameters, d_model %d, %d layers), frozen", workdir,
               f"{sum(x.size for x in jax.tree.leaves(params)):,}", cfg.d_model, cfg.num_layers)
  return params
