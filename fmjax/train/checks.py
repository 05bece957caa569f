"""Run-level checks at start, over the resolved spec (the config's values are checked by fmjax/spec.py): the run
directory, the files and directories a run reads, the frozen runs' architectures, and whether the head's rollout can
run."""

from __future__ import annotations

import os

import jax

from fmjax import data as data_lib
from fmjax import sharding
from fmjax.data import prompts, sources
from fmjax.errors import UserError
from fmjax.model import context
from fmjax.rl import rewards
from fmjax.spec import Spec
from fmjax.train import frozen, init_from, rollout


def check_spec(spec: Spec) -> None:
  """What the resolved spec cannot run that no single value shows (reads no file: the AOT planner checks configs of
  runs elsewhere): the head's rollout against the batch, the row length and the checkpoint period."""
  r = spec.head.rollout
  if r is None:
    return
  rollout.check(spec.head_name, r, spec.eval.every_steps, spec.checkpoint.every_steps)
  prompts.prompts_per_step(spec.train.batch_size, r)
  prompts.prompt_width(spec.train.seq_len, r)
  rewards.functions(r.rewards)  # every reward function named can be loaded


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
  for directory in (existing, os.path.join(existing, "checkpoints")):
    if os.path.isdir(directory):
      _check_writable(path, directory)


def _check_writable(workdir: str, directory: str) -> None:
  """Permission bits (which do not stop root), and a read-only mount (which does)."""
  problem = ""
  if os.statvfs(directory).f_flag & os.ST_RDONLY:
    problem = "Read-only file system"
  elif not os.access(directory, os.W_OK | os.X_OK):
    problem = "permission denied"
  if problem:
    raise UserError(f"--workdir={workdir!r}: {directory!r} is not writable ({problem}); make it writable or pass "
                    "another --workdir (a checkpoint could not be saved).")


def check_inputs(spec: Spec) -> None:
  """Fails at start, naming the key and the fix, when a file or directory the run reads is missing or of the wrong
  kind: init_from.workdir (and its checkpoint), the run directories of the head's frozen models (e.g.
  objective.teacher), the bootstrap configs, data.tokenizer_path and the file globs of data.source, data.mixture,
  data.tokenizer_source and eval.sources."""
  bootstraps = [("init_from.bootstrap", spec.init_from.bootstrap)]
  runs = [("init_from.workdir", spec.init_from.workdir, spec.init_from.step, "init_from", None)]
  for run in spec.frozen_runs:
    key = f"objective.{run.key}"
    bootstraps.append((f"{key}_bootstrap", run.bootstrap))
    runs.append((key, run.workdir, run.step, key, run))
  for key, config_file in bootstraps:
    if config_file and not os.path.isfile(config_file.partition(":")[0]):
      raise UserError(f"{key}={config_file!r}: the config file does not exist; name one such as "
                      "configs/pretrain.py[:variant], or leave it empty.")
  for key, workdir, step, prefix, run in runs:
    if not workdir:
      continue
    bootstrap = "init_from.bootstrap" if prefix == "init_from" else f"{key}_bootstrap"
    if not os.path.isdir(workdir):
      raise UserError(f"{key}={workdir!r} does not exist; point it at a trained run directory (the --workdir of a "
                      f"finished run, or `tools/convert_hf.py import`'s), or leave it empty and set {bootstrap}=CONFIG "
                      "to pre-train one first.")
    if run is not None:
      frozen.architecture(run, spec.head_name, spec.model.vocab_size)  # a run directory of this run's vocabulary
    try:
      init_from.checkpoint_dir(workdir, step, prefix)
    except FileNotFoundError as e:
      raise UserError(str(e)) from None
  d = spec.data
  if d.tokenizer_path and d.tokenizer != "bytes":
    data_lib.tokenizer_from_file(d.tokenizer_path, key="data.tokenizer_path")
  named = [s.source for s in data_lib.train_specs(d)] + [d.tokenizer_source] + list(spec.eval.sources.values())
  for source in filter(None, named):
    if source.partition(":")[0] not in ("embedded", "tfds", "prepared"):
      sources.expand(source)  # a glob that matches no files, or files of several kinds, is an error naming it
    elif source.startswith("prepared:") and not os.path.isdir(source.partition(":")[2]):
      raise UserError(f"data source {source!r}: directory {source.partition(':')[2]!r} does not exist; write it "
                      "with tools/prepare_data.py --output=DIR first.")


def check_run(spec: Spec, workdir: str) -> None:
  """Everything `fmjax.main` checks before training besides the config's values: the spec's feasibility, the run
  directory and the inputs."""
  check_spec(spec)
  check_workdir(workdir)
  check_inputs(spec)


def check_mesh(spec: Spec, mesh: jax.sharding.Mesh) -> None:
  """The micro-batch must split evenly over the data × fsdp × expert devices, and each sequence over the context
  devices (in twice as many chunks when load-balanced)."""
  train, batch_shards = spec.train, sharding.batch_shards(mesh)
  micro = train.batch_size // train.grad_accum
  if micro % batch_shards:
    raise UserError(f"the micro-batch train.batch_size/train.grad_accum = {micro} must be divisible by the "
                    f"data×fsdp×expert mesh size {batch_shards}; change train.batch_size, train.grad_accum or mesh.*.")
  context.check_length(train.seq_len, mesh.shape["context"], spec.model.context_load_balance)
