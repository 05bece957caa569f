"""The Llama-family decoder: embedding, scanned pre-norm blocks, final norm, float32 logits; optionally over a KV
cache for decoding (`init_cache`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.model.config import ModelConfig
from fmjax.adapters.base import Adapter, combine, split
from fmjax.model import context, projection, splash, token_stats
from fmjax.model.moe import MoE
from fmjax.model.layers import (ACT_BTD, PROJECTIONS, Attention, RMSNorm, SwiGLU, attention_mask, cache_mask,
                                constrain, project, rope_tables, stored_quantized)
from fmjax.quant import Quantized

_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # by name (layers.project names each projection's output after its kernel): the attention scores, softmax,
    # norms and activations are recomputed
    "projections": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS),
    "qkv_proj": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS[:3]),
}


class Block(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(x)). Returns (x, this layer's new cache or None) so it can be scanned."""

  cfg: ModelConfig
  adapter: Adapter | None = None

  @nn.compact
  def __call__(self, x_BxTxD, mask, sin, cos, valid_BxT, adapter_inputs=None, layer_params=None, cache=None,
               positions_BxT=None):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
    attn_BxTxD, cache = Attention(cfg, self.adapter, name="attn")(norm("attn_norm")(x_BxTxD), mask, sin, cos, cache,
                                                                  positions_BxT)
    x_BxTxD = x_BxTxD + attn_BxTxD
    if cfg.num_experts:
      x_BxTxD = x_BxTxD + MoE(cfg, self.adapter, name="moe")(norm("mlp_norm")(x_BxTxD), valid_BxT)
    else:
      x_BxTxD = x_BxTxD + SwiGLU(cfg, self.adapter, name="mlp")(norm("mlp_norm")(x_BxTxD))
    if self.adapter is not None:
      x_BxTxD = self.adapter.block_output(self, x_BxTxD, layer_params, adapter_inputs)
    return constrain(x_BxTxD, ACT_BTD), cache


class Transformer(nn.Module):
  """`apply({'params': p}, tokens, segment_ids, positions) -> logits [B,T,V]` in float32 (with `cfg.num_labels`,
  scores [B,T,num_labels] from a score head instead of the unembedding). With an `adapter` (a
  parameterisation, fmjax/adapters/) the projections and block outputs go through its hooks, `adapter_inputs` holds
  the per-token batch columns it declares, and its dropout is active when a 'dropout' rng is given.

  With `cache` (from `init_cache`) it returns (logits, new_cache): each row is one sequence whose new keys/values go
  to the cache slots of their `positions`, and a token at position p attends to the slots s <= p of its row
  (`segment_ids` are not used). Right-padded rows of different lengths thus decode together: a row's next token
  overwrites the slot after its last one, and stale slots beyond a row's position stay masked.

  With `targets_BxT` it returns the `token_stats.TokenStats` of the next-token distribution instead of logits (with
  the `extra_stats` named), the unembedding fused with the softmax `cfg.loss_chunk` positions at a time (0: all at
  once). `return_hidden` adds the final hidden states [B,T,D] (after the final norm): (logits or stats, hidden)."""

  cfg: ModelConfig
  adapter: Adapter | None = None

  def __call__(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array, positions_BxT: jax.Array,
               return_hidden: bool = False, cache: dict | None = None, adapter_inputs: dict | None = None,
               targets_BxT: jax.Array | None = None, temperature: float = 1.0, extra_stats: tuple[str, ...] = ()):
    split = None if cache is not None else context.plan(tokens_BxT.shape[1], self.cfg.context_load_balance)
    balanced = bool(split and split.balanced)
    if balanced:  # each context device a front and a back chunk (context.py); undone on the way out
      order = lambda a: None if a is None else context.balance(a, split.shards)  # noqa: E731
      tokens_BxT, segment_ids_BxT, positions_BxT, targets_BxT = map(
          order, (tokens_BxT, segment_ids_BxT, positions_BxT, targets_BxT))
      adapter_inputs = jax.tree.map(order, adapter_inputs)
    out = self._forward(tokens_BxT, segment_ids_BxT, positions_BxT, return_hidden, cache, adapter_inputs,
                        targets_BxT, temperature, extra_stats, split)
    return jax.tree.map(lambda a: context.unbalance(a, split.shards), out) if balanced else out

  @nn.compact
  def _forward(self, tokens_BxT, segment_ids_BxT, positions_BxT, return_hidden, cache, adapter_inputs, targets_BxT,
               temperature, extra_stats, split):
    cfg = self.cfg
    embedding_VxD = stored_quantized(self, "embedding")  # a frozen model's table may be stored quantized
    if embedding_VxD is None:
      embedding_VxD = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                           ("vocab", "embed")),
                                 (cfg.vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype))
      x_BxTxD = jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(cfg.dtype)
    else:
      x_BxTxD = embedding_VxD.take(tokens_BxT, cfg.dtype)
    x_BxTxD = constrain(x_BxTxD, ACT_BTD)
    if cache is not None:
      mask = cache_mask(positions_BxT, cache["k"].shape[2])
    elif splash.applies(cfg.attention_impl, tokens_BxT.shape[1], cfg.num_kv_heads, split=split):
      mask = segment_ids_BxT  # the kernel applies the mask
    else:  # other lengths (e.g. scoring a prompt) take the XLA path
      index = context.original_index(tokens_BxT.shape[1], split.shards) if split and split.balanced else None
      mask = attention_mask(segment_ids_BxT, index)
    sin, cos = rope_tables(positions_BxT, cfg)
    valid_BxT = segment_ids_BxT > 0  # the tokens MoE router statistics count (padding is not routed load)
    extra = () if cache is None else (cache, positions_BxT)  # the training forward keeps its exact signature
    layer_params = None if self.adapter is None else self.adapter.layer_params(self, cfg.num_layers)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      in_axes = (nn.broadcast,) * 5 + (0,) + (() if cache is None else (0, nn.broadcast))
      stack = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=in_axes, length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxTxD, cache = stack(cfg, self.adapter, name="layers")(x_BxTxD, mask, sin, cos, valid_BxT, adapter_inputs,
                                                               layer_params, *extra)
    else:
      layer_caches = []
      for i in range(cfg.num_layers):
        extra_i = () if cache is None else (jax.tree.map(lambda c, i=i: c[i], cache), positions_BxT)
        params_i = jax.tree.map(lambda p, i=i: p[i], layer_params)
        x_BxTxD, layer_cache = block(cfg, self.adapter, name=f"layers_{i}")(x_BxTxD, mask, sin, cos, valid_BxT,
                                                                            adapter_inputs, params_i, *extra_i)
        layer_caches.append(layer_cache)
      if cache is not None:
        cache = jax.tree.map(lambda *c: jnp.stack(c), *layer_caches)

    h_BxTxD = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x_BxTxD)
    if cfg.num_labels:  # a score head: [B,T,num_labels], read at a sequence's last token (objectives/scores.py)
      score_DxK = self.param("score", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                   ("embed", "labels")),
                             (cfg.d_model, cfg.num_labels), jnp.dtype(cfg.param_dtype))
      logits_BxTxV = projection.einsum("BTD,DK->BTK", h_BxTxD, score_DxK.astype(cfg.dtype), jnp.float32)
      logits_BxTxV = constrain(logits_BxTxV, ("act_batch", "act_len", None))
    else:
      if cfg.tie_embeddings:
        unembed_DxV = embedding_VxD.kernel() if isinstance(embedding_VxD, Quantized) else embedding_VxD.T
      else:
        unembed_DxV = stored_quantized(self, "unembed")
        if unembed_DxV is None:
          unembed_DxV = self.param("unembed", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                          ("embed", "vocab")),
                                   (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype))
      adapter = None if cfg.tie_embeddings else self.adapter
      if targets_BxT is not None and not (adapter and adapter.changes_projection(self, "unembed")):
        # fused with the unembedding, a chunk at a time: the [B,T,V] logits never exist
        if isinstance(unembed_DxV, Quantized):
          unembed_DxV = unembed_DxV.kernel(cfg.dtype)
        stats = token_stats.unembed_stats(h_BxTxD, unembed_DxV, targets_BxT, cfg.loss_chunk, cfg.dtype, temperature,
                                          extra_stats)
        return (stats, h_BxTxD) if return_hidden else stats
      logits_BxTxV = project(self, adapter, "unembed", "BTD,DV->BTV", h_BxTxD,
                             unembed_DxV if isinstance(unembed_DxV, Quantized) else unembed_DxV.astype(cfg.dtype),
                             ("embed", "vocab"), out_dtype=jnp.float32)
      logits_BxTxV = constrain(logits_BxTxV, ("act_batch", "act_len", "act_vocab"))
    if targets_BxT is not None:
      stats = token_stats.from_logits(logits_BxTxV, targets_BxT, temperature, extra_stats)
      return (stats, h_BxTxD) if return_hidden else stats
    out = (logits_BxTxV, h_BxTxD) if return_hidden else logits_BxTxV
    return out if cache is None else (out, cache)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> dict:
  """An empty KV cache for `batch` rows of up to `max_len` positions: {'k', 'v'} [L,B,S,K,H] in `dtype` (default
  the compute dtype), stacked over layers with or without layer scan."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = jnp.dtype(dtype or cfg.dtype)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def init_params(cfg: ModelConfig, rng: jax.Array, boxed: bool = False, adapter: Adapter | None = None):
  """Fresh parameters (with `adapter`, its parameters included): a plain pytree, or with `boxed` the
  logically-partitioned Flax boxes (for shardings)."""
  dummy = jnp.ones((1, 1), jnp.int32)
  params = Transformer(cfg).init(rng, dummy, dummy, jnp.zeros_like(dummy))["params"]
  if adapter is not None:  # its parameters from their own init, so the base is the same with or without them
    inputs = {c: jnp.zeros_like(dummy) for c in adapter.columns}
    with_adapter = Transformer(cfg, adapter).init(jax.random.fold_in(rng, 1), dummy, dummy, jnp.zeros_like(dummy),
                                                  adapter_inputs=inputs)
    params = combine(params, split(adapter, with_adapter["params"])[0])
  return params if boxed else nn.unbox(params)
