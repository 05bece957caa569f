"""The Llama-family decoder: embedding, scanned pre-norm blocks, final norm, float32 logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.model.config import ModelConfig
from fmjax.model.lora import LoraConfig, combine, project, split
from fmjax.model.layers import ACT_BTD, Attention, RMSNorm, SwiGLU, attention_mask, constrain, rope_tables

_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(x)). Returns (x, None) so it can be scanned."""

  cfg: ModelConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x_BxTxD, mask, sin, cos):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
    x_BxTxD = x_BxTxD + Attention(cfg, self.lora, name="attn")(norm("attn_norm")(x_BxTxD), mask, sin, cos)
    x_BxTxD = x_BxTxD + SwiGLU(cfg, self.lora, name="mlp")(norm("mlp_norm")(x_BxTxD))
    return constrain(x_BxTxD, ACT_BTD), None


class Transformer(nn.Module):
  """`apply({'params': p}, tokens, segment_ids, positions) -> logits [B,T,V]` in float32. With `lora`, the targeted
  projections carry low-rank adapters (fmjax/model/lora.py); LoRA dropout is active when a 'dropout' rng is given."""

  cfg: ModelConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array, positions_BxT: jax.Array,
               return_hidden: bool = False):
    cfg = self.cfg
    embedding_VxD = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                         ("vocab", "embed")),
                               (cfg.vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype))
    x_BxTxD = constrain(jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(cfg.dtype), ACT_BTD)
    mask = attention_mask(segment_ids_BxT)
    sin, cos = rope_tables(positions_BxT, cfg)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxTxD, _ = stack(cfg, self.lora, name="layers")(x_BxTxD, mask, sin, cos)
    else:
      for i in range(cfg.num_layers):
        x_BxTxD, _ = block(cfg, self.lora, name=f"layers_{i}")(x_BxTxD, mask, sin, cos)

    h_BxTxD = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x_BxTxD)
    if cfg.tie_embeddings:
      unembed_DxV = embedding_VxD.T
    else:
      unembed_DxV = self.param("unembed", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                      ("embed", "vocab")),
                               (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype))
    logits_BxTxV = project(self, "unembed", "BTD,DV->BTV", h_BxTxD, unembed_DxV.astype(cfg.dtype), ("embed", "vocab"),
                           None if cfg.tie_embeddings else self.lora, out_dtype=jnp.float32)
    logits_BxTxV = constrain(logits_BxTxV, ("act_batch", "act_len", "act_vocab"))
    return (logits_BxTxV, h_BxTxD) if return_hidden else logits_BxTxV


def init_params(cfg: ModelConfig, rng: jax.Array, boxed: bool = False, lora: LoraConfig | None = None):
  """Fresh parameters (with `lora`, adapters included): a plain pytree, or with `boxed` the logically-partitioned
  Flax boxes (for shardings)."""
  dummy = jnp.ones((1, 1), jnp.int32)
  params = Transformer(cfg).init(rng, dummy, dummy, jnp.zeros_like(dummy))["params"]
  if lora is not None:  # adapters from their own init, so the base is the same with or without them
    with_adapters = Transformer(cfg, lora).init(jax.random.fold_in(rng, 1), dummy, dummy, jnp.zeros_like(dummy))
    params = combine(params, split(with_adapters["params"])[0])
  return params if boxed else nn.unbox(params)
