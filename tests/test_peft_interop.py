"""The exported LoRA adapter loads into Hugging Face PEFT over the same base and gives fmjax's logits.

Needs the `hf` extra (torch, transformers, peft): `pip install -e '.[hf]'` (on a CPU-only machine install the CPU
torch wheel first). Without it this module is skipped.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

from fmjax.adapters import lora, peft  # noqa: E402
from fmjax.model import Transformer, init_params, resolve  # noqa: E402


def hf_llama(cfg, params):
  """A transformers LlamaForCausalLM holding fmjax `params` (layer-scanned smoke shape)."""
  config = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
      max_position_embeddings=256, attention_bias=False)
  model = transformers.LlamaForCausalLM(config).eval()
  p = jax.tree.map(np.asarray, params)
  t = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731  (a writable copy)
  state = {"model.embed_tokens.weight": t(p["embedding"]), "model.norm.weight": t(p["final_norm"]["scale"]),
           "lm_head.weight": t(p["unembed"].T)}
  attn, mlp = p["layers"]["attn"], p["layers"]["mlp"]
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    state[pre + "self_attn.q_proj.weight"] = t(attn["q_kernel"][i].reshape(cfg.d_model, -1).T)
    state[pre + "self_attn.k_proj.weight"] = t(attn["k_kernel"][i].reshape(cfg.d_model, -1).T)
    state[pre + "self_attn.v_proj.weight"] = t(attn["v_kernel"][i].reshape(cfg.d_model, -1).T)
    state[pre + "self_attn.o_proj.weight"] = t(attn["o_kernel"][i].reshape(-1, cfg.d_model).T)
    for name in ("gate", "up", "down"):
      state[pre + f"mlp.{name}_proj.weight"] = t(mlp[f"{name}_kernel"][i].T)
    state[pre + "input_layernorm.weight"] = t(p["layers"]["attn_norm"]["scale"][i])
    state[pre + "post_attention_layernorm.weight"] = t(p["layers"]["mlp_norm"]["scale"][i])
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
  return model


def test_peft_loads_the_exported_adapter_and_matches_fmjax_logits(tmp_path):
  cfg = resolve("smoke")
  lora_cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=r"(q|k|v|o|gate|up|down)_kernel$|unembed")
  params = init_params(cfg, jax.random.PRNGKey(0), adapter=lora_cfg)
  adapters, base = lora.split(params)
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  adapters = tree.unflatten([0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  peft.save(str(tmp_path), adapters, lora_cfg, cfg.num_layers)

  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
  ours = np.asarray(Transformer(cfg, lora_cfg).apply({"params": lora.combine(base, adapters)}, tokens,
                                                     np.ones_like(tokens), np.arange(24)[None].repeat(2, 0)))
  plain = hf_llama(cfg, base)
  with torch.no_grad():
    base_logits = plain(torch.from_numpy(tokens).long()).logits.numpy()
    adapted = peft_lib.PeftModel.from_pretrained(plain, str(tmp_path)).eval()
    theirs = adapted(torch.from_numpy(tokens).long()).logits.numpy()
  assert np.abs(ours - base_logits).max() > 0.1  # the adapters matter
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
