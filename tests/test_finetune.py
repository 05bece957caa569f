"""End to end: configs/sft.py:smoke standalone, configs/lora.py:smoke from the same base, resume, merge, export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from fmjax import config_lib
from fmjax.train import weights


def rows(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def evals(workdir):
  return {r["step"]: r["eval_loss"] for r in rows(workdir) if "eval_loss" in r}


def run(repo, env, *args, check=True):
  proc = subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=300, env=env)
  if check:
    assert proc.returncode == 0, "\n".join(l for l in proc.stderr.splitlines() if "rror" in l or l[:1] in "EF")[-4000:]
  return proc


@pytest.mark.slow
def test_sft_then_lora_from_one_base_resume_merge_export(repo, tmp_path, cpu_env):
  env = cpu_env(1)
  sft, lora, merged = tmp_path / "sft", tmp_path / "lora", tmp_path / "merged"
  run(repo, env, "-m", "fmjax.main", "--config=configs/sft.py:smoke", f"--workdir={sft}")
  sft_evals = evals(sft)
  assert sorted(sft_evals) == [0, 10, 20, 30] and sft_evals[30] < sft_evals[0] - 0.3
  assert all("accuracy" in r for r in rows(sft) if r["step"] > 0)

  base = sft / "base"  # the pre-trained base the SFT smoke run bootstrapped
  args = ["-m", "fmjax.main", f"--config=configs/lora.py:smoke,init_from={base}", f"--workdir={lora}"]
  run(repo, env, *args, "--config.train.stop_after=20")
  lora_evals = evals(lora)
  assert abs(lora_evals[0] - sft_evals[0]) < 1e-6  # B = 0: step 0 is exactly the base, on the same held-out batches
  adapters, step = weights.read_params(str(lora))
  assert step == 20 and all(p[-1].endswith(("_lora_a", "_lora_b")) for p in traverse_util.flatten_dict(adapters))
  resumed = run(repo, env, *args)  # resumes at 20, reading the frozen base from init_from again
  assert "resuming from step 20" in resumed.stderr and "initialised the frozen LoRA base" in resumed.stderr
  lora_evals = evals(lora)
  assert sorted(lora_evals) == [0, 10, 20, 30] and lora_evals[30] < lora_evals[0] - 0.05

  run(repo, env, "tools/lora.py", "merge", f"--workdir={lora}", f"--output={merged}")
  check = tmp_path / "check"  # start from the merged weights: its step-0 eval is the LoRA run's last one
  run(repo, env, "-m", "fmjax.main", f"--config=configs/sft.py:smoke,init_from={merged}", f"--workdir={check}",
      "--config.train.steps=1")
  assert abs(evals(check)[0] - lora_evals[30]) < 1e-4
  base_after = weights.read_params(str(base))[0]
  merged_params = weights.read_params(str(merged))[0]
  assert np.abs(merged_params["layers"]["attn"]["q_kernel"] - base_after["layers"]["attn"]["q_kernel"]).max() > 0
  np.testing.assert_array_equal(merged_params["final_norm"]["scale"], base_after["final_norm"]["scale"])

  run(repo, env, "tools/lora.py", "export", f"--workdir={lora}", f"--output={tmp_path / 'adapter'}")
  config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
  assert config["r"] == 8 and config["peft_type"] == "LORA" and "q_proj" in config["target_modules"]
  assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0

  refused = run(repo, env, "-m", "fmjax.main", f"--config=configs/sft.py:smoke,init_from={lora}",
                f"--workdir={tmp_path / 'bad'}", check=False)
  assert refused.returncode != 0 and "is a LoRA run" in refused.stderr and "tools/lora.py merge" in refused.stderr


def test_finetune_configs_start_from_the_base_with_its_tokenizer(repo):
  c = config_lib.load(f"{repo}/configs/lora.py:init_from=/runs/pt,rank=16,head=lm,data=embedded:code")
  assert c.init_from.workdir == "/runs/pt" and c.data.tokenizer_path == "/runs/pt/tokenizer.model"
  assert c.lora.rank == 16 and c.objective.name == "lm" and c.data.source == "embedded:code"
  s = config_lib.load(f"{repo}/configs/sft.py")
  assert s.objective.name == "sft" and s.lora.rank == 0 and s.init_from.bootstrap == os.path.join(repo, "configs", "pretrain.py")
  assert s.data.source == "embedded:instruct" and s.eval.at_start
  with pytest.raises(ValueError, match="lora.rank=-1 must be >= 0"):
    c.lora.rank = -1
    config_lib.adapter(c)
