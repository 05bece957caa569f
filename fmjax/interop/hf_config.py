"""Hugging Face `config.json` ↔ `ModelConfig` for the Llama family: Llama (incl. Llama-3 RoPE scaling), Mistral,
Qwen2 (QKV bias) and Qwen3 (QK-norm, explicit head_dim), as causal LMs (`*ForCausalLM`) or sequence classifiers
and reward models (`*ForSequenceClassification`: `model.num_labels` > 0).

What fmjax cannot represent (another activation, MLP or output biases, another RoPE type, sliding-window attention
that can bite) is an error naming the field, never a silent approximation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fmjax.model.config import ModelConfig, loss_chunk_for
from fmjax import checks
from fmjax.errors import UserError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
CLASSIFIERS = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
               "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification"}


SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def read(path: str) -> dict:
  """A model's config.json, or an error naming the file and what is wrong with it: not JSON (a truncated or damaged
  download), not an object, or, for a supported family, a shape field missing or not a positive integer."""
  hf = checks.json_object(path, "an object of model settings")
  if hf.get("model_type") in FAMILIES:
    for key in SHAPE_KEYS:
      value = hf.get(key)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{path}: {key}={value!r} must be a positive integer (a {hf['model_type']} config.json sets "
                        f"{', '.join(SHAPE_KEYS)}); the file is incomplete or edited: download it again.")
  return hf


def _rope(hf: dict) -> dict:
  """RoPE settings from `rope_parameters` (transformers 5) or the older `rope_theta` + `rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = hf.get("rope_scaling") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  kind = params.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
  scaling = {**legacy, **params}
  if kind == "default":
    return {"rope_theta": float(theta), "rope_scaling_factor": 0.0}
  if kind != "llama3":
    raise UserError(f"RoPE type {kind!r} (config.json rope_scaling/rope_parameters) is not supported; fmjax "
                    "implements the default and Llama-3 ('llama3') rotary embeddings.")
  return {"rope_theta": float(theta), "rope_scaling_factor": float(scaling["factor"]),
          "rope_low_freq_factor": float(scaling["low_freq_factor"]),
          "rope_high_freq_factor": float(scaling["high_freq_factor"]),
          "rope_original_max_len": int(scaling["original_max_position_embeddings"])}


def family(hf: dict) -> str:
  """The config's model family (`model_type`), or an error listing the supported ones."""
  kind = hf.get("model_type")
  if kind not in FAMILIES:
    raise UserError(f"config.json model_type={kind!r} is not supported; fmjax converts {list(FAMILIES)}.")
  return kind


def num_labels(hf: dict) -> int:
  """The score head's width of a `*ForSequenceClassification` config (its labels), 0 for a causal LM."""
  arch = (hf.get("architectures") or [""])[0]
  if arch.endswith(("ForTokenClassification", "ForQuestionAnswering")):
    raise UserError(f"config.json architectures={[arch]}: fmjax converts causal LMs (*ForCausalLM) and sequence "
                    "classifiers (*ForSequenceClassification), not per-token or span heads.")
  if not arch.endswith("ForSequenceClassification"):
    return 0
  # transformers saves id2label (num_labels is a property of it), and older versions left out their default 2 labels
  return int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)


def to_model_config(hf: dict) -> ModelConfig:
  """The fmjax model of HF config `hf` (float32 parameters and compute, scanned layers)."""
  kind = family(hf)
  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"config.json hidden_act={hf['hidden_act']!r}: fmjax's MLP is SwiGLU (silu).")
  for flag in ("mlp_bias",):
    if hf.get(flag):
      raise UserError(f"config.json {flag}=true is not supported (fmjax has no MLP biases).")
  if kind == "qwen2" and hf.get("use_sliding_window"):
    raise UserError("config.json use_sliding_window=true: fmjax attends to the whole context; sliding-window "
                    "Qwen2 layers are not supported.")
  heads = hf["num_attention_heads"]
  cfg = ModelConfig(
      vocab_size=hf["vocab_size"], loss_chunk=loss_chunk_for(hf["vocab_size"]), d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=True if kind == "qwen2" else bool(hf.get("attention_bias", False)),
      qk_norm=kind == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)), num_labels=num_labels(hf),
      **_rope(hf))
  return cfg.validate()


def from_model_config(cfg: ModelConfig, template: dict | None = None, dtype: str = "float32") -> dict:
  """An HF config.json for `cfg`: `template` (an imported model's own config.json) with the shape fields
  replaced, or a fresh config of the family `cfg` needs (qwen3 for QK-norm, qwen2 for QKV bias, else llama). A score
  model (`cfg.num_labels`) is a `*ForSequenceClassification` with `num_labels` labels (the template's names when it
  has as many); its `pad_token_id` comes with the tokenizer (`hf._write_tokenizer_files`)."""
  kind = template.get("model_type") if template else ("qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama")
  holds = {"llama": not cfg.qk_norm, "mistral": not (cfg.qk_norm or cfg.qkv_bias),
           "qwen2": cfg.qkv_bias and not cfg.qk_norm, "qwen3": cfg.qk_norm}
  if not holds.get(kind, False):
    raise UserError(f"model_type {kind!r} cannot hold a model with qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias}.")
  out = {k: v for k, v in (template or {}).items()
         if k not in ("rope_scaling", "rope_theta", "torch_dtype", "num_labels")}  # id2label holds num_labels
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling_factor > 0:
    rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_max_len)
  architecture = (CLASSIFIERS if cfg.num_labels else ARCHITECTURES)[kind]
  out.update(
      model_type=kind, architectures=[architecture], vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, dtype=dtype)
  out.setdefault("max_position_embeddings", max(4096, 2 * cfg.rope_original_max_len if cfg.rope_scaling_factor else 0))
  if kind in ("llama", "qwen3"):
    out["attention_bias"] = cfg.qkv_bias
  if kind == "llama":
    out["mlp_bias"] = False
  if kind in ("qwen2", "qwen3"):
    out.setdefault("use_sliding_window", False)
  id2label = out.pop("id2label", None) or {}
  out.pop("label2id", None)
  if len(id2label) != cfg.num_labels:
    out.pop("problem_type", None)  # the template's loss was for another number of labels
    id2label = {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
  if cfg.num_labels:
    id2label = {str(k): v for k, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))}
    out.update(id2label=id2label, label2id={v: int(k) for k, v in id2label.items()})
  return out


def with_dtypes(cfg: ModelConfig, dtype: str) -> ModelConfig:
  """`cfg` storing and computing in `dtype`."""
  return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
