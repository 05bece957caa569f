"""The AOT projection's accounting of megablox's grouped matmuls (MoE layers): their analytic work, and that it is
added to the cost model's step time only when the cost model left it out. No compile: plain arithmetic."""

import dataclasses

import pytest

from fmjax import config_lib, spec
from fmjax.model import config as model_config
from fmjax.model import moe
from fmjax.train import aot


def test_grouped_matmul_cost_counts_every_row_and_streams_by_tiles():
  rows, k, n, groups, tiles = 1024, 512, 1024, 4, (128, 512, 512)
  work = moe.grouped_matmul_cost(rows, k, n, groups, tiles, itemsize=2)
  assert work["forward"][0] == 2 * rows * k * n
  assert work["backward"][0] == 2 * work["forward"][0]  # d rows (a gmm) and d weights (a tgmm)
  # forward: rows streamed once per column tile (2), weights once per row tile (8 + 3 at group boundaries), output
  assert work["forward"][1] == 2 * (rows * k * 2 + k * n * (8 + 3) + rows * n)
  # bigger row tiles stream the weights fewer times
  assert moe.grouped_matmul_cost(rows, k, n, groups, (512, 512, 512), 2)["forward"][1] < work["forward"][1]


def test_grouped_matmul_work_of_an_moe_layer_per_chip():
  cfg = dataclasses.replace(model_config.PRESETS["mixtral_8x7b"], dtype="bfloat16")
  tokens = 128 * 4096
  fsdp = aot.grouped_matmul_work(cfg, tokens, {"data": 1, "fsdp": 32, "tensor": 1, "expert": 1})
  per_chip_rows = tokens // 32 * cfg.num_experts_per_tok
  assert fsdp["forward"][0] == pytest.approx(3 * 2 * per_chip_rows * cfg.d_model * cfg.mlp_dim)
  assert fsdp["backward"][0] == pytest.approx(2 * fsdp["forward"][0])
  # with expert parallelism a device computes the rows routed to its experts: as many on balance, in fewer groups
  ep = aot.grouped_matmul_work(cfg, tokens, {"data": 1, "fsdp": 4, "tensor": 1, "expert": 8})
  assert ep["forward"][0] == pytest.approx(fsdp["forward"][0]) and ep["forward"][1] < fsdp["forward"][1]
  assert aot.grouped_matmul_work(model_config.PRESETS["llama3_8b"], tokens, {"fsdp": 32}) == {}
  capacity = dataclasses.replace(cfg, moe_capacity_factor=1.25)  # fixed buffers, plain einsums: the cost model's
  assert aot.grouped_matmul_work(capacity, tokens, {"fsdp": 32}) == {}


def test_grouped_matmuls_are_added_only_when_the_cost_model_leaves_them_out():
  c = config_lib.load("configs/pretrain.py:model=small_moe")
  c.model.dtype, c.model.remat, c.model.attention_impl = "bfloat16", "full", "xla"
  s = spec.resolve(c)
  mesh = {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
  work = aot.grouped_matmul_work(s.model, s.train.batch_size * s.train.seq_len, mesh)
  layer = 2 * work["forward"][0] + work["backward"][0]  # remat full: the forward twice

  def cost(layer_flops):
    out = aot.Cost(1.0, 459e12, 4)
    aot.add_kernel_costs(out, s, {}, "TPU v5", mesh, layer_flops=layer_flops)
    return out

  counted, missed = cost(1.5 * layer), cost(0.01 * layer)
  assert counted.counted == ("grouped matmul",) and counted.kernel_seconds == counted.kernel_flops == 0
  assert counted.kernels["grouped matmul"][0] == pytest.approx(s.model.num_layers * layer)
  assert missed.counted == () and missed.kernel_flops == pytest.approx(s.model.num_layers * layer)
  assert missed.kernel_seconds == pytest.approx(missed.kernels["grouped matmul"][2]) and missed.kernel_seconds > 0
