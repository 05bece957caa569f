"""Continuous pre-training: the standalone smoke run, both domains evaluated, loss curves drawn."""

import json
import subprocess
import sys

import pytest

from fmjax import config_lib


def rows(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


@pytest.mark.slow
def test_cpt_smoke_runs_standalone_and_evaluates_both_domains(repo, tmp_path, cpu_env):
  proc = subprocess.run([sys.executable, "-m", "fmjax.main", "--config=configs/cpt.py:smoke", f"--workdir={tmp_path}"],
                        cwd=repo, capture_output=True, text=True, timeout=300, env=cpu_env(1))
  assert proc.returncode == 0, "\n".join(l for l in proc.stderr.splitlines() if l[:1] in "EF" or "rror" in l)[-6000:]
  base, cpt = rows(tmp_path / "base"), rows(tmp_path)
  assert cpt[1]["loss"] < base[0]["loss"] - 0.5  # it starts from the pre-trained base, not from scratch
  evals = [r for r in cpt if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 10, 20, 30]  # 0: the base, before continuing
  base_eval = [r for r in base if "eval_loss" in r][-1]["eval_loss"]  # the same held-out prose batches
  assert abs(evals[0]["eval_loss/prose"] - base_eval) < 1e-4
  assert all({"eval_loss/code", "eval_loss/prose", "eval_perplexity/code"} <= set(r) for r in evals)
  assert evals[-1]["eval_loss/code"] < evals[0]["eval_loss/code"]
  out = tmp_path / "curves.png"
  plot = subprocess.run([sys.executable, "tools/plot.py", str(tmp_path / "base"), str(tmp_path), f"--output={out}"],
                        cwd=repo, capture_output=True, text=True)
  assert plot.returncode == 0, plot.stderr
  assert "loss, eval_loss, eval_loss/code, eval_loss/prose for 2 run(s)" in plot.stdout
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpt_config_mixes_code_with_prose_replay(repo):
  c = config_lib.load(f"{repo}/configs/cpt.py:init_from=/tmp/base,replay=0.3,steps=200")
  assert c.data.mixture.code.weight == "0.7" and c.data.mixture.prose.weight == "0.3"
  assert c.init_from.workdir == "/tmp/base" and c.data.tokenizer_source == "embedded:prose"
  assert c.optimizer.warmup_steps == 10 and c.eval.every_steps == 20
  with pytest.raises(ValueError, match="replay=1.5 must be in"):
    config_lib.load(f"{repo}/configs/cpt.py:replay=1.5")
