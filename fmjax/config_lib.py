"""Config helpers for config files and tools: variant parsing (`configs/x.py:k=v,flag`), the base config every stage
extends (built from the declarations: fmjax/spec.py's sections, the heads' options, the parameterisations'), the
head's section (`use_head`), the fine-tuning base, loading a config file. Resolving and checking a config is
fmjax/spec.py's."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from fmjax import adapters, objectives, spec
from fmjax import data as data_lib
from fmjax.errors import UserError
from fmjax.model import config as model_config


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `k=v,k2=v2,flag` into a ConfigDict typed by `defaults`; a bare word sets a bool to True.

  An unknown key is an error that lists the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise UserError(f"config variant {key!r} is unknown; known variants: {sorted(defaults)}.")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise UserError(f"config variant {key!r} needs a value: {key}=...")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise UserError(f"config variant {item!r}: {key} is a switch; write {key}, {key}=true or {key}=false.")
      out[key] = value.lower() in ("1", "true", "yes", "on")
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        kind = type(default).__name__
        raise UserError(f"config variant {item!r}: {key} takes {'an' if kind[0] in 'aeiou' else 'a'} {kind} "
                        f"(default {default!r}).") from None
  return out


def base() -> ml_collections.ConfigDict:
  """Every section and key a stage may set, each at its default: `model` (a preset plus ModelConfig overrides), the
  run-level sections of fmjax/spec.py, `objective` (the head's options) and each parameterisation's section. Keys
  and their one-line docs: docs/config-keys.md. Stages change values; keys not listed here are errors."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()
  c.model.name = "small"  # preset (fmjax/model/config.py); the fields below override it when set
  for f in dataclasses.fields(model_config.ModelConfig):
    c.model[f.name] = config_dict.placeholder(type(f.default))
  for name, cls in spec.SECTIONS.items():
    c[name] = ml_collections.ConfigDict(spec.section_defaults(cls))
    if name == "data":  # the loss head (fmjax/objectives) and its options: `use_head` builds any head's
      c.objective = ml_collections.ConfigDict(objectives.section("lm"))
  for name, cls in adapters.registered().items():  # parameterisations (fmjax/adapters), each switched off
    c[name] = ml_collections.ConfigDict(cls.section_defaults())
  return c


def use_head(c: ml_collections.ConfigDict, name: str, **values: Any) -> ml_collections.ConfigDict:
  """Sets the loss head of config `c` to `name`, its objective section to that head's options at their defaults
  and then `values`; returns the section."""
  c.objective = ml_collections.ConfigDict(objectives.section(name))
  for key, value in values.items():
    c.objective[key] = value
  return c.objective


def sibling(config_file: str, spec: str) -> str:
  """`spec` ('pretrain.py[:variant]') as a path beside `config_file` (a config's `__file__`), so a config that
  bootstraps another finds it from any working directory."""
  return os.path.join(os.path.dirname(os.path.abspath(config_file)), spec)


def rollout_task(a: Any, head: str, config_file: str,
                 base_config: str) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(config, its objective section) of an RL stage that trains head `head` on its own samples, from the parsed
  variant `a` (its keys smoke, rlhf, init_from, reward_model, rewards, completion, steps, lr, model). Task `sort`
  (embedded:sort, reward sort_digits; with no init_from the base is `base_config`, a fine-tuning config beside
  `config_file`, trained on the task's records) or with `rlhf` the prompts of embedded:preference scored by the
  reward model `reward_model` (or, with none, one trained first). Held-out loss is off: progress is the rollouts'
  reward."""
  data = "embedded:preference" if a.rlhf else "embedded:sort"
  c = finetune(a.init_from, a.smoke, a.model, a.steps, a.lr, data, config_file)
  if not a.init_from:  # the base: pre-training, then fine-tuning on the task's own records
    c.init_from.bootstrap = sibling(config_file, base_config + (":smoke" if a.smoke else ""))
    if not a.rlhf:
      c.init_from.bootstrap += (",data=embedded:sort" if a.smoke else ":data=embedded:sort")
  o = use_head(c, head)
  o.rewards = a.rewards or ("model" if a.rlhf else "sort_digits")
  o.reward_model = a.reward_model
  if a.rlhf and not a.reward_model:  # standalone: a reward model over the same base first
    o.reward_model_bootstrap = sibling(config_file, "reward.py:smoke" if a.smoke else "reward.py")
  o.max_completion_length = a.completion or (48 if a.rlhf else 16)
  c.train.seq_len = 128 if a.rlhf else 48
  c.eval.every_steps, c.eval.at_start = 0, False
  c.log.every_steps = 1 if a.smoke else 5
  return c, o


def finetune(init_from: str, smoke: bool, model: str, steps: int, lr: float, data: str,
             config_file: str, smoke_lr: float = 1e-3) -> ml_collections.ConfigDict:
  """The base of the fine-tuning stages: start from the params of pre-trained (or imported) run
  `init_from` with its tokenizer, model shape and chat template, evaluate the held-out split from step 0 on. With no
  `init_from`, the pre-training config beside `config_file` (`smoke`: its smoke variant) first trains a base into
  WORKDIR/base. `smoke`: a tiny model and 30 steps at `smoke_lr`."""
  c = base()
  c.model.name = model
  c.data.source = data
  c.init_from.workdir = init_from
  if init_from:
    # the copy every run directory carries (sentencepiece tokenizer.model, or an import's tokenizer.json)
    c.data.tokenizer_path = data_lib.run_tokenizer_file(init_from) or os.path.join(init_from, "tokenizer.model")
  else:
    variant = ",".join(([] if not smoke else ["smoke"]) + ([] if model == "small" else [f"model={model}"]))
    c.init_from.bootstrap = sibling(config_file, "pretrain.py" + (":" + variant if variant else ""))
    c.data.tokenizer_source = "embedded:prose"  # the tokenizer that pre-training trains (and caches)
  c.train.steps = steps
  c.optimizer.lr = lr
  c.optimizer.warmup_steps = max(1, steps // 20)
  c.optimizer.weight_decay = 0.0
  c.data.overlong = "drop"  # an example longer than a row is skipped, not cut (a cut response would teach no stop)
  c.eval.every_steps = max(1, steps // 10)
  c.eval.at_start = True  # step 0: the base itself
  c.checkpoint.every_steps = max(1, steps // 4)
  if smoke:
    c.model.name = "smoke" if model == "small" else model
    c.data.vocab_size = 512
    c.model.vocab_size = 512  # the smoke tokenizer's, whichever preset
    c.train.seq_len = 256  # nearly every embedded instruction fits in 256 pieces of the 512-piece tokenizer
    c.log.every_steps, c.eval.batches = 1, 2
    c.train.steps, c.optimizer.lr, c.optimizer.warmup_steps = 30, smoke_lr, 3
    c.eval.every_steps, c.checkpoint.every_steps = 10, 30
  if init_from and os.path.isfile(os.path.join(init_from, "config.json")):
    with open(os.path.join(init_from, "config.json")) as f:
      theirs = json.load(f)
    c.model.update({k: v for k, v in theirs.get("model", {}).items() if k in c.model})  # the base's shape
    c.data.chat_template = theirs.get("data", {}).get("chat_template", c.data.chat_template)
  return c


def resolved_model(config: ml_collections.ConfigDict) -> model_config.ModelConfig:
  """The preset named by `config.model.name` with every explicitly set `config.model.*` field applied."""
  overrides = {k: v for k, v in config.model.items() if k != "name"}
  return model_config.resolve(config.model.name, overrides)


def adapter(config: ml_collections.ConfigDict) -> adapters.Adapter | None:
  """The parameterisation this run trains (fmjax/adapters/), or None when every parameter trains."""
  return adapters.get(config)


def load(file_spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:variant]` the way `--config` does, for tools and tests."""
  path, _, arg = file_spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist (expected e.g. configs/pretrain.py).")
  module_spec = importlib.util.spec_from_file_location(f"fmjax_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
