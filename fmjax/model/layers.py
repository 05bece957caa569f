"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Every parameter carries logical axis names and activations get logical sharding constraints; mesh axes never appear
here (rules in the config map logical names to mesh axes). Shapes are in names: `x_BxTxD`, `q_BxTxNxH`.

Attention optionally reads and writes a KV cache (`k`, `v` [B,S,K,H] per layer): each new key/value goes to the slot
of its absolute position, and a query at position p attends to the slots s <= p of its row (`cache_mask`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from fmjax.model import context, projection, splash, xla_attention
from fmjax.model.config import ModelConfig
from fmjax.adapters.base import Adapter
from fmjax.quant import Quantized

constrain = nn.with_logical_constraint
ACT_BTD = ("act_batch", "act_len", "act_embed")


def stored_quantized(module: nn.Module, name: str) -> Quantized | None:
  """Parameter `name` of `module` where it is stored quantized (a frozen model's, fmjax/quant), else None."""
  if module.has_variable("params", name):
    stored = module.get_variable("params", name)
    if isinstance(stored, Quantized):
      return stored
  return None


def dense_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
                std: float | None = None) -> jax.Array:
  """A normally initialised kernel with logical axes, cast to the compute dtype; a quantized frozen kernel
  (fmjax/quant) as stored, for the projection to dequantize."""
  stored = stored_quantized(module, name)
  if stored is not None:
    return stored
  init = nn.initializers.normal(cfg.init_std if std is None else std)
  w = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype))
  return w.astype(cfg.dtype)


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, computed in float32."""

  eps: float
  dtype: str
  param_dtype: str
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), jnp.dtype(self.param_dtype))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [head_dim/2], with Llama-3 wavelength-dependent scaling when enabled."""
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
  if cfg.rope_scaling_factor <= 0:
    return inv_freq
  wavelen = 2 * math.pi / inv_freq
  low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
  high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
  smooth = ((cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor)
            / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
  mid = (1 - smooth) * inv_freq / cfg.rope_scaling_factor + smooth * inv_freq
  out = jnp.where(wavelen > low_wavelen, inv_freq / cfg.rope_scaling_factor, inv_freq)
  return jnp.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), mid, out)


def rope_tables(positions_BxT: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(sin, cos) [B,T,head_dim/2] in float32 for the given absolute positions."""
  angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
  return jnp.sin(angles_BxTxF), jnp.cos(angles_BxTxF)


def apply_rope(x_BxTxNxH: jax.Array, sin_BxTxF: jax.Array, cos_BxTxF: jax.Array) -> jax.Array:
  """Rotates halves (Hugging Face / Llama layout: pairs are (i, i + H/2)), in float32."""
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  sin, cos = sin_BxTxF[:, :, None, :], cos_BxTxF[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def attention_mask(segment_ids_BxT: jax.Array, index_T=None) -> jax.Array:
  """[B,1,T,T] bool: query t sees key s iff s <= t and both lie in the same segment. `index_T`: each position's
  original index when they are reordered (context.balance), which the causal order follows."""
  T = segment_ids_BxT.shape[1]
  if index_T is None:
    causal_TxT = jnp.tril(jnp.ones((T, T), dtype=jnp.bool_))
  else:
    causal_TxT = index_T[:, None] >= index_T[None, :]
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return constrain((same_BxTxT & causal_TxT)[:, None, :, :], ("act_batch", None, "act_len", None))


def cache_mask(positions_BxT: jax.Array, cache_len: int) -> jax.Array:
  """[B,1,T,S] bool: with a KV cache, the query at position p sees cache slots s <= p of its own row."""
  return (jnp.arange(cache_len)[None, None, :] <= positions_BxT[:, :, None])[:, None]


def write_cache(cache_BxSxKxH: jax.Array, x_BxTxKxH: jax.Array, positions_BxT: jax.Array) -> jax.Array:
  """The cache with row b's new entries written at slots positions[b] (slot = absolute position)."""
  rows_Bx1 = jnp.arange(x_BxTxKxH.shape[0])[:, None]
  return cache_BxSxKxH.at[rows_Bx1, positions_BxT].set(x_BxTxKxH.astype(cache_BxSxKxH.dtype))


PROJECTIONS = ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "gate_kernel", "up_kernel", "down_kernel")


def int8_matmul(module: nn.Module, name: str) -> bool:
  """Whether projection `name` of `module` multiplies in int8 (model.matmul=int8: the attention and MLP kernels)."""
  return name in PROJECTIONS and getattr(module, "cfg", None) is not None and module.cfg.matmul == "int8"


def project(module: nn.Module, adapter: Adapter | None, name: str, spec: str, x: jax.Array, w: jax.Array,
            axes: tuple[str, ...], out_dtype=None) -> jax.Array:
  """The projection hook: einsum(spec, x, w) for kernel `name` of `module`, as the active parameterisation computes
  it (`axes`: the kernel's logical axis names). The output is named `name` for the remat policies that save it."""
  if adapter is None or not adapter.changes_projection(module, name):
    out = projection.apply(spec, x, w, out_dtype, int8=int8_matmul(module, name))
  else:
    out = adapter.project(module, name, spec, x, w, axes, out_dtype)
  return checkpoint_name(out, name)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, optional QKV bias and QK-norm. With `cache` ({'k', 'v'} [B,S,K,H]) the
  new keys/values are written at `positions` and the queries attend to all S cache slots under the mask; it returns
  (out, new_cache) then, else (out, None) with S = T."""

  cfg: ModelConfig
  adapter: Adapter | None = None

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, mask_Bx1xTxS: jax.Array, sin: jax.Array, cos: jax.Array,
               cache: dict | None = None, positions_BxT: jax.Array | None = None):
    cfg = self.cfg
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    wq = dense_param(self, "q_kernel", (D, N, H), ("embed", "heads", "head_dim"), cfg)
    wk = dense_param(self, "k_kernel", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
    wv = dense_param(self, "v_kernel", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
    wo = dense_param(self, "o_kernel", (N, H, D), ("heads", "head_dim", "embed"), cfg,
                     std=cfg.init_std / math.sqrt(2 * cfg.num_layers))
    proj = lambda name, spec, x, w, axes: project(self, self.adapter, name, spec, x, w, axes)  # noqa: E731
    q_BxTxNxH = proj("q_kernel", "BTD,DNH->BTNH", x_BxTxD, wq, ("embed", "heads", "head_dim"))
    k_BxTxKxH = proj("k_kernel", "BTD,DKH->BTKH", x_BxTxD, wk, ("embed", "kv_heads", "head_dim"))
    v_BxTxKxH = proj("v_kernel", "BTD,DKH->BTKH", x_BxTxD, wv, ("embed", "kv_heads", "head_dim"))
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      bias = lambda name, shape, axes: self.param(  # noqa: E731
          name, nn.with_logical_partitioning(zeros, axes), shape, jnp.dtype(cfg.param_dtype)).astype(cfg.dtype)
      q_BxTxNxH += bias("q_bias", (N, H), ("heads", "head_dim"))
      k_BxTxKxH += bias("k_bias", (K, H), ("kv_heads", "head_dim"))
      v_BxTxKxH += bias("v_bias", (K, H), ("kv_heads", "head_dim"))
    if cfg.qk_norm:
      q_BxTxNxH = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, "head_dim", name="q_norm")(q_BxTxNxH)
      k_BxTxKxH = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, "head_dim", name="k_norm")(k_BxTxKxH)
    q_BxTxNxH = constrain(apply_rope(q_BxTxNxH, sin, cos), ("act_batch", "act_len", "act_heads", None))
    k_BxTxKxH = constrain(apply_rope(k_BxTxKxH, sin, cos), ("act_batch", "act_len", "act_kv_heads", None))
    v_BxTxKxH = constrain(v_BxTxKxH, ("act_batch", "act_len", "act_kv_heads", None))
    k_BxSxKxH, v_BxSxKxH = k_BxTxKxH, v_BxTxKxH
    split = None if cache is not None else context.plan(x_BxTxD.shape[1], cfg.context_load_balance)
    if cache is not None:
      cache = {"k": write_cache(cache["k"], k_BxTxKxH, positions_BxT),
               "v": write_cache(cache["v"], v_BxTxKxH, positions_BxT)}
      k_BxSxKxH, v_BxSxKxH = cache["k"].astype(q_BxTxNxH.dtype), cache["v"].astype(q_BxTxNxH.dtype)
    if mask_Bx1xTxS.ndim == 2:  # splash: the [B,T] segment ids stand for the causal, per-segment mask
      out_BxTxNxH = splash.attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, split)
    else:
      impl = "cudnn" if cfg.attention_impl == "cudnn" else "xla"  # decoding with a cache; lengths splash skips
      if split:  # every key on each device of the context group, the queries stay split (context.py)
        k_BxSxKxH, v_BxSxKxH = (constrain(a, ("act_batch", None, "act_kv_heads", None)) for a in (k_BxSxKxH, v_BxSxKxH))
      out_BxTxNxH = xla_attention.attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS,
                                            causal=cache is None and not split, implementation=impl)
    out_BxTxD = proj("o_kernel", "BTNH,NHD->BTD", out_BxTxNxH, wo, ("heads", "head_dim", "embed"))
    return constrain(out_BxTxD, ACT_BTD), cache


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, whose backward pass keeps only gate and up: jax's own rule for it also saves sigmoid(gate),
  silu(gate) and a product, three more [B, T, F] arrays that a layer scan stacks per layer (4% of a CPU train
  step at the fixed shape)."""
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dy):
  gate, up = residuals
  g, dy32 = gate.astype(jnp.float32), dy.astype(jnp.float32)
  sig = jax.nn.sigmoid(g)
  dgate = dy32 * up.astype(jnp.float32) * sig * (1 + g * (1 - sig))  # d silu(g) / dg = sig + g sig (1 - sig)
  return dgate.astype(gate.dtype), (dy32 * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x))."""

  cfg: ModelConfig
  adapter: Adapter | None = None

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    D, F = cfg.d_model, cfg.mlp_dim
    w_gate = dense_param(self, "gate_kernel", (D, F), ("embed", "mlp"), cfg)
    w_up = dense_param(self, "up_kernel", (D, F), ("embed", "mlp"), cfg)
    w_down = dense_param(self, "down_kernel", (F, D), ("mlp", "embed"), cfg,
                         std=cfg.init_std / math.sqrt(2 * cfg.num_layers))
    proj = lambda name, spec, x, w, axes: project(self, self.adapter, name, spec, x, w, axes)  # noqa: E731
    gate_BxTxF = proj("gate_kernel", "BTD,DF->BTF", x_BxTxD, w_gate, ("embed", "mlp"))
    h_BxTxF = swiglu(gate_BxTxF, proj("up_kernel", "BTD,DF->BTF", x_BxTxD, w_up, ("embed", "mlp")))
    h_BxTxF = constrain(h_BxTxF, ("act_batch", "act_len", "act_mlp"))
    return constrain(proj("down_kernel", "BTF,FD->BTD", h_BxTxF, w_down, ("mlp", "embed")), ACT_BTD)
