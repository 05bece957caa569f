"""Hugging Face `config.json` ↔ `ModelConfig` for the Llama family: Llama (incl. Llama-3 RoPE scaling), Mistral,
Qwen2 (QKV bias) and Qwen3 (QK-norm, explicit head_dim), and the mixtures of experts Mixtral and Qwen3-MoE
(`model.num_experts` > 0; `mlp_dim` is one expert's width), as causal LMs (`*ForCausalLM`) or sequence classifiers
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

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
MOE_FAMILIES = ("mixtral", "qwen3_moe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
CLASSIFIERS = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
               "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
               "mixtral": "MixtralForSequenceClassification", "qwen3_moe": "Qwen3MoeForSequenceClassification"}
# mixtures of experts fmjax does not convert, and why (the generic "not supported" error for the others)
UNSUPPORTED = {
    "qwen2_moe": "its shared expert is scaled by a sigmoid gate (shared_expert_gate) that fmjax's shared experts "
                 "(model.moe_shared_experts) do not have",
    "deepseek_v2": "its attention is multi-head latent attention (MLA), which fmjax does not implement",
    "deepseek_v3": "its attention is multi-head latent attention (MLA), which fmjax does not implement",
}


SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
MOE_SHAPE_KEYS = {"mixtral": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                              "intermediate_size", "num_local_experts", "num_experts_per_tok"),
                  "qwen3_moe": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "moe_intermediate_size", "num_experts", "num_experts_per_tok")}


def num_experts(hf: dict) -> Any:
  """The routed experts of an MoE config: `num_local_experts` (Mixtral, and what transformers 5 saves for every
  MoE), else `num_experts` (Qwen3-MoE's own name, as its Hub checkpoints and transformers 4 write it)."""
  value = hf.get("num_local_experts")
  return value if value is not None else hf.get("num_experts")


def read(path: str) -> dict:
  """A model's config.json, or an error naming the file and what is wrong with it: not JSON (a truncated or damaged
  download), not an object, or, for a supported family, a shape field missing or not a positive integer."""
  hf = checks.json_object(path, "an object of model settings")
  if hf.get("model_type") in FAMILIES:
    keys = MOE_SHAPE_KEYS.get(hf["model_type"], SHAPE_KEYS)
    for key in keys:
      value = num_experts(hf) if key in ("num_experts", "num_local_experts") else hf.get(key)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{path}: {key}={value!r} must be a positive integer (a {hf['model_type']} config.json sets "
                        f"{', '.join(keys)}); the file is incomplete or edited: download it again.")
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
  if kind in UNSUPPORTED:
    raise UserError(f"config.json model_type={kind!r} is not supported: {UNSUPPORTED[kind]}; fmjax converts "
                    f"{list(FAMILIES)}.")
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
  if kind in ("qwen2", "qwen3_moe") and hf.get("use_sliding_window"):
    raise UserError(f"config.json use_sliding_window=true: fmjax attends to the whole context; sliding-window "
                    f"{kind} layers are not supported.")
  heads = hf["num_attention_heads"]
  cfg = ModelConfig(
      vocab_size=hf["vocab_size"], loss_chunk=loss_chunk_for(hf["vocab_size"]), d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=True if kind == "qwen2" else bool(hf.get("attention_bias", False)),
      qk_norm=kind in ("qwen3", "qwen3_moe"), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      num_labels=num_labels(hf), **_rope(hf),
      **(_moe(hf, kind) if kind in MOE_FAMILIES else {"mlp_dim": hf["intermediate_size"]}))
  return cfg.validate()


def _moe(hf: dict, kind: str) -> dict:
  """The MoE fields of a Mixtral or Qwen3-MoE config: routed experts in every layer, no shared expert, no z-loss;
  the load-balancing coefficient is `router_aux_loss_coef` (transformers adds it to the loss only with
  `output_router_logits`, fmjax always: set model.moe_aux_loss=0 to train without it)."""
  if hf.get("attention_bias"):
    raise UserError(f"config.json attention_bias=true: {kind} then has q/k/v and o_proj biases, and fmjax has no "
                    "output-projection bias; only attention_bias=false converts.")
  if kind == "qwen3_moe":
    step, dense = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
    if step != 1:
      raise UserError(f"config.json decoder_sparse_step={step!r}: fmjax has experts in every layer, so only "
                      "decoder_sparse_step=1 (with mlp_only_layers=[]) converts.")
    if dense:
      raise UserError(f"config.json mlp_only_layers={dense!r}: fmjax has experts in every layer, so only "
                      "mlp_only_layers=[] (with decoder_sparse_step=1) converts.")
  return dict(mlp_dim=hf["intermediate_size" if kind == "mixtral" else "moe_intermediate_size"],
              num_experts=num_experts(hf), num_experts_per_tok=hf["num_experts_per_tok"],
              moe_shared_experts=0, moe_norm_topk=True if kind == "mixtral" else bool(hf.get("norm_topk_prob", False)),
              moe_aux_loss=float(hf.get("router_aux_loss_coef", 0.001)), moe_z_loss=0.0)


def moe_family(cfg: ModelConfig) -> str:
  """The HF family of MoE model `cfg`: qwen3_moe with QK-norm, mixtral without; an error naming the field when
  neither holds it (shared experts, QKV bias, or a Mixtral without renormalised top-k weights)."""
  kind = "qwen3_moe" if cfg.qk_norm else "mixtral"
  why = ("model.moe_shared_experts > 0 (Mixtral and Qwen3-MoE have no shared expert)" if cfg.moe_shared_experts else
         "model.qkv_bias=true (Mixtral and Qwen3-MoE have no QKV bias)" if cfg.qkv_bias else
         "model.moe_norm_topk=false (Mixtral always renormalises the top-k weights; Qwen3-MoE, with model.qk_norm, "
         "has norm_topk_prob)" if kind == "mixtral" and not cfg.moe_norm_topk else "")
  if why:
    raise UserError(f"an MoE model with {why} has no Hugging Face equivalent fmjax writes (Mixtral, Qwen3-MoE).")
  return kind


def from_model_config(cfg: ModelConfig, template: dict | None = None, dtype: str = "float32") -> dict:
  """An HF config.json for `cfg`: `template` (an imported model's own config.json) with the shape fields
  replaced, or a fresh config of the family `cfg` needs (qwen3 for QK-norm, qwen2 for QKV bias, else llama). A score
  model (`cfg.num_labels`) is a `*ForSequenceClassification` with `num_labels` labels (the template's names when it
  has as many); its `pad_token_id` comes with the tokenizer (`hf._write_tokenizer_files`). An MoE model is a
  Mixtral (qwen3_moe with QK-norm)."""
  moe = moe_family(cfg) if cfg.num_experts else None
  kind = template.get("model_type") if template else (
      moe or ("qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"))
  holds = {"llama": not cfg.qk_norm, "mistral": not (cfg.qk_norm or cfg.qkv_bias),
           "qwen2": cfg.qkv_bias and not cfg.qk_norm, "qwen3": cfg.qk_norm}
  holds = {k: v and not moe for k, v in holds.items()} | {k: k == moe for k in MOE_FAMILIES}
  if not holds.get(kind, False):
    raise UserError(f"model_type {kind!r} cannot hold a model with qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias}, "
                    f"num_experts={cfg.num_experts}.")
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
  if kind in ("llama", "qwen3", "qwen3_moe"):
    out["attention_bias"] = cfg.qkv_bias
  if kind == "llama":
    out["mlp_bias"] = False
  if kind in ("qwen2", "qwen3", "qwen3_moe"):
    out.setdefault("use_sliding_window", False)
  if moe:
    out.update(num_experts_per_tok=cfg.num_experts_per_tok, router_aux_loss_coef=cfg.moe_aux_loss)
    out.setdefault("output_router_logits", False)
  if kind == "mixtral":
    out["num_local_experts"] = cfg.num_experts
    out.setdefault("sliding_window", None)
  if kind == "qwen3_moe":  # num_experts as Qwen's checkpoints write it (transformers 4 reads only that name)
    out.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.mlp_dim, intermediate_size=(
                   (template or {}).get("intermediate_size") or cfg.mlp_dim),  # the width of dense layers: none here
               norm_topk_prob=cfg.moe_norm_topk, decoder_sparse_step=1, mlp_only_layers=[])
    if "num_local_experts" in out:
      out["num_local_experts"] = cfg.num_experts
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
