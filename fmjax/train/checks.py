"""Run-level config checks at start: every value against its range or choices (`validate`, no file read, so the AOT planner
can check a config for another machine), the run directory, and the files and directories a run reads."""

from __future__ import annotations

import os

import ml_collections

from fmjax import adapters, checks, objectives
from fmjax import data as data_lib
from fmjax.config_lib import resolved_model
from fmjax.data import chat, formats, sources, sp_tokenizer
from fmjax.errors import UserError
from fmjax.model import splash
from fmjax.data import prompts
from fmjax.rl import rewards
from fmjax.train import frozen, init_from, optimizer, rollout


def _rules() -> list[tuple[str, checks.Rule]]:
  """(key, rule) of every run-level config value with a range or a set of choices (a head's options and a
  parameterisation's are checked by their own modules)."""
  positive, non_negative, one_of, in_range = checks.positive, checks.non_negative, checks.one_of, checks.in_range
  mesh = checks.Rule(lambda v: v == -1 or v >= 1, "-1 (fill) or >= 1")
  template = checks.Rule(_template_ok, f"a preset {tuple(chat.PRESETS)} or a template with '{{role}}' before one "
                         "'{content}'")
  min_vocab = 256 + 4 + len(sp_tokenizer.CHAT_MARKERS)  # byte fallback, PAD/UNK/BOS/EOS, the chat markers
  return [
      ("train.steps", positive("total optimizer steps")),
      ("train.batch_size", positive("sequences per step")),
      ("train.seq_len", positive("tokens per sequence")),
      ("train.grad_accum", positive("micro-batches per step")),
      ("train.stop_after", non_negative("0 = off")),
      ("train.spike_factor", non_negative("0 = the divergence guard is off")),
      ("train.spike_window", positive("recent losses the guard's median is over")),
      ("train.spike_skips", non_negative("consecutive spikes skipped before the run stops")),
      ("optimizer.name", one_of(optimizer.OPTIMIZERS)),
      ("optimizer.lr", positive("the peak learning rate")),
      ("optimizer.schedule", one_of(optimizer.SCHEDULES)),
      ("optimizer.warmup_steps", non_negative("steps of linear warmup")),
      ("optimizer.min_lr_ratio", in_range(0, 1, "[]", "final lr = lr * min_lr_ratio")),
      ("optimizer.decay_fraction", in_range(0, 1, "(]", "wsd: fraction of post-warmup steps decaying")),
      ("optimizer.decay_shape", one_of(("linear", "sqrt"))),
      ("optimizer.b1", in_range(0, 1, "[)", "Adam's first-moment decay")),
      ("optimizer.b2", in_range(0, 1, "[)", "Adam's second-moment decay")),
      ("optimizer.eps", positive("Adam's epsilon")),
      ("optimizer.weight_decay", non_negative()),
      ("optimizer.no_decay_regex", checks.REGEX),
      ("optimizer.clip_norm", non_negative("0 = no clipping")),
      ("checkpoint.every_steps", non_negative("0 = only at the end")),
      ("checkpoint.every_minutes", non_negative("0 = off")),
      ("checkpoint.keep", checks.Rule(lambda v: v >= 1, ">= 1 (newest checkpoints kept)")),
      ("checkpoint.keep_every", non_negative("0 = none")),
      ("eval.every_steps", non_negative("0 = never")),
      ("eval.batches", positive()),
      ("log.every_steps", positive()),
      ("log.peak_flops", non_negative("0 = the device table / CPU probe")),
      ("data.format", one_of(formats.FORMATS)),
      ("data.holdout", in_range(0, 1, "[)", "the fraction of records held out for eval")),
      ("data.workers", non_negative("0 = in the training process")),
      ("data.packing_bins", positive()),
      ("data.overlong", one_of(formats.OVERLONG)),
      ("data.chat_template", template),
      ("data.tokenizer", one_of(("sentencepiece", "hf", "bytes"))),
      ("data.tokenizer_train_chars", positive("characters per source that train the tokenizer")),
      ("data.vocab_size", checks.Rule(lambda v: v > min_vocab, f"> {min_vocab} (256 byte pieces, PAD/UNK/BOS/EOS "
                                      "and the chat markers, plus the learned pieces)")),
      ("data.shards", non_negative("0 = one per process")),
      ("objective.name", one_of(sorted(objectives.REGISTRY))),
      ("init_from.step", checks.STEP),
      *((f"{name}.{key}", checks.Rule(ok, what)) for name, cls in adapters.registered().items()
        for key, ok, what in cls.rules),
      *((f"mesh.{axis}", mesh) for axis in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor")),
  ]


def _template_ok(v: str) -> bool:
  try:
    chat.ChatTemplate(v)
    return True
  except UserError:
    return False


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at start, naming the key, its value and what it must be, on a value out of its range and on
  combinations that cannot run. Reads no file (tools/aot_compile.py validates configs of runs elsewhere); the files
  and directories a run reads are `check_inputs`'s."""
  for key, rule in _rules():
    section, name = key.split(".")
    if section in config and name in config[section]:
      rule.check(key, config[section][name])
  t, opt = config.train, config.optimizer
  if t.batch_size % t.grad_accum:
    raise UserError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}; change "
                    "one of them.")
  if opt.warmup_steps >= t.steps > 1:
    raise UserError(f"optimizer.warmup_steps={opt.warmup_steps} must be smaller than train.steps={t.steps}; lower it "
                    "or train longer.")
  model = resolved_model(config)  # model.*: fmjax/model/config.py's checks
  if model.attention_impl == "splash":
    splash.block_size(t.seq_len)
  adapters.get(config)  # the parameterisation's own checks
  head = objectives.get(config.objective)  # the head's options: fmjax/objectives/<head>.py's checks
  head.check_model(config.objective.name, model.num_labels)
  if head.rollout is not None:
    rollout.check(config.objective.name, head.rollout, config.eval.every_steps, config.checkpoint.every_steps)
    prompts.prompts_per_step(config.train.batch_size, head.rollout)
    prompts.prompt_width(config.train.seq_len, head.rollout)
    rewards.functions(head.rollout.rewards)  # every reward function named can be loaded


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
  bootstraps = [("init_from.bootstrap", config.init_from.bootstrap)]
  runs = [("init_from.workdir", config.init_from.workdir, config.init_from.step, "init_from", None)]
  for spec in objectives.get(config.objective).frozen:
    if spec.source == "run":
      workdir, step, bootstrap = frozen.run_keys(config, spec)
      key = f"objective.{spec.config_key}"
      bootstraps.append((f"{key}_bootstrap", bootstrap))
      runs.append((key, workdir, step, key, spec))
  for key, spec in bootstraps:
    if spec and not os.path.isfile(spec.partition(":")[0]):
      raise UserError(f"{key}={spec!r}: the config file does not exist; name one such as "
                      "configs/pretrain.py[:variant], or leave it empty.")
  for key, workdir, step, prefix, spec in runs:
    if not workdir:
      continue
    bootstrap = "init_from.bootstrap" if prefix == "init_from" else f"{key}_bootstrap"
    if not os.path.isdir(workdir):
      raise UserError(f"{key}={workdir!r} does not exist; point it at a trained run directory (the --workdir of a "
                      f"finished run, or `tools/convert_hf.py import`'s), or leave it empty and set {bootstrap}=CONFIG "
                      "to pre-train one first.")
    if spec is not None:
      frozen.architecture(config, spec)  # a run directory with a config.json, of this run's vocabulary
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
