"""LoRA adapters in Hugging Face PEFT's format: `adapter_model.safetensors` + `adapter_config.json`.

fmjax's blocks are Llama's (the Llama and Qwen presets map one to one onto Hugging Face checkpoints), so the
adapters take the `transformers` module names: `layers/attn/q_kernel` → `model.layers.{i}.self_attn.q_proj`,
`layers/mlp/down_kernel` → `model.layers.{i}.mlp.down_proj`, `unembed` → `lm_head`. PEFT stores `lora_A.weight` as
[r, in_features] and `lora_B.weight` as [out_features, r], with heads flattened head-major (index = head·head_dim + d),
which is the order of fmjax's [heads, head_dim] axes.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from flax import traverse_util

from fmjax.adapters.lora import LoraConfig
from fmjax.errors import UserError

HF_MODULES = {"attn/q_kernel": "self_attn.q_proj", "attn/k_kernel": "self_attn.k_proj",
              "attn/v_kernel": "self_attn.v_proj", "attn/o_kernel": "self_attn.o_proj",
              "mlp/gate_kernel": "mlp.gate_proj", "mlp/up_kernel": "mlp.up_proj", "mlp/down_kernel": "mlp.down_proj"}
PREFIX = "base_model.model."


def check_exportable(adapter: Any, workdir: str) -> None:
  """PEFT's adapter files hold LoRA adapters only."""
  if not isinstance(adapter, LoraConfig):
    raise UserError(f"{workdir} is a {adapter.title} run; PEFT adapter export is for LoRA runs.")


def _matrices(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(lora_A [r, in], lora_B [out, r]) of one layer's adapters A [in…, r], B [r, out…]."""
  r = a.shape[-1]
  return a.reshape(-1, r).T, b.reshape(r, -1).T


def to_peft(adapters: Any, num_layers: int) -> dict[str, np.ndarray]:
  """PEFT tensor name → float32 array, for the adapter tree of a model (layer-scanned or not)."""
  out = {}
  flat = traverse_util.flatten_dict(adapters, sep="/")
  for path, a in flat.items():
    if not path.endswith("_lora_a"):
      continue
    kernel = path[:-len("_lora_a")]
    a, b = np.asarray(a), np.asarray(flat[kernel + "_lora_b"])
    if kernel == "unembed":
      la, lb = _matrices(a, b)
      out[PREFIX + "lm_head.lora_A.weight"], out[PREFIX + "lm_head.lora_B.weight"] = la, lb
      continue
    layer, module = kernel.split("/", 1)
    if layer == "layers":  # scanned: a leading layers axis
      per_layer = [(i, a[i], b[i]) for i in range(num_layers)]
    else:
      per_layer = [(int(re.fullmatch(r"layers_(\d+)", layer).group(1)), a, b)]
    for i, ai, bi in per_layer:
      la, lb = _matrices(ai, bi)
      name = f"{PREFIX}model.layers.{i}.{HF_MODULES[module]}"
      out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = la, lb
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(out.items())}


def adapter_config(tensors: dict[str, np.ndarray], lora_cfg: LoraConfig, num_layers: int,
                   base_model: str | None = None) -> dict:
  """PEFT's `adapter_config.json` for `tensors`."""
  modules = sorted({k.rsplit(".", 2)[0].rsplit(".", 1)[-1] for k in tensors})
  layers = sorted({int(m.group(1)) for k in tensors if (m := re.search(r"\.layers\.(\d+)\.", k))})
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha,
          "lora_dropout": lora_cfg.dropout, "use_rslora": lora_cfg.rslora, "target_modules": modules,
          "layers_to_transform": None if len(layers) in (0, num_layers) else layers, "bias": "none",
          "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
          "base_model_name_or_path": base_model}


def save(output: str, adapters: Any, lora_cfg: LoraConfig, num_layers: int, base_model: str | None = None) -> dict:
  """Writes the PEFT adapter directory `output`; returns its config."""
  from safetensors.numpy import save_file

  tensors = to_peft(adapters, num_layers)
  config = adapter_config(tensors, lora_cfg, num_layers, base_model)
  os.makedirs(output, exist_ok=True)
  save_file(tensors, os.path.join(output, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(output, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return config


def delta_hf(tensors: dict[str, np.ndarray], module: str, scale: float) -> np.ndarray:
  """s · lora_B @ lora_A of one PEFT module ([out, in], as PEFT adds it to the Linear weight)."""
  a, b = tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"]
  return scale * (b.astype(np.float64) @ a.astype(np.float64))
