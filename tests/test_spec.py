"""The run spec: the config resolved once into frozen, typed pieces, and the pieces (not the config) passed down."""

from __future__ import annotations

import ast
import dataclasses
import glob
import os

import pytest

from fmjax import config_lib, objectives, spec
from fmjax.errors import UserError
from fmjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLVERS = ("fmjax/config_lib.py", "fmjax/spec.py")  # the config module and the resolver


def functions_taking_config() -> list[str]:
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, "fmjax", "**", "*.py"), recursive=True)):
    if os.path.relpath(path, ROOT) in RESOLVERS:
      continue
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        if any(a.arg == "config" for a in args):
          out.append(f"{os.path.relpath(path, ROOT)}:{node.name}")
  return out


def test_below_the_entry_points_nothing_takes_the_config():
  assert functions_taking_config() == ["fmjax/train/aot.py:analyse", "fmjax/train/loop.py:train"]


def test_every_section_resolves_into_its_frozen_typed_piece(repo):
  s = spec.resolve(config_lib.load(f"{repo}/configs/distill.py:smoke,temperature=2.0"))
  assert isinstance(s.train, spec.Train) and s.train.steps == 30 and s.model.d_model == 32
  assert isinstance(s.options, objectives.REGISTRY["distill"].options) and s.options.temperature == 2.0
  assert [(r.role, r.key, r.workdir) for r in s.frozen_runs] == [("teacher", "teacher", "")]
  assert s.frozen_runs[0].bootstrap.endswith("pretrain.py:smoke")
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.train.steps = 3  # type: ignore[misc]
  moved = s.with_frozen("teacher", workdir="/runs/t")
  assert moved.frozen_runs[0].workdir == "/runs/t" and moved.record["objective"]["teacher"] == "/runs/t"
  assert s.frozen_runs[0].workdir == "" and s.record["objective"]["teacher"] == ""  # the original is unchanged


def test_a_key_no_section_declares_is_refused_in_one_line(repo):
  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  c.train.stepz = 3  # a config file may add keys; the resolver refuses them
  with pytest.raises(UserError, match=r"train.stepz is not a key of the train section \(its keys: .*steps"):
    spec.resolve(c)


def test_a_run_resolves_its_config_once_and_builds_its_head_once(repo, tmp_path, monkeypatch):
  calls = {"resolve": 0, "make": 0}
  real_resolve, real_type = spec.resolve, objectives.head_type

  def counted_resolve(config):
    calls["resolve"] += 1
    return real_resolve(config)

  def counted_type(name):
    head = real_type(name)

    def make(o):
      calls["make"] += 1
      return head.make(o)

    return objectives.HeadType(head.options, make)

  monkeypatch.setattr(spec, "resolve", counted_resolve)
  monkeypatch.setattr(objectives, "head_type", counted_type)
  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  c.train.steps, c.optimizer.warmup_steps, c.train.seq_len, c.eval.every_steps = 2, 0, 32, 1
  c.checkpoint.async_save = False
  loop.train(c, str(tmp_path))
  assert calls == {"resolve": 1, "make": 1}


def test_a_replaced_spec_changes_its_piece_and_its_record_alike(repo):
  s = spec.resolve(config_lib.load(f"{repo}/configs/pretrain.py:smoke"))
  r = spec.replace(s, **{"model.remat": "full", "train.grad_accum": 2})
  assert (r.model.remat, r.train.grad_accum) == ("full", 2) and (s.model.remat, s.train.grad_accum) == ("none", 1)
  assert r.record["model"]["remat"] == "full" and r.record["train"]["grad_accum"] == 2
  assert s.record["model"]["remat"] == "none"
