"""Configs and presets load; bad values fail with the key named; the FLOP count matches a hand count."""

import glob
import os

import jax
import pytest

from fmjax import spec as spec_lib
from fmjax import config_lib
from fmjax.train import checks
from fmjax.model import PRESETS, flops, init_params, resolve
from fmjax.train import optimizer


def config_files(repo):
  return sorted(glob.glob(os.path.join(repo, "configs", "*.py")))


def test_every_config_file_and_smoke_variant_loads(repo):
  assert config_files(repo)
  for path in config_files(repo):
    for variant in ("", ":smoke"):
      c = config_lib.load(path + variant)
      checks.check_spec(spec_lib.resolve(c))
      assert config_lib.resolved_model(c).num_layers > 0
      assert c.train.steps > 0 and c.checkpoint.every_steps > 0


# Parameter counts published for the original checkpoints (Hugging Face model cards / safetensors metadata).
PUBLISHED_PARAMS = {"1b": 1_235_814_400, "llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496,
                    "qwen2_0_5b": 494_032_768, "qwen3_0_6b": 596_049_920, "mixtral_8x7b": 46_702_792_704,
                    "qwen3_moe_30b_a3b": 30_532_122_624}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_with_expected_size(name):
  cfg = resolve(name)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  if name in PUBLISHED_PARAMS:
    assert n == PUBLISHED_PARAMS[name]
  if name == "small":
    assert 20e6 <= n <= 40e6


@pytest.mark.parametrize("name,shared", [("small_moe", 0), ("small_moe", 2), ("qwen3_moe_30b_a3b", 0)])
def test_moe_flops_count_the_active_parameters(name, shared):
  """From the parameter tree: every matmul weight but the input embedding, each expert's weights counted
  k / num_experts of the time (the tokens routed to it)."""
  from fmjax.model import flops

  cfg = resolve(name, {"moe_shared_experts": shared})
  tree = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  active = 0.0
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    keys = [p.key for p in path]
    if keys[-1] in ("embedding", "scale"):
      continue
    active += x.size * (cfg.num_experts_per_tok / cfg.num_experts if keys[-1].startswith("expert_") else 1)
  assert flops.matmul_params(cfg) == active


def test_variant_and_model_errors_name_the_key(repo):
  with pytest.raises(ValueError, match="variant 'smok'"):
    config_lib.load(f"{repo}/configs/pretrain.py:smok")
  with pytest.raises(ValueError, match="model.name='nope'"):
    resolve("nope")
  with pytest.raises(ValueError, match="num_kv_heads=3"):
    resolve("smoke", {"num_kv_heads": 3})
  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  c.train.grad_accum = 3
  with pytest.raises(ValueError, match="grad_accum=3"):
    checks.check_spec(spec_lib.resolve(c))
  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  c.data.holdout = 1.5
  with pytest.raises(ValueError, match=r"data.holdout=1.5 must be in \[0, 1\)"):
    checks.check_spec(spec_lib.resolve(c))


def test_model_overrides_apply_on_top_of_the_preset(repo):
  c = config_lib.load(f"{repo}/configs/pretrain.py:model=125m")
  c.model.num_layers = 3
  m = config_lib.resolved_model(c)
  assert (m.num_layers, m.d_model) == (3, 768)
  assert spec_lib.resolve(c).record["model"]["d_model"] == 768  # config.json records the resolved shape


def test_flops_match_a_hand_count():
  cfg = resolve("smoke", dict(vocab_size=10, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
                              mlp_dim=16))
  T = 6
  # Per layer: q 8×(2·4) + k 8×4 + v 8×4 + o (2·4)×8 + gate/up/down 3×8×16 = 64+32+32+64+384 = 576 weights.
  # Two layers + unembedding 8×10: 1232 matmul weights; fwd 2 FLOPs each, ×3 for fwd+bwd: 6·1232 = 7392.
  # Attention per layer and token: QKᵀ and AV, 2·T·(2·4) FLOPs each = 192, causal half = 96; ×2 layers ×3 = 576.
  assert flops.train_flops_per_token(cfg, T) == 7392 + 576
  # Frozen weights (LoRA): no weight gradients, 4·1232 = 4928 for the weights; attention is unchanged.
  assert flops.train_flops_per_token(cfg, T, frozen_weights=True) == 4928 + 576


def test_reference_shape_flops_match_the_perf_notes():
  # PERF-NOTES: d512, 8 layers, 8/4 heads, SwiGLU 1536, vocab 8192, seq 256: ≈182 MFLOP per token.
  assert flops.train_flops_per_token(resolve("small"), 256) == pytest.approx(182e6, rel=0.005)


def test_schedules_hit_their_endpoints(repo):
  c = config_lib.load(f"{repo}/configs/pretrain.py").optimizer
  c.lr, c.warmup_steps, c.min_lr_ratio = 1.0, 10, 0.1
  cos = optimizer.make_schedule(c, 110)
  assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0) and float(cos(110)) == pytest.approx(0.1)
  assert float(cos(60)) == pytest.approx(0.55, abs=1e-6)  # cosine midpoint between peak and floor
  c.schedule, c.decay_fraction, c.decay_shape = "wsd", 0.2, "linear"
  wsd = optimizer.make_schedule(c, 110)
  assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(90)) == pytest.approx(1.0)
  assert float(wsd(100)) == pytest.approx(0.55) and float(wsd(110)) == pytest.approx(0.1)


def test_weight_decay_mask_skips_norms_and_biases():
  params = {"layers": {"attn_norm": {"scale": 0}, "attn": {"q_kernel": 0, "q_bias": 0}}, "embedding": 0}
  mask = optimizer.decay_mask(params, r"(norm|bias)")
  assert mask == {"layers": {"attn_norm": {"scale": False}, "attn": {"q_kernel": True, "q_bias": False}},
                  "embedding": True}
