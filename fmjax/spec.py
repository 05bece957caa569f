"""The run spec: a config (an ml_collections.ConfigDict, the user's face) resolved ONCE into frozen, typed pieces.

Each run-level section is a dataclass here whose fields are the section's keys, each with its default, one-line doc
and range rule (`checks.option`); the `model` section is a preset plus overrides (fmjax.model.ModelConfig), the
`objective` section the loss head's options (fmjax/objectives), a parameterisation's section its own dataclass
(fmjax/adapters). `config_lib.base()` is built from these declarations and `resolve(config)` checks every value once
and returns a `Spec`; everything below the entry points takes the pieces it uses, and nothing writes back to the
config. `Spec.record` is what WORKDIR/config.json holds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from fmjax import adapters, checks, objectives, quant, sharding
from fmjax.checks import non_negative, one_of, option, positive
from fmjax.data import chat, formats, pipeline, sp_tokenizer
from fmjax.errors import UserError
from fmjax.model import config as model_config
from fmjax.model import splash

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "wsd", "constant")
_MIN_VOCAB = 256 + 4 + len(sp_tokenizer.CHAT_MARKERS)  # byte fallback, PAD/UNK/BOS/EOS, the chat markers


def _template_ok(v: str) -> bool:
  try:
    chat.ChatTemplate(v)
    return True
  except UserError:
    return False


@dataclasses.dataclass(frozen=True)
class Data:
  source: str = option("embedded:prose", "embedded:NAME | tfds:NAME[/CONFIG][:SPLIT] | prepared:DIR | a file glob")
  format: str = option("auto", "auto (by the first record's keys) | text | prompt_completion | chat | preference | "
                       "unpaired", one_of(formats.FORMATS))
  field: str = option("text", "the text field of `text` records (.jsonl / .parquet / tfds / .array_record)")
  mixture: dict = option({}, "name -> {source, weight[, format, field]}; replaces data.source")
  holdout: float = option(0.1, "fraction of records held out for eval (embedded corpora: their fixed 10% split)",
                          checks.in_range(0, 1, "[)", "the fraction of records held out for eval"))
  tfds_data_dir: str = option("", "where tfds datasets are prepared; empty = tfds's default")
  workers: int = option(0, "tokenizing processes per source; 0 = in the training process",
                        non_negative("0 = in the training process"))
  text_packing: str = option("documents", "how `text` documents fill rows: documents (each its own segment; "
                             "attention stays inside it) | stream (joined into one stream, every row one segment: "
                             "long-context training)", one_of(pipeline.TEXT_PACKING))
  packing_bins: int = option(16, "first-fit bins open at once when packing whole examples (non-text formats)",
                             positive())
  overlong: str = option("error", "an example longer than train.seq_len (non-text formats): error | truncate | drop",
                         one_of(formats.OVERLONG))
  chat_template: str = option("fmjax", "messages → text: fmjax | chatml | llama3 | plain, or a "
                              "'{role}…{content}…' string", checks.Rule(
                                  _template_ok, f"a preset {tuple(chat.PRESETS)} or a template with '{{role}}' "
                                  "before one '{content}'"))
  tokenizer: str = option("sentencepiece", "sentencepiece | hf (a tokenizer.json) | bytes (UTF-8 bytes, 259 ids)",
                          one_of(("sentencepiece", "hf", "bytes")))
  tokenizer_path: str = option("", "a sentencepiece .model or tokenizer.json; empty = train one on the training "
                               "sources and cache it")
  tokenizer_source: str = option("", "what an auto-trained tokenizer learns from; empty = the training sources")
  tokenizer_train_chars: int = option(50_000_000, "at most this much text per source trains the tokenizer",
                                      positive("characters per source that train the tokenizer"))
  vocab_size: int = option(8192, "pieces of an auto-trained sentencepiece model", checks.Rule(
      lambda v: v > _MIN_VOCAB, f"> {_MIN_VOCAB} (256 byte pieces, PAD/UNK/BOS/EOS and the chat markers, plus the "
      "learned pieces)"))
  seed: int = option(0, "shuffle order")
  shards: int = option(0, "record streams split among the processes; 0 = one each; fixed: same batches on any host "
                       "count", non_negative("0 = one per process"))


@dataclasses.dataclass(frozen=True)
class Optimizer:
  name: str = option("adamw", "adamw | sgd", one_of(OPTIMIZERS))
  lr: float = option(3e-4, "peak learning rate", positive("the peak learning rate"))
  schedule: str = option("cosine", "cosine | wsd | constant, after a linear warmup", one_of(SCHEDULES))
  warmup_steps: int = option(100, "steps of linear warmup", non_negative("steps of linear warmup"))
  min_lr_ratio: float = option(0.1, "final lr = lr * min_lr_ratio",
                               checks.in_range(0, 1, "[]", "final lr = lr * min_lr_ratio"))
  decay_fraction: float = option(0.2, "wsd: fraction of post-warmup steps spent decaying",
                                 checks.in_range(0, 1, "(]", "wsd: fraction of post-warmup steps decaying"))
  decay_shape: str = option("sqrt", "wsd: linear | sqrt (1 - sqrt)", one_of(("linear", "sqrt")))
  b1: float = option(0.9, "Adam's first-moment decay", checks.in_range(0, 1, "[)", "Adam's first-moment decay"))
  b2: float = option(0.95, "Adam's second-moment decay", checks.in_range(0, 1, "[)", "Adam's second-moment decay"))
  eps: float = option(1e-8, "Adam's epsilon", positive("Adam's epsilon"))
  weight_decay: float = option(0.1, "decoupled weight decay", non_negative())
  no_decay_regex: str = option(r"(norm|bias)", "parameter paths without weight decay", checks.REGEX)
  clip_norm: float = option(1.0, "global-norm clipping; 0 = off", non_negative("0 = no clipping"))


@dataclasses.dataclass(frozen=True)
class Train:
  steps: int = option(2000, "total optimizer steps", positive("total optimizer steps"))
  batch_size: int = option(8, "global batch (sequences per step, over all devices and micro-batches)",
                           positive("sequences per step"))
  seq_len: int = option(256, "tokens per sequence", positive("tokens per sequence"))
  grad_accum: int = option(1, "micro-batches per step", positive("micro-batches per step"))
  seed: int = option(0, "parameter init and step rng")
  stop_after: int = option(0, "checkpoint and stop after this many steps of this invocation (job time slots); 0 = "
                           "off", non_negative("0 = off"))
  skip_nonfinite: bool = option(False, "True: skip a step whose loss/grad is NaN/inf; False: stop with an error")
  spike_factor: float = option(2.0, "divergence guard: a loss > median + factor·max(median, 1) skips its update; "
                               "0 = off", non_negative("0 = the divergence guard is off"))
  spike_window: int = option(100, "the guard's median is over this many recent accepted losses",
                             positive("recent losses the guard's median is over"))
  spike_skips: int = option(3, "consecutive skipped updates (spikes, or non-finite steps under skip_nonfinite) "
                            "before the run stops with a message; 0 = stop at the first",
                            non_negative("consecutive skipped updates before the run stops"))


_MESH_SIZE = checks.Rule(lambda v: v == -1 or v >= 1, "-1 (fill) or >= 1")


@dataclasses.dataclass(frozen=True)
class Mesh:
  data: int = option(1, "within-slice data parallelism; -1 = fill", _MESH_SIZE)
  fsdp: int = option(-1, "within-slice FSDP; -1 = fill", _MESH_SIZE)
  context: int = option(1, "within-slice context parallelism: each sequence split over this many devices "
                       "(long context; docs/tpu-pods.md); -1 = fill", _MESH_SIZE)
  tensor: int = option(1, "within-slice tensor parallelism; -1 = fill", _MESH_SIZE)
  expert: int = option(1, "within-slice expert parallelism (the experts of MoE layers); -1 = fill", _MESH_SIZE)
  dcn_data: int = option(-1, "across-slice data parallelism; -1 = fill", _MESH_SIZE)
  dcn_fsdp: int = option(1, "across-slice FSDP", _MESH_SIZE)
  dcn_context: int = option(1, "across-slice context parallelism", _MESH_SIZE)
  dcn_tensor: int = option(1, "across-slice tensor parallelism", _MESH_SIZE)
  dcn_expert: int = option(1, "across-slice expert parallelism", _MESH_SIZE)
  rules: tuple = option(sharding.DEFAULT_RULES, "logical axis -> mesh axes; first match wins")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  every_steps: int = option(500, "save period in steps (and always at the last step); 0 = only at the end",
                            non_negative("0 = only at the end"))
  every_minutes: float = option(0.0, "also save when this long has passed since the last save; 0 = off",
                                non_negative("0 = off"))
  keep: int = option(3, "newest checkpoints kept", checks.Rule(lambda v: v >= 1, ">= 1 (newest checkpoints kept)"))
  keep_every: int = option(0, "also keep every step that is a multiple of this, forever; 0 = none",
                           non_negative("0 = none"))
  async_save: bool = option(True, "write in the background while training goes on")


@dataclasses.dataclass(frozen=True)
class InitFrom:
  workdir: str = option("", "start from the params (not the optimizer) of another run's checkpoint")
  step: int = option(-1, "that run's step; -1 = its newest checkpoint", checks.STEP)
  bootstrap: str = option("", "with workdir empty: pre-train this config into WORKDIR/base first, start from it")


@dataclasses.dataclass(frozen=True)
class Eval:
  every_steps: int = option(200, "held-out loss period in steps (and at the last step); 0 = never",
                            non_negative("0 = never"))
  batches: int = option(4, "fixed held-out batches of train.batch_size × train.seq_len, per eval source", positive())
  at_start: bool = option(False, "also evaluate the starting params (step 0), e.g. the base of a fine-tuning run")
  sources: dict = option({}, "name -> source spec (read whole); empty = held-out training data")
  position_buckets: int = option(0, "also log the held-out NLL in this many equal buckets of token position "
                                 "(eval_loss_pos/<lo>-<hi>); 0 = off", non_negative("0 = off"))


@dataclasses.dataclass(frozen=True)
class Log:
  every_steps: int = option(10, "metrics.jsonl / TensorBoard / console period", positive())
  peak_flops: float = option(0.0, "peak FLOP/s per device (on CPU: of the host) for MFU; 0 = device table / CPU "
                             "probe", non_negative("0 = the device table / CPU probe"))
  batch_digests: bool = option(False, "debug: each process records a hash of every batch row it holds, per step")


@dataclasses.dataclass(frozen=True)
class Quant:
  base: str = option("none", "the frozen base under a parameterisation stored as none | nf4 (QLoRA's 4-bit "
                     "NormalFloat) | int8 (per output channel); dequantized blockwise in each projection",
                     one_of(quant.SCHEMES))
  frozen: str = option("none", "every frozen model the head declares (reference, teacher, reward model) stored as "
                       "none | nf4 | int8", one_of(quant.SCHEMES))
  blocksize: int = option(64, "NF4 block: inputs of one output channel sharing an absmax scale",
                          one_of((16, 32, 64, 128, 256, 512, 1024, 2048, 4096)))
  double: bool = option(False, "NF4 double quantisation: the block scales as 8 bits in blocks of 256 (QLoRA)")
  embeddings: bool = option(True, "also quantize the embedding and unembedding tables (bitsandbytes keeps them in "
                            "16 bits: False)")

  def scheme(self, kind: str) -> "quant.Scheme":
    return quant.Scheme(kind, self.blocksize, self.double, self.embeddings)


SECTIONS: dict[str, type] = {"data": Data, "optimizer": Optimizer, "train": Train, "mesh": Mesh,
                             "checkpoint": Checkpoint, "init_from": InitFrom, "eval": Eval, "log": Log, "quant": Quant}


@dataclasses.dataclass(frozen=True)
class FrozenRun:
  """A frozen model the head reads from another run: its role, the objective key naming its run directory, that
  directory (after a bootstrap: WORKDIR/<key>), its step and the config its bootstrap pre-trains."""
  role: str
  key: str
  workdir: str
  step: int
  bootstrap: str


@dataclasses.dataclass(frozen=True)
class Spec:
  """A run, resolved."""
  model: model_config.ModelConfig
  head_name: str
  options: objectives.Options
  head: objectives.Head
  adapter: adapters.Adapter | None
  frozen_runs: tuple[FrozenRun, ...]
  data: Data
  optimizer: Optimizer
  train: Train
  mesh: Mesh
  checkpoint: Checkpoint
  init_from: InitFrom
  eval: Eval
  log: Log
  quant: Quant
  record: Mapping[str, Any]  # every section's values, the model filled in from its preset: config.json

  def with_frozen(self, role: str, workdir: str | None = None, step: int | None = None) -> "Spec":
    """The spec with frozen run `role` read from `workdir` (where its bootstrap trained it) and/or at `step`."""
    run = next(r for r in self.frozen_runs if r.role == role)
    changes = {k: v for k, v in (("workdir", workdir), ("step", step)) if v is not None}
    runs = tuple(dataclasses.replace(r, **changes) if r.role == role else r for r in self.frozen_runs)
    objective = dict(self.record["objective"])
    if workdir is not None:
      objective[run.key] = workdir
    if step is not None and f"{run.key}_step" in objective:
      objective[f"{run.key}_step"] = step
    return dataclasses.replace(self, frozen_runs=runs, record={**self.record, "objective": objective})


def section_defaults(cls: type) -> dict[str, Any]:
  return {k: default for k, (default, _) in checks.docs(cls).items()}


def _section(name: str, cls: type, values: Mapping[str, Any]) -> Any:
  known = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise UserError(f"{name}.{unknown[0]} is not a key of the {name} section (its keys: {', '.join(sorted(known))}).")
  for key, value in values.items():
    rule = known[key].metadata.get("rule")
    if rule is not None:
      rule.check(f"{name}.{key}", value)
  return cls(**values)


def _check_finite(values: Mapping[str, Any], prefix: str = "") -> None:
  """No number in the config may be inf or nan (`lr=inf` would train to NaN params)."""
  for key, value in values.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      _check_finite(value, f"{name}.")
    elif isinstance(value, float) and not math.isfinite(value):
      section, _, field = name.partition(".")
      default = section_defaults(SECTIONS[section]).get(field) if section in SECTIONS else None
      raise UserError(f"{name}={value} must be a finite number" + (f" (its default: {default})." if default is not None
                                                                  else "."))


def _plain(value: Any) -> Any:
  return value.to_dict() if hasattr(value, "to_dict") else value


def _check_blocks(q: Quant, model: model_config.ModelConfig) -> None:
  """NF4 blocks must tile each quantized kernel's inputs (a frozen model of another shape is checked when planned)."""
  key = "quant.base" if q.base == "nf4" else "quant.frozen" if q.frozen == "nf4" else ""
  inputs = {"model.d_model": model.d_model, "model.num_heads·head_dim": model.num_heads * model.head_dim}
  if not model.num_experts:
    inputs["model.mlp_dim"] = model.mlp_dim
  for name, n in inputs.items():
    if key and n % q.blocksize:
      raise UserError(f"quant.blocksize={q.blocksize} does not divide {name}={n}, whose inputs {key}=nf4 stores in "
                      "blocks; choose a blocksize that divides it (e.g. 32 or 16), or use int8.")


def resolve(config: Any) -> Spec:
  """Checks every value of `config` (a ConfigDict: its key, its value and what it must be, in one line) and
  returns the run's spec. Reads no file: tools/aot_compile.py resolves configs of runs on other machines; the files
  and directories a run reads are train/checks.py's."""
  _check_finite({k: _plain(v) for k, v in config.items()})
  sections = {name: _section(name, cls, {k: _plain(v) for k, v in config[name].items()})
              for name, cls in SECTIONS.items()}
  train, opt = sections["train"], sections["optimizer"]
  if train.batch_size % train.grad_accum:
    raise UserError(f"train.batch_size={train.batch_size} must be divisible by train.grad_accum={train.grad_accum}; "
                    "change one of them.")
  if opt.warmup_steps >= train.steps > 1:
    raise UserError(f"optimizer.warmup_steps={opt.warmup_steps} must be smaller than train.steps={train.steps}; lower "
                    "it or train longer.")
  buckets = sections["eval"].position_buckets
  if buckets > train.seq_len:
    raise UserError(f"eval.position_buckets={buckets} must be at most train.seq_len={train.seq_len} (each bucket "
                    "holds at least one position); lower it.")
  model = model_config.resolve(config.model.name, {k: v for k, v in config.model.items() if k != "name"})
  if model.attention_impl == "splash":
    splash.block_size(train.seq_len)
  for section, cls in adapters.registered().items():  # each parameterisation's values, on or off
    for key, ok, what in cls.rules:
      if section in config and key in config[section]:
        checks.Rule(ok, what).check(f"{section}.{key}", config[section][key])
  adapter = adapters.get(config)  # the one switched on, with its own checks
  if sections["quant"].base != "none" and adapter is None:
    raise UserError(f"quant.base={sections['quant'].base!r} stores the frozen base under a parameterisation, and this "
                    "run trains every weight; switch one on (docs/fine-tuning.md), or set quant.base=none "
                    "(quant.frozen quantizes the frozen models a head reads).")
  _check_blocks(sections["quant"], model)
  options = objectives.resolve(config.objective)  # the head's options: fmjax/objectives/<head>.py's checks
  name = config.objective.name
  head = objectives.head_type(name).make(options)
  head.check_model(name, model.num_labels)
  frozen_runs = []
  for f in head.frozen:
    if f.source != "run":
      continue
    if not hasattr(options, f.config_key):
      raise UserError(f"the head {name!r} reads its frozen {f.role!r} from objective.{f.config_key}, which its "
                      f"options lack; add a field {f.config_key!r} (a run directory) to its options.")
    frozen_runs.append(FrozenRun(f.role, f.config_key, getattr(options, f.config_key),
                                 getattr(options, f"{f.config_key}_step", -1),
                                 getattr(options, f"{f.config_key}_bootstrap", "")))
  record = {k: _plain(v) for k, v in config.items()}
  record["model"] = {"name": config.model.name, **dataclasses.asdict(model)}
  return Spec(model, name, options, head, adapter, tuple(frozen_runs), record=record, **sections)


def replace(spec: Spec, **changes: Any) -> Spec:
  """`spec` with changes given as 'section.key': value (model, train, ...; not the head's options), its record
  changed alike."""
  out = spec
  for key, value in changes.items():
    section, name = key.split(".")
    record = {**out.record, section: {**out.record[section], name: value}}
    out = dataclasses.replace(out, record=record,
                              **{section: dataclasses.replace(getattr(out, section), **{name: value})})
  return out
