"""Ahead-of-time compilation of the real train step for TPU slices, on this CPU machine (libtpu's compile-only
devices). Skipped where libtpu is not installed (pip install -e '.[tpu]')."""

import json
import subprocess
import sys

import jax
import pytest

from fmjax import config_lib, spec, topology
from fmjax.train import aot

GiB = 2**30


def test_cloud_tpu_names_map_to_chip_grids():
  grids = {"v5p-8": (2, 2, 1), "v4-8": (2, 2, 1), "v5p-16": (2, 2, 2), "v5p-64": (2, 4, 4), "v5p-128": (4, 4, 4),
           "v5p-256": (4, 4, 8), "v4-2048": (8, 8, 16), "v5e-1": (1, 1), "v5e-16": (4, 4), "v5litepod-16": (4, 4),
           "v6e-8": (2, 4), "v6e-256": (16, 16), "v5p:4x4x12": (4, 4, 12)}
  for name, grid in grids.items():
    assert topology.parse(name).grid == grid, name
  assert topology.parse("v5p-8").libtpu_name == "v5:2x2x1"
  assert topology.parse("v5p-128", num_slices=2).chips == 128
  assert topology.parse("v6e:8x16").cloud_name(128) == "v6e-128"
  with pytest.raises(ValueError, match="v5p:4x4x12"):
    topology.parse("v5p-384")  # 192 chips: not a power of two, so its grid must be named
  with pytest.raises(ValueError, match="not a Cloud TPU slice"):
    topology.parse("h100-8")


def test_search_ladder_keeps_the_global_batch():
  c = spec.resolve(config_lib.load("configs/pretrain.py:smoke"))  # batch 8, remat none
  rungs = [(cfg.model.remat, cfg.train.grad_accum) for _, cfg in aot.ladder(c, batch_shards=4)]
  assert rungs == [("none", 1), ("dots", 1), ("full", 1), ("none", 2), ("dots", 2), ("full", 2)]
  assert all(cfg.train.batch_size == 8 for _, cfg in aot.ladder(c, batch_shards=4))


def test_smoke_fits_on_v5p_8_with_memory_by_category_and_a_projected_mfu(v5p_8):
  topo, devices = v5p_8
  report = aot.analyse(config_lib.load("configs/pretrain.py:smoke"), topo, devices=devices)
  m = report.memory
  assert report.verdict == "fits" and report.device_kind == "TPU v5" and len(devices) == 4
  assert report.mesh == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1, "expert": 1}
  assert 90 * GiB < m.capacity < 96 * GiB  # v5p: 95 GB per chip, as the compiler states what a program may use
  for category in ("params (trained)", "optimizer state", "batch"):
    assert m.arguments[category] > 0, category
  for figure in ("arguments", "temporaries", "generated code"):
    assert m.compiled[figure] > 0, figure
  # The state is sharded: a chip holds a quarter of the params (fsdp=4; vectors too short to split stay whole).
  step = aot.plan(spec.resolve(config_lib.load("configs/pretrain.py:smoke")), devices, None)
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(step.state.params))
  assert params / 4 <= m.arguments["params (trained)"] < params / 2
  assert m.arguments["optimizer state"] >= 2 * m.arguments["params (trained)"]  # AdamW: two moments
  assert m.compiled["arguments"] >= sum(m.arguments.values())  # the compiler's figure adds only layout padding
  assert 0 < m.total < m.capacity  # the compiler's peak in use
  cost = report.cost
  assert cost.seconds > 0 and 0 < cost.mfu < 1 and cost.compiler_flops > 0
  assert cost.model_flops == pytest.approx(
      884_736 * 8 * 128)  # fmjax.model.flops: 884,736 FLOPs per token for the smoke model at seq 128, x 8 x 128
  assert report.suggestions == []


@pytest.mark.parametrize("spec,frozen", [("configs/lora.py:smoke", "frozen LoRA base"),
                                         ("configs/reft.py:smoke", "frozen REFT base"),
                                         ("configs/dpo.py:smoke", "frozen reference"),
                                         ("configs/grpo.py:smoke,beta=0.04", "frozen reference"),
                                         ("configs/grpo.py:smoke,gspo,beta=0.04", "frozen reference"),
                                         ("configs/online_dpo.py:smoke", "frozen reference"),
                                         ("configs/distill.py:smoke", "frozen teacher")])
def test_every_stage_compiles_with_its_frozen_trees(v5p_8, spec, frozen):
  topo, devices = v5p_8
  report = aot.analyse(config_lib.load(spec), topo, devices=devices, cost=False)
  assert report.verdict == "fits" and report.memory.arguments[frozen] > 0
  if spec.startswith(("configs/dpo", "configs/grpo", "configs/online_dpo")):
    assert report.memory.arguments[frozen] == report.memory.arguments["params (trained)"]


@pytest.mark.parametrize("stage,key,tree", [("configs/dpo.py:smoke", "quant.frozen", "frozen reference"),
                                            ("configs/lora.py:smoke", "quant.base", "frozen LoRA base")])
def test_quantized_frozen_trees_hold_a_fraction_of_their_bf16_bytes(v5p_8, stage, key, tree):
  """Per chip, in the AOT report: NF4 holds a frozen tree in at most 30% of its bf16 bytes (4 bits + a float32 scale
  per 64 weights), int8 in at most 55%; the step compiles over them."""
  topo, devices = v5p_8

  def frozen_bytes(scheme):
    c = config_lib.load(stage)
    c.model.param_dtype = "bfloat16"
    c.quant[key.split(".")[1]] = scheme
    report = aot.analyse(c, topo, devices=devices, cost=False)
    assert report.verdict == "fits"
    return report.memory.arguments[tree]

  bf16 = frozen_bytes("none")
  assert 0 < frozen_bytes("nf4") <= 0.30 * bf16
  assert 0.5 * bf16 < frozen_bytes("int8") <= 0.55 * bf16


def test_int8_matmuls_compile_for_tpu(v5p_8):
  """model.matmul=int8: every projection's three matmuls (forward, both cotangents) multiply int8 operands into
  int32, and the step compiles for the TPU."""
  topo, devices = v5p_8
  c = config_lib.load("configs/pretrain.py:smoke")
  c.model.matmul = "int8"
  step = aot.plan(spec.resolve(c), devices, None)
  text = step.lower().as_text()
  int8_dots = [line for line in text.splitlines() if "dot_general" in line and "xi8>" in line and "xi32>" in line]
  assert len(int8_dots) >= 7 * 3  # q, k, v, o, gate, up, down: forward, dx, dw (one scanned layer)
  assert aot.analyse(c, topo, devices=devices, cost=False).verdict == "fits"


@pytest.mark.parametrize("critic", ["trunk", "separate"])
def test_ppo_compiles_with_its_critic_and_reference(v5p_8, critic):
  """The trained params hold the policy and its critic: a value head (d_model + 1 floats) or a second network."""
  topo, devices = v5p_8
  c = config_lib.load(f"configs/ppo.py:smoke,critic={critic}")
  report = aot.analyse(c, topo, devices=devices, cost=False)
  args = report.memory.arguments
  assert report.verdict == "fits" and args["frozen reference"] > 0
  extra = args["params (trained)"] - args["frozen reference"]
  d = config_lib.resolved_model(c).d_model
  if critic == "trunk":  # per chip: the kernel is sharded like the embedding
    assert 0 < extra <= 4 * (d + 1)
  else:  # a second network of the policy's shape with a score head for its unembedding
    assert extra == pytest.approx(args["frozen reference"], rel=0.5)


def test_smoke_compiles_for_v5p_8_with_splash_attention_by_default(v5p_8, monkeypatch):
  """attention_impl=auto: the Pallas kernel lowers through Mosaic for the TPU (not interpret mode) and the step fits."""
  from fmjax.model import splash

  modes, kernel = [], splash._kernel
  monkeypatch.setattr(splash, "_kernel", lambda heads, seq_len, interpret, split=None: modes.append(interpret)
                      or kernel(heads, seq_len, interpret, split))
  topo, devices = v5p_8
  c = config_lib.load("configs/pretrain.py:smoke")
  assert c.model.get("attention_impl") is None and config_lib.resolved_model(c).attention_impl == "auto"
  report = aot.analyse(c, topo, devices=devices, cost=False)
  assert report.verdict == "fits" and report.memory.total > 0
  assert modes and not any(modes)  # every call compiled for the TPU


def test_projected_step_adds_the_splash_kernels_at_roofline(v5p_8):
  from fmjax.model import splash
  from fmjax.train import peak

  _, devices = v5p_8
  kind, chips = devices[0].device_kind, len(devices)

  def kernels(**model) -> aot.Cost:
    c = config_lib.load("configs/pretrain.py:smoke")
    for key, value in model.items():
      c.model[key] = value
    cost = aot.Cost(1.0, 459e12, chips)
    aot.add_kernel_costs(cost, spec.resolve(c), {}, kind)
    return cost

  none, full, xla = kernels(remat="none"), kernels(remat="full"), kernels(attention_impl="xla")
  assert xla.kernel_seconds == xla.kernel_flops == 0
  cfg = config_lib.resolved_model(config_lib.load("configs/pretrain.py:smoke"))
  calls = 8 * cfg.num_heads * cfg.num_layers / chips  # global batch 8 sequences, per chip
  work = splash.kernel_cost(128, cfg.head_dim, 4)  # the smoke model computes in float32
  assert none.kernel_flops == pytest.approx(calls * (work["forward"][0] + work["backward"][0]))
  assert full.kernel_flops == pytest.approx(calls * (2 * work["forward"][0] + work["backward"][0]))  # remat: again
  # DPO: the chosen and rejected rows both train, and the frozen reference runs its forward on both
  dpo = config_lib.load("configs/dpo.py:smoke")
  cost = aot.Cost(1.0, 459e12, chips)
  aot.add_kernel_costs(cost, spec.resolve(dpo), {}, kind)
  d = config_lib.resolved_model(dpo)
  work = splash.kernel_cost(dpo.train.seq_len, d.head_dim, 4)
  remat = 1 if d.remat != "none" else 0
  calls = dpo.train.batch_size * 2 * d.num_heads * d.num_layers / chips
  assert cost.kernel_flops == pytest.approx(calls * ((2 + remat) * work["forward"][0] + work["backward"][0]))
  bandwidth = peak.hbm_bandwidth(kind)
  assert bandwidth == 2765e9  # v5p
  assert full.kernel_seconds >= max(full.kernel_flops / 459e12, full.kernel_bytes / bandwidth) > 0


def test_a_big_model_on_too_few_chips_does_not_fit_and_says_what_to_change(v5p_8):
  topo, devices = v5p_8
  c = config_lib.load("configs/pretrain.py:model=llama3_8b")
  c.model.num_layers, c.train.batch_size, c.train.seq_len = 2, 256, 4096  # Llama-3-8B layers, 64 x 4096 per chip
  report = aot.analyse(c, topo, devices=devices)
  m = report.memory
  assert report.verdict == "does not fit" and "RESOURCE_EXHAUSTED" in m.message
  assert m.total > m.capacity > 90 * GiB and report.cost is None
  advice = " ".join(report.suggestions)
  for change in ("--config.model.remat=", "--config.train.grad_accum=2", "--config.model.dtype=bfloat16",
                 "--config.model.param_dtype=bfloat16"):
    assert change in advice, change


def test_the_command_line_prints_the_verdict_and_writes_json(v5p_8, repo, tmp_path):
  out = tmp_path / "report.json"
  proc = subprocess.run([sys.executable, "tools/aot_compile.py", "--config=configs/sft.py:smoke", "--topology=v5p-8",
                         "--config.train.batch_size=16", "--nocost", f"--json={out}"],
                        cwd=repo, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "verdict: fits" in proc.stdout and "optimizer state" in proc.stdout
  report = json.loads(out.read_text())
  assert report["verdict"] == "fits" and report["chips"] == 4 and report["global_batch"] == 16
  hbm = report["hbm_per_chip"]
  assert hbm["by_category"]["optimizer state"] > 0 and hbm["temporaries"] > 0 and report["cost"] is None
