"""`init_from`: start a run from another run's parameters (not its optimizer, step or data position).

This is how continuous pre-training, fine-tuning, parameter-efficient runs, preference training and distillation
begin. Only the `params` subtree of the saved state is read, directly into this run's shardings (any mesh); shapes
and dtypes must match this run's model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fmjax import adapters, data
from fmjax.adapters.base import PARTS
from fmjax.train import checkpoint, integrity
from fmjax.train import state as train_state
from fmjax.errors import UserError


BOOTSTRAPPED = "base"  # WORKDIR/base: where `init_from.bootstrap` pre-trains the run's starting point


def check_tokenizer(workdir: str, ours: dict, key: str = "init_from.workdir") -> None:
  """The run we start from (or learn from: `key`) must have used this run's tokenizer (same ids for the same
  text)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return  # not an fmjax run directory (e.g. an import); shapes are still checked
  with open(path) as f:
    theirs = json.load(f).get("tokenizer")
  if theirs and theirs["id"] != ours["id"]:
    raise UserError(f"{key}={workdir!r} was trained with tokenizer {theirs['id']} but this run uses "
                    f"{ours['id']}; set --config.data.tokenizer_path={data.run_tokenizer_file(workdir) or 'PATH'} "
                    "(its copy of that tokenizer).")


def step_keys(key: str) -> tuple[str, str]:
  """(the setting naming a run, the one naming its step) for `key`: init_from, an objective key, or a flag."""
  if key == "init_from":
    return "init_from.workdir", "init_from.step"
  return key, "--step" if key.startswith("--") else f"{key}_step"


def checkpoint_dir(workdir: str, step: int = -1, key: str = "init_from") -> str:
  """`workdir/checkpoints/<step>` (`step` -1 = the newest committed one); errors name what exists. `key` is the
  setting that named the run: `init_from` (init_from.workdir / init_from.step), `objective.teacher` (and
  objective.teacher_step) or a tool's flag such as `--model` (and --step)."""
  dir_key, step_key = step_keys(key)
  root = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise FileNotFoundError(f"{dir_key}={workdir!r} has no checkpoints in {root}; train it first or point "
                            f"{dir_key} at a run directory that holds checkpoints.")
  if step == -1:
    step = steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"{step_key}={step} is not in {root}; it has steps {steps}: pick one of them, or -1 "
                            "for the newest.")
  return os.path.join(root, str(step))


def read(workdir: str, step: int, target: Any, key: str = "init_from", new_head: bool = False) -> Any:
  """The params of `workdir`'s checkpoint at `step`, restored straight into `target` (abstract arrays with
  shardings, float parameters cast to the target's dtype); another tree or shape, or a run under a
  parameterisation (its checkpoints hold only its trained tree), is an error naming the parameter and the fix. With
  `new_head` (a score model started from a language model), the run's LM head is not read and the target's task
  head, which it lacks, is left out of the result for the caller's fresh one."""
  path = state_dir(workdir, step, key)
  checkpointer = ocp.PyTreeCheckpointer()
  with reading(path, key):
    saved = checkpointer.metadata(path).item_metadata.tree["params"]
  owners = {adapters.owner(tuple(str(getattr(k, "key", k)) for k in p))
            for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]} - {None}
  if owners:
    cls = owners.pop()
    fix = (f"merge it into full weights first: {cls.merge_command.format(workdir=workdir)}, then use DIR"
           if cls.merge_command else f"start from the run {workdir} was trained over instead")
    raise UserError(f"{key}.workdir={workdir!r} is a {cls.title} run (its checkpoints hold its trained tree only); "
                    f"{fix}.")
  ours = jax.tree_util.tree_flatten_with_path(target)[0]
  theirs = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
  if new_head:
    top = lambda p: str(getattr(p[0], "key", p[0]))  # noqa: E731
    mine = {top(p) for p, _ in ours}
    ours = [(p, x) for p, x in ours if not (top(p) in adapters.TASK_HEADS and p not in theirs)]
    theirs = {p: x for p, x in theirs.items() if not (top(p) == "unembed" and "unembed" not in mine)}
    target = {k: v for k, v in target.items() if k in {top(p) for p, _ in ours}}
  missing = [jax.tree_util.keystr(p) for p, _ in ours if p not in theirs]
  if missing or len(theirs) != len(ours):
    extra = sorted(set(jax.tree_util.keystr(p) for p in theirs) - {jax.tree_util.keystr(p) for p, _ in ours})
    raise UserError(f"{key} {path}: the parameter trees differ (only here: {missing[:5]}, only there: "
                    f"{extra[:5]}); {key} needs the same model architecture (model.* settings).")
  for p, x in ours:  # a float dtype may change (a float32 run read into a bfloat16 model): the restore casts
    floats = jnp.issubdtype(theirs[p].dtype, jnp.floating) and jnp.issubdtype(x.dtype, jnp.floating)
    if tuple(theirs[p].shape) != tuple(x.shape) or (theirs[p].dtype != x.dtype and not floats):
      raise UserError(f"{key} {path}: parameter {jax.tree_util.keystr(p)} is {tuple(theirs[p].shape)} "
                      f"{theirs[p].dtype} there but {tuple(x.shape)} {x.dtype} in this model; use the same "
                      "model.* settings (and tokenizer / model.vocab_size) as the run you start from.")
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with reading(path, key):
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
  return restored["params"]


def _other_step(path: str, key: str) -> str:
  step_key = step_keys(key)[1]
  workdir = os.path.dirname(os.path.dirname(os.path.dirname(path)))
  return f"pick another step with {step_key}=N, or resume training {workdir} to write a new one"


def state_dir(workdir: str, step: int = -1, key: str = "init_from") -> str:
  """The `state/` directory of `workdir`'s checkpoint `step` (-1 = newest), its files verified against their
  checksums (fmjax/train/integrity.py); a missing or damaged one is an error naming it and the way out."""
  step_dir = checkpoint_dir(workdir, step, key)
  path = os.path.join(step_dir, "state")
  if not os.path.isdir(path):
    raise UserError(f"{key}: {step_dir} has no state/ (not a complete fmjax checkpoint); {_other_step(path, key)}.")
  problem = integrity.verify(step_dir)
  if problem is not None:
    raise UserError(f"{key}: checkpoint {step_dir} is damaged ({problem}); {_other_step(path, key)}.")
  return path


@contextlib.contextmanager
def reading(path: str, key: str = "init_from"):
  """Reads of the checkpoint `state/` at `path`: a failure (a checkpoint cut short that has no checksums) is one
  line naming it; orbax's notice that `state/` has no step metadata file (it never has) is dropped."""
  checkpoint.quiet_orbax()
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - say which checkpoint, not orbax's internals
    raise UserError(f"{key}: checkpoint {os.path.dirname(path)} cannot be read ({type(e).__name__}: "
                    f"{(str(e).splitlines() or [''])[0][:200]}); {_other_step(path, key)}.") from e


def load(state: Any, shardings: Any, workdir: str, step: int = -1, frozen_only: bool = False,
         copies: tuple[str, ...] = (), base_name: str = "") -> tuple[Any, Any]:
  """(`state` with its model weights — the params, or under a parameterisation the frozen base — replaced by those
  of `workdir`'s checkpoint at `step` (-1 = newest), those weights); `frozen_only` (a resume) keeps the trained
  params. `copies`: the roles of frozen copies the caller makes of them; `base_name`: the parameterisation's title
  (both for the log)."""
  current = train_state.base_params(state)
  target = checkpoint.abstract(current, train_state.base_params(shardings))
  params = read(workdir, step, target, new_head=True)
  fresh = sorted(set(current) - set(params))
  if fresh:  # a task head the run starts (a reward model's score from a language model): its initialisation
    logging.info("%s: %s start fresh (the run is a language model)", workdir, ", ".join(fresh))
    params = {**params, **{k: current[k] for k in fresh}}
  loaded = ([f"the frozen {base_name} base"] if state.base is not None else [] if frozen_only else ["params"]) + \
      [f"the frozen {role} policy" for role in copies]
  logging.info("initialised %s from %s%s", " and ".join(loaded) or "nothing",
               os.path.join(checkpoint_dir(workdir, step), "state"),
               "" if frozen_only else " (optimizer state, step and data position start fresh)")
  return train_state.with_base_params(state, params, frozen_only), params


def start_parts(state: Any, shardings: Any, parts: tuple, source: str, source_step: int, tokenizer: dict) -> Any:
  """`state` with each head part that is a network of its own (`Part.reads == "inputs"`) read from its `init` run,
  else from `source` at `source_step` (the run and step the policy starts from; '' = none: it keeps its
  initialisation). A language model's run leaves the part's score head fresh. For a fresh start only: a resume
  restores the parts with the rest."""
  params = dict(state.params[PARTS])
  for part in parts:
    workdir, step = (part.init, part.init_step) if part.init else (source, source_step)
    if part.reads != "inputs" or not workdir:
      continue
    key = f"objective.{part.init_key}" if part.init else "init_from"
    check_tokenizer(workdir, tokenizer, key=key)
    current = params[part.name]
    target = checkpoint.abstract(current, shardings.params[PARTS][part.name])
    net = next(iter(current))  # the part's one network
    read_net = read(workdir, step, target[net], key=key, new_head=True)
    params[part.name] = {net: {**current[net], **read_net}}
    logging.info("initialised the head's %s from %s", part.name, os.path.join(checkpoint_dir(workdir, step, key),
                                                                                "state"))
  return state.replace(params={**state.params, PARTS: params})
