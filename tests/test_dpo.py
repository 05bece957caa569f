"""End to end: configs/dpo.py:smoke standalone starts at ln 2; LoRA DPO's reference is the base; resume keeps the
trained policy and reads the reference again."""

import json
import math
import subprocess
import sys

import pytest

from fmjax import config_lib
from fmjax.data import instruct

METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
           "logps/rejected", "logps/accuracy"}


def rows(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def run(repo, env, *args):
  proc = subprocess.run([sys.executable, "-m", "fmjax.main", *args], cwd=repo, capture_output=True, text=True,
                        timeout=300, env=env)
  assert proc.returncode == 0, "\n".join(l for l in proc.stderr.splitlines() if "rror" in l or l[:1] in "EF")[-4000:]
  return proc


@pytest.mark.slow
def test_dpo_smoke_full_and_lora_start_at_ln2_and_resume_keeps_the_policy(repo, tmp_path, cpu_env):
  env, full, lora = cpu_env(1), tmp_path / "dpo", tmp_path / "lora"
  run(repo, env, "--config=configs/dpo.py:smoke", f"--workdir={full}", "--config.train.stop_after=12")
  first = rows(full)
  assert abs(first[1]["loss"] - math.log(2)) < 1e-3 and first[1]["step"] == 1  # policy = reference at step 1
  assert abs(first[0]["eval_loss"] - math.log(2)) < 1e-3 and first[0]["eval_rewards/margins"] == 0.0
  assert METRICS <= set(first[1]) and {f"eval_{m}" for m in METRICS} <= set(first[0])
  resumed = run(repo, env, "--config=configs/dpo.py:smoke", f"--workdir={full}")
  assert "resuming from step 12" in resumed.stderr
  assert "initialised the frozen reference policy from" in resumed.stderr and "params" not in \
      [l for l in resumed.stderr.splitlines() if "initialised" in l][0]
  after = [r for r in rows(full) if r["step"] == 13][0]
  assert abs(after["loss"] - math.log(2)) > 1e-4  # the trained policy, not the reference, went on training

  run(repo, env, f"--config=configs/dpo.py:smoke,rank=4,init_from={full / 'base'}", f"--workdir={lora}",
      "--config.train.steps=5")
  lora_rows = rows(lora)
  assert abs(lora_rows[1]["loss"] - math.log(2)) < 1e-3  # adapters at B = 0: policy = the base = the reference

  easy = tmp_path / "easy.jsonl"  # a preference any model can learn: the same answer always preferred
  easy.write_text("".join(json.dumps({"prompt": f"Question {i}: is it good?", "chosen": " Yes, it is good.",
                                      "rejected": " No idea, maybe bad."}) + "\n" for i in range(200)))
  run(repo, env, f"--config=configs/dpo.py:smoke,init_from={full / 'base'},data={easy}", f"--workdir={tmp_path / 'e'}",
      "--config.train.steps=10")
  learned = rows(tmp_path / "e")[-1]
  assert learned["eval_loss"] < 0.1 and learned["eval_rewards/accuracy"] == 1.0 and learned["rewards/margins"] > 1

  unpaired = tmp_path / "unpaired.jsonl"  # each pair as two labelled responses: KTO's unpaired format
  unpaired.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"})
                              + "\n" for _, r in instruct.preference_records("validation")[:80]
                              for side in ("chosen", "rejected")))
  run(repo, env, f"--config=configs/dpo.py:smoke,head=kto,init_from={full / 'base'},data={unpaired}",
      f"--workdir={tmp_path / 'kto'}", "--config.train.steps=5")
  kto = rows(tmp_path / "kto")
  assert abs(kto[1]["loss"] - 0.5) < 1e-3 and {"kl", "desirable_fraction", "rewards/desirable"} <= set(kto[1])


@pytest.mark.slow
def test_precomputed_reference_logps_equal_the_live_reference(repo, tmp_path, cpu_env):
  env, base = cpu_env(1), tmp_path / "dpo" / "base"
  run(repo, env, "--config=configs/pretrain.py:smoke", f"--workdir={base}", "--config.train.steps=10")
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps(r) + "\n" for _, r in instruct.preference_records("validation")[:60]))
  tool = subprocess.run([sys.executable, "tools/precompute_ref_logps.py", f"--workdir={base}", f"--source={pairs}",
                         f"--output={tmp_path / 'ref'}", "--holdout=0.25"], cwd=repo, capture_output=True, text=True,
                        env=env, timeout=300)
  assert tool.returncode == 0, tool.stderr[-3000:]
  assert (tmp_path / "ref" / "train.jsonl").is_file() and (tmp_path / "ref" / "validation.jsonl").is_file()
  proc = run(repo, env, f"--config=configs/dpo.py:smoke,init_from={base},ref_logps={tmp_path / 'ref'}",
             f"--workdir={tmp_path / 'pre'}", "--config.train.steps=5")
  assert "reference" not in [l for l in proc.stderr.splitlines() if "parameters" in l][0]  # no copy in memory
  step0, step1 = rows(tmp_path / "pre")[:2]
  # policy = the reference run at the start: the precomputed columns must equal its live log-probs
  assert abs(step1["loss"] - math.log(2)) < 1e-4 and abs(step0["eval_loss"] - math.log(2)) < 1e-4
  assert max(abs(step1["rewards/chosen"]), abs(step1["rewards/rejected"]), abs(step0["eval_rewards/chosen"])) < 1e-4


def test_dpo_config_variants(repo):
  c = config_lib.load(f"{repo}/configs/dpo.py:init_from=/runs/sft,head=simpo,beta=2.0,rank=8")
  assert c.objective.name == "simpo" and c.objective.beta == 2.0 and c.lora.rank == 8
  assert c.data.source == "embedded:preference" and c.data.tokenizer_path == "/runs/sft/tokenizer.model"
