"""LoRA: zero-initialised adapters change nothing, merging is exact, the base stays frozen, targets are exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from fmjax import config_lib
from fmjax.adapters import lora, peft
from fmjax.model import Transformer, init_params, resolve
from fmjax.train import memory
import from_config

ALL = r"(q|k|v|o|gate|up|down)_kernel$|unembed"


def batch(cfg, B=2, T=16, seed=1):
  tokens = jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, cfg.vocab_size)
  segments = jnp.concatenate([jnp.ones((B, T // 2), jnp.int32), 2 * jnp.ones((B, T // 2), jnp.int32)], axis=1)
  positions = jnp.concatenate([jnp.arange(T // 2)] * 2)[None].repeat(B, 0)
  return tokens, segments, positions


@pytest.fixture(scope="module")
def smoke():
  cfg = resolve("smoke", {"qkv_bias": True})
  lora_cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=ALL, dropout=0.1)
  params = init_params(cfg, jax.random.PRNGKey(0), adapter=lora_cfg)
  return cfg, lora_cfg, params


def random_adapters(params, seed=5):
  adapters, base = lora.split(params)
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return base, tree.unflatten([0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_zero_b_gives_exactly_the_base_outputs(smoke):
  cfg, lora_cfg, params = smoke
  adapters, base = lora.split(params)
  assert all(np.all(np.asarray(v) == 0) for k, v in traverse_util.flatten_dict(adapters).items()
             if k[-1].endswith("_lora_b"))
  assert all(np.asarray(v).std() > 0 for k, v in traverse_util.flatten_dict(adapters).items()
             if k[-1].endswith("_lora_a"))
  jax.tree.map(np.testing.assert_array_equal, base, init_params(cfg, jax.random.PRNGKey(0)))  # same base init
  plain = Transformer(cfg).apply({"params": base}, *batch(cfg))
  adapted = Transformer(cfg, lora_cfg).apply({"params": params}, *batch(cfg), rngs={"dropout": jax.random.PRNGKey(2)})
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))  # bitwise, dropout on


def test_merged_equals_unmerged(smoke):
  cfg, lora_cfg, params = smoke
  base, adapters = random_adapters(params)
  full = lora.combine(base, adapters)
  unmerged = np.asarray(Transformer(cfg, lora_cfg).apply({"params": full}, *batch(cfg)))
  merged = np.asarray(Transformer(cfg).apply({"params": lora.merge(full, lora_cfg)}, *batch(cfg)))
  plain = np.asarray(Transformer(cfg).apply({"params": base}, *batch(cfg)))
  assert np.abs(unmerged - plain).max() > 0.1  # the adapters do change the function
  assert np.abs(merged - unmerged).max() <= 1e-5


def test_merge_is_w_plus_scaled_a_b_in_float64(smoke):
  cfg, lora_cfg, params = smoke
  base, adapters = random_adapters(params)
  merged = lora.merge(lora.combine(base, adapters), lora_cfg)
  a = np.asarray(adapters["layers"]["attn"]["o_kernel_lora_a"], np.float64)  # [L, N, H, r]
  b = np.asarray(adapters["layers"]["attn"]["o_kernel_lora_b"], np.float64)  # [L, r, D]
  w = np.asarray(base["layers"]["attn"]["o_kernel"], np.float64)
  expected = w + lora_cfg.scale * np.einsum("lnhr,lrd->lnhd", a, b)
  np.testing.assert_allclose(merged["layers"]["attn"]["o_kernel"], expected, atol=1e-6)
  assert lora_cfg.scale == 2.0 and lora.LoraConfig(rank=4, alpha=8.0, rslora=True).scale == 4.0


def test_targets_select_exactly_the_expected_paths():
  base = init_params(resolve("smoke"), jax.random.PRNGKey(0))
  select = lambda t: lora.targeted_paths(base, lora.LoraConfig(rank=2, targets=t))  # noqa: E731
  assert select(lora.DEFAULT_TARGETS) == [f"layers/{m}_kernel" for m in
                                          ("attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/gate", "mlp/up")]
  assert select(r"attn/(q|v)_kernel$") == ["layers/attn/q_kernel", "layers/attn/v_kernel"]
  unscanned = init_params(resolve("smoke", {"scan_layers": False}), jax.random.PRNGKey(0))
  assert lora.targeted_paths(unscanned, lora.LoraConfig(rank=2, targets=r"layers_1/mlp/up")) == [
      "layers_1/mlp/up_kernel"]
  with pytest.raises(ValueError, match=r"lora.targets='attn/qq' matches no parameter path"):
    select("attn/qq")
  with pytest.raises(ValueError, match=r"selects \['layers/attn_norm/scale'\], which cannot take adapters"):
    select("attn_norm")
  # the model creates adapters for exactly the selected kernels
  params = init_params(resolve("smoke"), jax.random.PRNGKey(0), adapter=lora.LoraConfig(rank=2, targets="attn/(q|v)_"))
  assert sorted("/".join(p) for p in traverse_util.flatten_dict(lora.split(params)[0])) == [
      "layers/attn/q_kernel_lora_a", "layers/attn/q_kernel_lora_b", "layers/attn/v_kernel_lora_a",
      "layers/attn/v_kernel_lora_b"]


def lora_run_config(repo, mesh=(1, 1, 1)):
  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  c.train.seq_len, c.train.batch_size = 32, 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  c.optimizer.warmup_steps, c.optimizer.lr = 0, 1e-2
  c.lora.rank, c.lora.dropout = 4, 0.1
  return c


def train_steps(config, devices, n=3):
  exp = from_config.build(config, devices=devices)
  base_before = jax.device_get(exp.state.base)
  state, losses = exp.state, []
  for _ in range(n):
    state, metrics = exp.run.step(state, exp.next_batch())
    losses.append(float(metrics["loss"]))
  return base_before, jax.device_get(state), losses


@pytest.fixture(scope="module")
def lora_one_device(repo):
  return train_steps(lora_run_config(repo), jax.devices()[:1])


def test_lora_training_keeps_the_base_bit_identical_and_optimizes_only_adapters(lora_one_device):
  base_before, state, losses = lora_one_device
  jax.tree.map(np.testing.assert_array_equal, state.base, base_before)
  paths = ["/".join(p) for p in traverse_util.flatten_dict(state.params)]
  assert paths and all(p.endswith(("_lora_a", "_lora_b")) for p in paths)
  assert all(np.abs(v).max() > 0 for p, v in traverse_util.flatten_dict(state.params).items()
             if p[-1].endswith("_lora_b"))  # B left zero: the adapters did train
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  for moments in (adam[0].mu, adam[0].nu):
    assert jax.tree.structure(moments) == jax.tree.structure(state.params)
  opt_floats = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.dtype == np.float32)
  assert opt_floats == 2 * sum(x.size for x in jax.tree.leaves(state.params))
  assert losses[-1] < losses[0]


def test_lora_step_on_8_devices_matches_1(repo, lora_one_device):
  _, state1, losses1 = lora_one_device
  _, state8, losses8 = train_steps(lora_run_config(repo, (2, 2, 2)), jax.devices())
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), state8.params, state1.params)


def test_memory_table_counts_match_the_lora_formula():
  full = memory.footprint("1b")
  assert full.trainable == full.total == 1_235_814_400 and full.frozen_bytes == 0
  m = memory.footprint("1b", lora.LoraConfig(rank=8))
  D, F, Q, KV, L = 2048, 8192, 32 * 64, 8 * 64, 16  # Llama-3.2-1B: q/o 2048↔2048, k/v 2048→512, MLP 2048↔8192
  per_layer = 8 * ((D + Q) + 2 * (D + KV) + (Q + D) + 2 * (D + F) + (F + D))
  assert m.trainable == L * per_layer == 5_636_096  # what PEFT reports for Llama-3.2-1B, r=8, all linear layers
  assert m.optimizer_bytes == 2 * 4 * m.trainable + 4  # AdamW mu and nu in float32, and its step count
  assert m.frozen_bytes == 2 * full.total  # the bf16 base, held once


def test_peft_export_names_shapes_and_delta(smoke):
  cfg, lora_cfg, params = smoke
  base, adapters = random_adapters(params)
  tensors = peft.to_peft(adapters, cfg.num_layers)
  q_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
  assert tensors[q_a].shape == (4, cfg.d_model)
  assert tensors[q_a.replace("lora_A", "lora_B")].shape == (cfg.num_heads * cfg.head_dim, 4)
  assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (cfg.vocab_size, 4)
  assert len(tensors) == 2 * (7 * cfg.num_layers + 1)
  # PEFT adds s·B@A to the [out, in] Linear weight; that must be our delta, transposed into HF's layout
  merged = lora.merge(lora.combine(base, adapters), lora_cfg)
  ours_o = np.asarray(merged["layers"]["attn"]["o_kernel"][1] - base["layers"]["attn"]["o_kernel"][1], np.float64)
  hf_o = peft.delta_hf(tensors, "model.layers.1.self_attn.o_proj", lora_cfg.scale)  # [D, N·H]
  np.testing.assert_allclose(hf_o, ours_o.reshape(-1, cfg.d_model).T, atol=1e-6)
  ours_q = np.asarray(merged["layers"]["attn"]["q_kernel"][0] - base["layers"]["attn"]["q_kernel"][0], np.float64)
  hf_q = peft.delta_hf(tensors, "model.layers.0.self_attn.q_proj", lora_cfg.scale)  # [N·H, D]
  np.testing.assert_allclose(hf_q, ours_q.reshape(cfg.d_model, -1).T, atol=1e-6)
  config = peft.adapter_config(tensors, lora_cfg, cfg.num_layers)
  assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj",
                                      "v_proj"]
  assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
