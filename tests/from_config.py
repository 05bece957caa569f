"""Tests build runs from configs: these resolve a config into its spec (fmjax/spec.py) and hand the pieces on."""

from fmjax import spec
from fmjax.data import pipeline
from fmjax.train import experiment


def train_dataset(config, tokenizer, process_index: int = 0, process_count: int = 1):
  s = spec.resolve(config)
  return pipeline.train_dataset(s.data, s.train, tokenizer, process_index, process_count, s.adapter,
                                s.model.num_labels)


def eval_batches(config, tokenizer, process_index: int = 0, process_count: int = 1):
  s = spec.resolve(config)
  return pipeline.eval_batches(s.eval, s.data, s.train, tokenizer, process_index, process_count, s.adapter,
                               s.model.num_labels)


def eval_specs(config):
  s = spec.resolve(config)
  return pipeline.eval_specs(s.eval, s.data)


def build(config, devices=None):
  return experiment.build(spec.resolve(config), devices)
