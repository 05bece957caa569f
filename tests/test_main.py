"""End to end: `python -m fmjax.main --config=configs/pretrain.py:smoke` as a user runs it."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from fmjax import config_lib, objectives
from fmjax.train import loop

REQUIRED = {"step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"}


@pytest.mark.slow
def test_smoke_pretraining_run(repo, tmp_path, cpu_env):
  workdir = tmp_path / "smoke"
  proc = subprocess.run([sys.executable, "-m", "fmjax.main", "--config=configs/pretrain.py:smoke",
                         f"--workdir={workdir}", "--config.train.steps=30"], cwd=repo, capture_output=True,
                        text=True, timeout=300, env=cpu_env(2))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 31))  # smoke logs every step; the CLI override took effect
  assert all(REQUIRED <= set(r) for r in rows)
  assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]
  assert all(r["mfu"] <= 1.0 for r in rows)  # a timing window that misses device work would break this
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [10, 20, 30]
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  assert abs(evals[-1]["eval_perplexity"] - math.exp(evals[-1]["eval_nll"])) < 1e-3 * evals[-1]["eval_perplexity"]
  assert json.load(open(workdir / "config.json"))["model"]["d_model"] == 64
  assert os.listdir(workdir / "tensorboard")
  assert "tok/s" in proc.stderr and "ETA" in proc.stderr


def test_unknown_cli_key_fails_before_training(repo, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "fmjax.main", "--config=configs/pretrain.py:smoke",
                         f"--workdir={tmp_path}", "--config.train.stepz=3"], cwd=repo, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0 and "stepz" in proc.stderr


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run_naming_the_step(repo, tmp_path, monkeypatch):
  def make_nan(o):
    base = objectives.lm.make(o)
    return dataclasses.replace(base, loss=lambda p, b, ctx: (lambda s, w, m: (s * float("nan"), w, m))(
        *base.loss(p, b, ctx)))

  monkeypatch.setitem(objectives.REGISTRY, "nan_for_test", objectives.HeadType(objectives.lm.Options, make_nan))
  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  c.objective.name, c.train.steps, c.train.seq_len, c.optimizer.warmup_steps = "nan_for_test", 3, 32, 0
  with pytest.raises(loop.NonFiniteLossError, match="step 1: loss=nan"):
    loop.train(c, str(tmp_path))
