"""Analytical training FLOPs per token, the convention behind every MFU figure fmjax prints.

Convention (as MaxText): count matmul FLOPs only (2 per multiply-add) of the forward pass — attention projections,
SwiGLU, the unembedding or a score head's projection (the embedding lookup is a gather, not a matmul) and the two
attention matmuls QKᵀ and AV — then ×3 for forward + backward. Causal attention computes half of the T×T score
matrix, so its FLOPs are halved. A mixture-of-experts layer counts what one token uses: the router (D·E) and its k
routed experts plus the shared ones (3·D·mlp_dim each), not the idle experts; MFU of an MoE model is by active
parameters, as MaxText and the Mixtral / Qwen3-MoE reports count it. Recomputation from remat is NOT counted: this
is model FLOPs utilisation, not hardware FLOPs utilisation.
Over a frozen base (a parameterisation, fmjax/adapters) the base weights get no gradient, so the weight-gradient
third of the backward pass is not done: 4·N instead of 6·N; the parameterisation adds its own FLOPs
(`fmjax.adapters.train_flops_per_token`).
"""

from __future__ import annotations

from fmjax.model.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a matmul per token (all but the input embedding, unless it is tied; of an MoE
  layer the router and the experts a token is routed to)."""
  D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  experts = cfg.num_experts_per_tok + cfg.moe_shared_experts if cfg.num_experts else 1
  per_layer = D * N * H + 2 * D * K * H + N * H * D + experts * 3 * D * F + D * cfg.num_experts
  return cfg.num_layers * per_layer + D * (cfg.num_labels or cfg.vocab_size)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, frozen_weights: bool = False) -> float:
  """Forward + backward FLOPs per trained token: 6·(matmul params) + 3·(causal attention FLOPs); 4·(matmul params)
  when the weights are frozen (a parameterisation over a frozen base: gradients flow through them but are not taken
  for them)."""
  attention_fwd = 4 * seq_len * cfg.num_heads * cfg.head_dim * cfg.num_layers / 2  # QKᵀ and AV, causal half
  return (4.0 if frozen_weights else 6.0) * matmul_params(cfg) + 3.0 * attention_fwd
