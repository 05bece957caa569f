"""Config helpers: variant parsing (`configs/x.py:k=v,flag`), the base config every stage extends, resolving the
model. Checks of a config at start are fmjax/config_checks.py's."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from fmjax import data as data_lib
from fmjax import sharding
from fmjax.model import config as model_config
from fmjax import adapters, objectives
from fmjax.errors import UserError


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
  """Every section and key a stage may set. Stages change values; keys not listed here are errors."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = "small"  # preset (fmjax/model/config.py); the fields below override it when set
  for f in dataclasses.fields(model_config.ModelConfig):
    c.model[f.name] = config_dict.placeholder(type(f.default))

  c.data = ml_collections.ConfigDict()
  c.data.source = "embedded:prose"  # embedded:NAME | tfds:NAME[/CONFIG][:SPLIT] | prepared:DIR | a file glob
  c.data.format = "auto"  # auto (by the first record's keys) | text | prompt_completion | chat | preference | unpaired
  c.data.field = "text"  # the text field of `text` records (.jsonl / .parquet / tfds / .array_record)
  c.data.mixture = ml_collections.ConfigDict()  # name -> {source, weight[, format, field]}; replaces data.source
  c.data.holdout = 0.1  # fraction of records held out for eval (embedded corpora: their fixed 10% split)
  c.data.tfds_data_dir = ""  # where tfds datasets are prepared; empty = tfds's default
  c.data.workers = 0  # tokenizing processes per source; 0 = in the training process
  c.data.packing_bins = 16  # first-fit bins open at once when packing whole examples (non-text formats)
  c.data.overlong = "error"  # an example longer than train.seq_len (non-text formats): error | truncate | drop
  c.data.chat_template = "fmjax"  # messages → text: fmjax | chatml | llama3 | plain, or a '{role}…{content}…' string
  c.data.tokenizer = "sentencepiece"  # sentencepiece | bytes (UTF-8 bytes, 259 ids)
  c.data.tokenizer_path = ""  # a sentencepiece .model; empty = train one on the training sources and cache it
  c.data.tokenizer_source = ""  # what an auto-trained tokenizer learns from; empty = the training sources
  c.data.tokenizer_train_chars = 50_000_000  # at most this much text per source trains the tokenizer
  c.data.vocab_size = 8192  # pieces of an auto-trained sentencepiece model
  c.data.seed = 0  # shuffle order
  c.data.shards = 0  # record streams split among the processes; 0 = one each; fixed: same batches on any host count

  # the loss head (fmjax/objectives) and its options: `use_head` builds the section of any registered head
  c.objective = ml_collections.ConfigDict(objectives.section("lm"))

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | sgd
  c.optimizer.lr = 3e-4  # peak learning rate
  c.optimizer.schedule = "cosine"  # cosine | wsd | constant, after a linear warmup
  c.optimizer.warmup_steps = 100
  c.optimizer.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio
  c.optimizer.decay_fraction = 0.2  # wsd: fraction of post-warmup steps spent decaying
  c.optimizer.decay_shape = "sqrt"  # wsd: linear | sqrt (1 - sqrt)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.no_decay_regex = r"(norm|bias)"  # parameter paths without weight decay
  c.optimizer.clip_norm = 1.0  # global-norm clipping; 0 = off

  c.train = ml_collections.ConfigDict()
  c.train.steps = 2000  # total optimizer steps
  c.train.batch_size = 8  # global batch (sequences per step, over all devices and micro-batches)
  c.train.seq_len = 256  # tokens per sequence
  c.train.grad_accum = 1  # micro-batches per step
  c.train.seed = 0  # parameter init and step rng
  c.train.stop_after = 0  # checkpoint and stop after this many steps of this invocation (job time slots); 0 = off
  c.train.skip_nonfinite = False  # True: skip a step whose loss/grad is NaN/inf; False: stop with an error
  c.train.spike_factor = 2.0  # divergence guard: a loss > median + factor·max(median, 1) skips its update; 0 = off
  c.train.spike_window = 100  # the guard's median is over this many recent accepted losses
  c.train.spike_skips = 3  # consecutive spikes skipped before the run stops with a message; 0 = stop at the first

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # within-slice sizes; -1 = fill
  c.mesh.dcn_data, c.mesh.dcn_fsdp, c.mesh.dcn_tensor = -1, 1, 1  # across-slice sizes
  c.mesh.rules = sharding.DEFAULT_RULES  # logical axis -> mesh axes; first match wins

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500  # save period in steps (and always at the last step); 0 = only at the end
  c.checkpoint.every_minutes = 0.0  # also save when this long has passed since the last save; 0 = off
  c.checkpoint.keep = 3  # newest checkpoints kept
  c.checkpoint.keep_every = 0  # also keep every step that is a multiple of this, forever; 0 = none
  c.checkpoint.async_save = True  # write in the background while training goes on

  c.init_from = ml_collections.ConfigDict()
  c.init_from.workdir = ""  # start from the params (not the optimizer) of another run's checkpoint
  c.init_from.step = -1  # that run's step; -1 = its newest checkpoint
  c.init_from.bootstrap = ""  # with workdir empty: pre-train this config into WORKDIR/base first, start from it

  for name, cls in adapters.registered().items():  # parameterisations (fmjax/adapters), each switched off
    c[name] = ml_collections.ConfigDict(cls.section_defaults())

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 200  # held-out loss period in steps (and at the last step); 0 = never
  c.eval.batches = 4  # fixed held-out batches of train.batch_size × train.seq_len, per eval source
  c.eval.at_start = False  # also evaluate the starting params (step 0), e.g. the base of a fine-tuning run
  c.eval.sources = ml_collections.ConfigDict()  # name -> source spec (read whole); empty = held-out training data

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 10  # metrics.jsonl / TensorBoard / console period
  c.log.peak_flops = 0.0  # peak FLOP/s per device (on CPU: of the host) for MFU; 0 = device table / CPU probe
  c.log.batch_digests = False  # debug: each process records a hash of every batch row it holds, per step
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
    c.init_from.bootstrap = sibling(config_file, "pretrain.py:smoke" if smoke else "pretrain.py")
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


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy with the model section filled in from its preset (what `config.json` records)."""
  out = ml_collections.ConfigDict(config.to_dict())
  for k, v in dataclasses.asdict(resolved_model(config)).items():
    out.model[k] = v
  return out


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:variant]` the way `--config` does, for tools and tests."""
  import importlib.util
  import os

  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist (expected e.g. configs/pretrain.py).")
  module_spec = importlib.util.spec_from_file_location(f"fmjax_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
