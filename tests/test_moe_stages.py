"""End to end on a mixture-of-experts model: pre-training logs the router's metrics and learns; LoRA and DPO smoke
runs start from it unchanged (SFT on an imported MoE: tests/test_hf_moe.py)."""

import json

import pytest

from test_finetune import evals, rows, run

TINY = ["--config.model.d_model=64", "--config.model.num_layers=2", "--config.model.mlp_dim=64",
        "--config.model.head_dim=16", "--config.model.num_experts=4"]


@pytest.mark.slow
def test_moe_pretrain_then_lora_and_dpo(repo, tmp_path, cpu_env):
  env = cpu_env(1)
  base = tmp_path / "base"
  run(repo, env, "-m", "fmjax.main", "--config=configs/pretrain.py:smoke", f"--workdir={base}",
      "--config.model.name=small_moe", *TINY, "--config.train.steps=16", "--config.eval.every_steps=8")
  logged = [r for r in rows(base) if "loss" in r]
  assert all(r["moe/aux_loss"] > 0 and r["moe/z_loss"] > 0 and r["moe/load_max"] >= 1 and r["moe/dropped"] == 0
             for r in logged)
  assert all(r["loss"] > r["nll"] for r in logged)  # the router's losses are trained with the head's
  pt = evals(base)
  assert pt[16] < pt[8] < 6.0  # from ln(512) = 6.24
  assert json.load(open(base / "config.json"))["model"]["num_experts"] == 4

  for stage in ("lora", "dpo"):
    out = tmp_path / stage
    run(repo, env, "-m", "fmjax.main", f"--config=configs/{stage}.py:smoke,init_from={base}", f"--workdir={out}",
        "--config.train.steps=4", "--config.eval.every_steps=4")
    steps = [r for r in rows(out) if "loss" in r]
    assert len(steps) == 4 and all("moe/aux_loss" in r for r in steps), stage
    assert sorted(evals(out)) == [0, 4], stage
