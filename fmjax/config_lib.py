"""Config helpers: variant parsing (`configs/x.py:k=v,flag`), the base config every stage extends, validation."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import ml_collections
from ml_collections import config_dict

from fmjax import data as data_lib
from fmjax import sharding
from fmjax.model import config as model_config
from fmjax.model import lora as lora_lib
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

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "lm"  # loss head (fmjax/objectives)
  c.objective.z_loss = 0.0  # weight of logsumexp(logits)² (PaLM uses 1e-4)
  c.objective.completion_only = True  # sft: loss on responses only (False: on every real token of an example)
  c.objective.beta = 0.1  # preference heads: inverse temperature of the implicit reward
  c.objective.reference = "model"  # preference heads: model (frozen, live) | precomputed (ref_*_logps in the data)
  # cdpo: ε, the probability that a preference label is flipped; the conservative DPO loss of Mitchell (2023),
  # −(1−ε)·logσ(βh) − ε·logσ(−βh). Not TRL's DPOTrainer `label_smoothing`: its "sigmoid" loss ignores it (it smooths
  # "robust", "exo_pair" and "aot"; CPOTrainer's "sigmoid" applies it, without a reference model).
  c.objective.label_smoothing = 0.1
  c.objective.simpo_gamma = 0.5  # simpo: target reward margin
  c.objective.kto_desirable_weight = 1.0  # kto: weight of desirable (chosen) responses
  c.objective.kto_undesirable_weight = 1.0  # kto: weight of undesirable (rejected) responses
  c.objective.teacher = ""  # distill: the teacher's run directory (frozen; same tokenizer)
  c.objective.teacher_step = -1  # distill: the teacher's checkpoint step; -1 = newest
  c.objective.teacher_bootstrap = ""  # distill, with no teacher: pre-train this config into WORKDIR/teacher first
  c.objective.divergence = "forward_kl"  # distill: forward_kl | reverse_kl | jsd
  c.objective.jsd_beta = 0.5  # distill, jsd: weight of the teacher in the mixture
  c.objective.temperature = 1.0  # distill: softmax temperature of both (the divergence is scaled by T²)
  c.objective.alpha = 0.5  # distill: weight of the hard-label cross-entropy; 1 − alpha on the divergence
  c.objective.top_k = 0  # distill: compare on the teacher's top-k tokens only; 0 = the whole vocabulary

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

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # 0 = off (every parameter trains); r > 0: train rank-r adapters over a frozen base
  c.lora.alpha = 16.0  # adapter scale s = alpha / rank
  c.lora.dropout = 0.0  # dropout on the adapters' input while training
  c.lora.targets = lora_lib.DEFAULT_TARGETS  # regex searched in parameter paths, e.g. 'layers/attn/q_kernel'
  c.lora.rslora = False  # rank-stabilised scale alpha / sqrt(rank)

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


def sibling(config_file: str, spec: str) -> str:
  """`spec` ('pretrain.py[:variant]') as a path beside `config_file` (a config's `__file__`), so a config that
  bootstraps another finds it from any working directory."""
  return os.path.join(os.path.dirname(os.path.abspath(config_file)), spec)


def finetune(init_from: str, smoke: bool, model: str, steps: int, lr: float, data: str,
             config_file: str) -> ml_collections.ConfigDict:
  """The base of the fine-tuning stages (SFT, LoRA, ...): start from the params of pre-trained (or imported) run
  `init_from` with its tokenizer, model shape and chat template, evaluate the held-out split from step 0 on. With no
  `init_from`, the pre-training config beside `config_file` (`smoke`: its smoke variant) first trains a base into
  WORKDIR/base."""
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


def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
  """The LoRA parameterisation of this run, or None when every parameter trains (`lora.rank` = 0)."""
  if config.lora.rank < 0:
    raise UserError(f"lora.rank={config.lora.rank} must be >= 0 (0 = off).")
  if not config.lora.rank:
    return None
  return lora_lib.LoraConfig(**config.lora.to_dict()).validate()


def _rules() -> list[tuple[str, Callable[[Any], bool], str]]:
  """(key, predicate, what the value must be) for every config value with a range or a set of choices."""
  from fmjax import objectives
  from fmjax.data import chat, formats, sp_tokenizer
  from fmjax.objectives import distill
  from fmjax.train import optimizer

  positive, non_negative = (lambda v: v > 0), (lambda v: v >= 0)
  fraction = lambda v: 0 <= v < 1  # noqa: E731
  mesh = (lambda v: v == -1 or v >= 1), "-1 (fill) or >= 1"

  def one_of(choices) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"one of {tuple(choices)}"

  def regex(v: str) -> bool:
    try:
      re.compile(v)
      return True
    except re.error:
      return False

  def template(v: str) -> bool:
    try:
      chat.ChatTemplate(v)
      return True
    except UserError:
      return False

  min_vocab = 256 + 4 + len(sp_tokenizer.CHAT_MARKERS)  # byte fallback, PAD/UNK/BOS/EOS, the chat markers
  return [
      ("train.steps", positive, "> 0 (total optimizer steps)"),
      ("train.batch_size", positive, "> 0 (sequences per step)"),
      ("train.seq_len", positive, "> 0 (tokens per sequence)"),
      ("train.grad_accum", positive, "> 0 (micro-batches per step)"),
      ("train.stop_after", non_negative, ">= 0 (0 = off)"),
      ("train.spike_factor", non_negative, ">= 0 (0 = the divergence guard is off)"),
      ("train.spike_window", positive, "> 0 (recent losses the guard's median is over)"),
      ("train.spike_skips", non_negative, ">= 0 (consecutive spikes skipped before the run stops)"),
      ("optimizer.name", *one_of(optimizer.OPTIMIZERS)),
      ("optimizer.lr", positive, "> 0 (the peak learning rate)"),
      ("optimizer.schedule", *one_of(optimizer.SCHEDULES)),
      ("optimizer.warmup_steps", non_negative, ">= 0 (steps of linear warmup)"),
      ("optimizer.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1] (final lr = lr * min_lr_ratio)"),
      ("optimizer.decay_fraction", lambda v: 0 < v <= 1, "in (0, 1] (wsd: fraction of post-warmup steps decaying)"),
      ("optimizer.decay_shape", *one_of(("linear", "sqrt"))),
      ("optimizer.b1", fraction, "in [0, 1) (Adam's first-moment decay)"),
      ("optimizer.b2", fraction, "in [0, 1) (Adam's second-moment decay)"),
      ("optimizer.eps", positive, "> 0 (Adam's epsilon)"),
      ("optimizer.weight_decay", non_negative, ">= 0"),
      ("optimizer.no_decay_regex", regex, "a valid regular expression"),
      ("optimizer.clip_norm", non_negative, ">= 0 (0 = no clipping)"),
      ("checkpoint.every_steps", non_negative, ">= 0 (0 = only at the end)"),
      ("checkpoint.every_minutes", non_negative, ">= 0 (0 = off)"),
      ("checkpoint.keep", lambda v: v >= 1, ">= 1 (newest checkpoints kept)"),
      ("checkpoint.keep_every", non_negative, ">= 0 (0 = none)"),
      ("eval.every_steps", non_negative, ">= 0 (0 = never)"),
      ("eval.batches", positive, "> 0"),
      ("log.every_steps", positive, "> 0"),
      ("log.peak_flops", non_negative, ">= 0 (0 = the device table / CPU probe)"),
      ("data.format", *one_of(formats.FORMATS)),
      ("data.holdout", fraction, "in [0, 1) (the fraction of records held out for eval)"),
      ("data.workers", non_negative, ">= 0 (0 = in the training process)"),
      ("data.packing_bins", positive, "> 0"),
      ("data.overlong", *one_of(formats.OVERLONG)),
      ("data.chat_template", template, f"a preset {tuple(chat.PRESETS)} or a template with '{{role}}' before one "
       "'{content}'"),
      ("data.tokenizer", *one_of(("sentencepiece", "hf", "bytes"))),
      ("data.tokenizer_train_chars", positive, "> 0 (characters per source that train the tokenizer)"),
      ("data.vocab_size", lambda v: v > min_vocab, f"> {min_vocab} (256 byte pieces, PAD/UNK/BOS/EOS and the chat "
       "markers, plus the learned pieces)"),
      ("data.shards", non_negative, ">= 0 (0 = one per process)"),
      ("objective.name", *one_of(sorted(objectives.REGISTRY))),
      ("objective.z_loss", non_negative, ">= 0"),
      ("objective.beta", positive, "> 0 (the inverse temperature of the implicit reward)"),
      ("objective.reference", *one_of(("model", "precomputed"))),
      ("objective.label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5) (the probability a label is flipped)"),
      ("objective.simpo_gamma", non_negative, ">= 0 (the target reward margin)"),
      ("objective.kto_desirable_weight", positive, "> 0"),
      ("objective.kto_undesirable_weight", positive, "> 0"),
      ("objective.teacher_step", lambda v: v >= -1, ">= -1 (-1 = the newest checkpoint)"),
      ("objective.divergence", *one_of(distill.DIVERGENCES)),
      ("objective.jsd_beta", lambda v: 0 < v < 1, "in (0, 1) (the teacher's weight in the mixture)"),
      ("objective.temperature", positive, "> 0"),
      ("objective.alpha", lambda v: 0 <= v <= 1, "in [0, 1] (the weight of the hard-label loss)"),
      ("objective.top_k", non_negative, ">= 0 (0 = the whole vocabulary)"),
      ("init_from.step", lambda v: v >= -1, ">= -1 (-1 = the newest checkpoint)"),
      ("lora.rank", non_negative, ">= 0 (0 = off)"),
      ("lora.alpha", positive, "> 0 (the adapter scale is alpha / rank)"),
      ("lora.dropout", fraction, "in [0, 1)"),
      ("lora.targets", regex, "a valid regular expression"),
      *((f"mesh.{axis}", *mesh) for axis in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor")),
  ]


def _shown(value: Any) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at start, naming the key, its value and what it must be, on a value out of its range and on
  combinations that cannot run. Reads no file (tools/aot_compile.py validates configs of runs elsewhere); the files
  and directories a run reads are `check_inputs`'s."""
  for key, ok, what in _rules():
    section, name = key.split(".")
    if section not in config or name not in config[section]:
      continue
    value = config[section][name]
    try:
      good = bool(ok(value))
    except TypeError:  # e.g. a string where a number belongs (in a config file; flags are typed)
      good = False
    if not good:
      raise UserError(f"{key}={_shown(value)} must be {what}.")
  t, opt = config.train, config.optimizer
  if t.batch_size % t.grad_accum:
    raise UserError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}; change "
                    "one of them.")
  if opt.warmup_steps >= t.steps > 1:
    raise UserError(f"optimizer.warmup_steps={opt.warmup_steps} must be smaller than train.steps={t.steps}; lower it "
                    "or train longer.")
  resolved_model(config)  # model.*: fmjax/model/config.py's checks
  lora_config(config)


def check_workdir(path: str) -> None:
  """`path` can be a run directory: a directory that exists, or can be created, and can be written."""
  if not path or not path.strip():
    raise UserError("--workdir is empty; pass the run directory, e.g. --workdir=/tmp/run (created if missing).")
  if "://" in path:
    return  # a remote filesystem (e.g. gs://): its client checks it
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--workdir={path!r} is a file, not a directory; pass a new or existing run directory, or move "
                    "that file away.")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f"--workdir={path!r} cannot be created: {existing!r} is a file, not a directory; pass another "
                    "--workdir.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"--workdir={path!r}: {existing!r} is not writable; pass a --workdir you can write to.")


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Fails at start, naming the key and the fix, when a file or directory the run reads is missing or of the wrong
  kind: init_from.workdir (and its checkpoint), the run directories of the head's frozen models (e.g.
  objective.teacher), the bootstrap configs, data.tokenizer_path and the file globs of data.source, data.mixture,
  data.tokenizer_source and eval.sources."""
  from fmjax import objectives
  from fmjax.data import sources
  from fmjax.train import frozen, init_from

  bootstraps = [("init_from.bootstrap", config.init_from.bootstrap)]
  runs = [("init_from.workdir", config.init_from.workdir, config.init_from.step, "init_from")]
  for spec in objectives.get(config.objective).frozen:
    if spec.source == "run":
      workdir, step, bootstrap = frozen.run_keys(config, spec)
      key = f"objective.{spec.config_key}"
      bootstraps.append((f"{key}_bootstrap", bootstrap))
      runs.append((key, workdir, step, key))
  for key, spec in bootstraps:
    if spec and not os.path.isfile(spec.partition(":")[0]):
      raise UserError(f"{key}={spec!r}: the config file does not exist; name one such as "
                      "configs/pretrain.py[:variant], or leave it empty.")
  for key, workdir, step, prefix in runs:
    if not workdir:
      continue
    bootstrap = "init_from.bootstrap" if prefix == "init_from" else f"{key}_bootstrap"
    if not os.path.isdir(workdir):
      raise UserError(f"{key}={workdir!r} does not exist; point it at a trained run directory (the --workdir of a "
                      f"finished run, or `tools/convert_hf.py import`'s), or leave it empty and set {bootstrap}=CONFIG "
                      "to pre-train one first.")
    if prefix != "init_from" and not os.path.isfile(os.path.join(workdir, "config.json")):
      raise UserError(f"{key}={workdir!r} is not an fmjax run directory (it has no config.json); point it at the "
                      "--workdir of a trained run (or `tools/convert_hf.py import`'s).")
    try:
      init_from.checkpoint_dir(workdir, step, prefix)
    except FileNotFoundError as e:
      raise UserError(str(e)) from None
  d = config.data
  if d.tokenizer_path and d.tokenizer != "bytes":
    data_lib.tokenizer_from_file(d.tokenizer_path, key="data.tokenizer_path")
  specs = [s.source for s in data_lib.train_specs(d)] + [d.tokenizer_source] + list(config.eval.sources.values())
  for spec in filter(None, specs):
    if spec.partition(":")[0] not in ("embedded", "tfds", "prepared"):
      sources.expand(spec)  # a glob that matches no files, or files of several kinds, is an error naming it
    elif spec.startswith("prepared:") and not os.path.isdir(spec.partition(":")[2]):
      raise UserError(f"data source {spec!r}: directory {spec.partition(':')[2]!r} does not exist; write it with "
                      "tools/prepare_data.py --output=DIR first.")


def check_run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Everything `fmjax.main` checks before training: the config's values, the run directory and the inputs."""
  validate(config)
  check_workdir(workdir)
  check_inputs(config)


def check_batch(config: ml_collections.ConfigDict, batch_shards: int) -> None:
  """The micro-batch must split evenly over the data × fsdp devices."""
  micro = config.train.batch_size // config.train.grad_accum
  if micro % batch_shards:
    raise UserError(f"the micro-batch train.batch_size/train.grad_accum = {micro} must be divisible by the "
                     f"data×fsdp mesh size {batch_shards}; change train.batch_size, train.grad_accum or mesh.*.")


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
