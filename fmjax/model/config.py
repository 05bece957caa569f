"""Model hyper-parameters and named presets.

A preset fixes a model's shape; `resolve` applies explicit overrides on top of it. Shapes of the Llama and Qwen
presets match their Hugging Face checkpoints one to one, so imported weights map without reshaping.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping
from fmjax.errors import UserError

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "projections", "qkv_proj")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-family decoder."""

  vocab_size: int = 512  # rows of the embedding; >= the tokenizer's vocabulary
  d_model: int = 64  # residual stream width
  num_layers: int = 2  # decoder blocks
  num_heads: int = 4  # query heads
  num_kv_heads: int = 2  # key/value heads (grouped-query attention); divides num_heads
  head_dim: int = 16  # width of one head (Qwen3 sets it independently of d_model)
  mlp_dim: int = 192  # SwiGLU hidden width
  rope_theta: float = 10_000.0  # RoPE base period
  rope_scaling_factor: float = 0.0  # Llama-3 frequency scaling factor; 0 = off
  rope_low_freq_factor: float = 1.0  # Llama-3 scaling: wavelengths above orig/low are divided by factor
  rope_high_freq_factor: float = 4.0  # Llama-3 scaling: wavelengths below orig/high are kept
  rope_original_max_len: int = 8192  # Llama-3 scaling: pre-training context length
  norm_eps: float = 1e-5  # RMSNorm epsilon
  qkv_bias: bool = False  # bias on q/k/v projections (Qwen2)
  qk_norm: bool = False  # RMSNorm on queries and keys per head (Qwen3)
  tie_embeddings: bool = False  # unembedding = embedding transposed
  init_std: float = 0.02  # normal init scale; output projections are further scaled by 1/sqrt(2 * num_layers)
  dtype: str = "float32"  # compute dtype of activations and matmuls (logits and softmax are always float32)
  param_dtype: str = "float32"  # storage dtype of parameters
  scan_layers: bool = True  # nn.scan over blocks: compile time flat in depth
  remat: str = "none"  # rematerialisation: none | full | dots | dots_no_batch | projections | qkv_proj (saved outputs)
  # default | int8: the attention and MLP projections' matmuls in int8, forward and backward (AQT style: each operand
  # scaled per row/column by its absmax over the contracted dims, int32 accumulation; for TPU's int8 MXU rate)
  matmul: str = "default"
  # auto (splash on TPU where it applies, else xla) | xla | cudnn (GPU; jax.nn.dot_product_attention) | splash (TPU
  # Pallas kernel; Pallas's interpret mode elsewhere, exact but slow)
  attention_impl: str = "auto"
  # under a context mesh axis: give each device a front and a back chunk of the sequence, so causal attention's work
  # is even (fmjax/model/context.py)
  context_load_balance: bool = True
  # output head: 0 = logits over the vocabulary (a language model); N > 0 = a score head, N float32 values per token
  # read at each sequence's last token (a reward model: 1; a classifier: the number of labels)
  num_labels: int = 0
  # the loss heads' unembedding + softmax, this many positions at a time, so the [B,T,V] float32 logits never exist
  # (token_stats.py); 0 = all at once
  loss_chunk: int = 0
  # mixture of experts (fmjax/model/moe.py): 0 = a dense SwiGLU; N = N routed SwiGLU experts of mlp_dim each
  num_experts: int = 0
  num_experts_per_tok: int = 2  # experts each token is routed to (top-k)
  moe_shared_experts: int = 0  # experts every token also passes through (DeepSeek), one SwiGLU of this × mlp_dim
  moe_norm_topk: bool = True  # renormalise the top-k router weights to sum to 1 (Mixtral; Qwen3's norm_topk_prob)
  moe_aux_loss: float = 0.01  # coefficient of the load-balancing loss added to the training loss
  moe_z_loss: float = 0.0  # coefficient of the router z-loss (mean logsumexp² of the router logits)
  moe_capacity_factor: float = 0.0  # 0 = dropless; > 0: each expert takes ceil(f · tokens · k / experts) per device
  moe_matmul: str = "auto"  # grouped matmul: auto (megablox on TPU, else ragged_dot) | ragged_dot | megablox

  def validate(self) -> "ModelConfig":
    """Raises UserError naming the field when the shape or a setting is impossible."""
    if self.num_heads % self.num_kv_heads:
      raise UserError(f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads="
                      f"{self.num_kv_heads} (grouped-query attention); change one of them.")
    if self.head_dim % 2:
      raise UserError(f"model.head_dim={self.head_dim} must be even for RoPE.")
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"model.remat={self.remat!r} is not one of {REMAT_POLICIES}.")
    if self.matmul not in ("default", "int8"):
      raise UserError(f"model.matmul={self.matmul!r}: use 'default' (the compute dtype) or 'int8' (quantized "
                      "projection matmuls, forward and backward).")
    if self.attention_impl not in ("auto", "xla", "cudnn", "splash"):
      raise UserError(f"model.attention_impl={self.attention_impl!r}: use 'auto' (splash on TPU, else xla), 'xla' "
                      "(any device), 'cudnn' (GPU) or 'splash' (TPU).")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
      if getattr(self, name) <= 0:
        raise UserError(f"model.{name}={getattr(self, name)} must be positive.")
    for name, what in (("rope_theta", "the RoPE base period"), ("norm_eps", "the RMSNorm epsilon"),
                       ("init_std", "the init scale"), ("rope_original_max_len", "a length in tokens")):
      if not getattr(self, name) > 0:
        raise UserError(f"model.{name}={getattr(self, name)} must be > 0 ({what}).")
    if self.rope_scaling_factor < 0:
      raise UserError(f"model.rope_scaling_factor={self.rope_scaling_factor} must be >= 0 (0 = no Llama-3 scaling).")
    if self.rope_scaling_factor and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
      raise UserError(f"model.rope_low_freq_factor={self.rope_low_freq_factor} and model.rope_high_freq_factor="
                      f"{self.rope_high_freq_factor} must satisfy 0 < low < high (Llama-3 RoPE scaling).")
    if self.loss_chunk < 0:
      raise UserError(f"model.loss_chunk={self.loss_chunk} must be >= 0 (positions per unembedding chunk; 0 = all).")
    if self.num_labels < 0:
      raise UserError(f"model.num_labels={self.num_labels} must be >= 0 (0 = a language model's vocabulary logits, "
                      "1 = a reward model's score, N = a classifier's N labels).")
    if self.num_experts < 0 or self.moe_shared_experts < 0:
      raise UserError(f"model.num_experts={self.num_experts} and model.moe_shared_experts={self.moe_shared_experts} "
                      "must be >= 0 (num_experts=0: a dense feed-forward).")
    if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise UserError(f"model.num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                      f"model.num_experts={self.num_experts}.")
    for name in ("moe_aux_loss", "moe_z_loss", "moe_capacity_factor"):
      if not getattr(self, name) >= 0:
        raise UserError(f"model.{name}={getattr(self, name)} must be >= 0.")
    if self.moe_matmul not in ("auto", "ragged_dot", "megablox"):
      raise UserError(f"model.moe_matmul={self.moe_matmul!r}: use 'auto' (megablox on TPU, else ragged_dot), "
                      "'ragged_dot' or 'megablox'.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise UserError(f"model.{name}={getattr(self, name)!r} is not one of {DTYPES}.")
    return self


def loss_chunk_for(vocab_size: int) -> int:
  """The chunk the large-vocabulary presets and imported models start with: with 64k entries or more the float32
  logits dominate activation memory (Llama-3-8B at 8 x 4096 tokens per chip: 15.7 GiB of them), so the loss heads
  take 512 positions at a time; smaller vocabularies keep one pass, which skips the chunks' recomputed unembedding."""
  return 512 if vocab_size >= 65_536 else 0


_LLAMA3 = dict(vocab_size=128_256, loss_chunk=loss_chunk_for(128_256), rope_theta=500_000.0, rope_scaling_factor=8.0,
               rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192, head_dim=128)
_QWEN = dict(vocab_size=151_936, loss_chunk=loss_chunk_for(151_936), rope_theta=1_000_000.0, norm_eps=1e-6,
             tie_embeddings=True)

_MIXTRAL = dict(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                mlp_dim=14_336, rope_theta=1_000_000.0, num_experts=8, num_experts_per_tok=2, moe_aux_loss=0.02)

PRESETS: dict[str, ModelConfig] = {
    # Tiny: tests and `:smoke` runs.
    "smoke": ModelConfig(),
    # Every field given explicitly (`model.*`), as an imported Hugging Face model's config.json does.
    "custom": ModelConfig(),
    # ~34M parameters: the CPU default and the fixed benchmark shape.
    "small": ModelConfig(vocab_size=8192, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                         mlp_dim=1536),
    # ~125M (GPT-3 Small width/depth, Llama blocks).
    "125m": ModelConfig(vocab_size=32_000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                        mlp_dim=2048),
    # Llama-3.2-1B.
    "1b": ModelConfig(**{**_LLAMA3, "rope_scaling_factor": 32.0, "head_dim": 64}, d_model=2048, num_layers=16,
                      num_heads=32, num_kv_heads=8, mlp_dim=8192, tie_embeddings=True),
    # Llama-3.1-8B.
    "llama3_8b": ModelConfig(**_LLAMA3, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14_336),
    # Llama-3.1-70B.
    "llama3_70b": ModelConfig(**_LLAMA3, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8, mlp_dim=28_672),
    # Qwen2.5-0.5B: QKV bias, tied embeddings.
    "qwen2_0_5b": ModelConfig(**_QWEN, d_model=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                              mlp_dim=4864, qkv_bias=True),
    # Qwen3-0.6B: QK-norm, head_dim independent of d_model.
    "qwen3_0_6b": ModelConfig(**_QWEN, d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                              mlp_dim=3072, qk_norm=True),
    # Mixture of experts, ~12M parameters (4M active): 8 experts, top-2, trains on a CPU in minutes.
    "small_moe": ModelConfig(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                             mlp_dim=512, num_experts=8, num_experts_per_tok=2, moe_z_loss=1e-3),
    # Mixtral-8x7B: 8 experts of 14336, top-2, softmax over the top 2.
    "mixtral_8x7b": ModelConfig(**_MIXTRAL),
    # Qwen3-30B-A3B: 128 fine-grained experts of 768, top-8, QK-norm.
    "qwen3_moe_30b_a3b": ModelConfig(**{**_QWEN, "tie_embeddings": False}, d_model=2048, num_layers=48, num_heads=32,
                                     num_kv_heads=4, head_dim=128, mlp_dim=768, qk_norm=True, num_experts=128,
                                     num_experts_per_tok=8, moe_aux_loss=0.001),
}


def resolve(name: str, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
  """Returns preset `name` with every non-None value of `overrides` applied, validated."""
  if name not in PRESETS:
    raise UserError(f"model.name={name!r} is not a preset; choose one of {sorted(PRESETS)}.")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise UserError(f"model.{unknown[0]} is not a model field; known fields: {sorted(fields)}.")
  return dataclasses.replace(PRESETS[name], **overrides).validate()
