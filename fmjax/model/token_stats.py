"""Per-token statistics of the next-token distribution (the target's log-prob, the log-partition, the greedy token,
the entropy) from logits, or fused with the unembedding so the [B,T,V] float32 logits never exist.

The fused form (`unembed_stats` with `chunk`) maps over sequence chunks of the final hidden states; each chunk's
logits [B,C,V] are recomputed in the backward pass (`jax.checkpoint`), so forward and backward hold one chunk's
logits at a time: B·C·V·4 bytes instead of B·T·V·4 (Llama-3's vocabulary: 4 GiB per 8k tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.model import projection


EXTRA = ("argmax", "entropy")  # computed only when a head asks for them (from_logits says why)


class TokenStats(NamedTuple):
  """Each [B,T], float32 except `argmax` (int32), under softmax(logits / temperature)."""
  logp: jax.Array  # log-probability of the target token
  logz: jax.Array  # log-partition of logits / temperature
  argmax: jax.Array | None = None  # the greedy token, when asked for
  entropy: jax.Array | None = None  # when asked for


def from_logits(logits_BxTxV: jax.Array, targets_BxT: jax.Array, temperature: float = 1.0,
                extra: tuple[str, ...] = ()) -> TokenStats:
  """The statistics of given logits, in float32; of `EXTRA`, only those named in `extra`: the compiler does not drop
  unused ones, and computing both for a head that reads neither kept 8 GiB more per chip alive (Llama-3-8B, 8 x 4096
  tokens per chip, logits in one pass)."""
  unknown = set(extra) - set(EXTRA)
  if unknown:
    raise ValueError(f"unknown token statistics {sorted(unknown)}; choose from {EXTRA}")
  z_BxTxV = logits_BxTxV.astype(jnp.float32)
  if temperature != 1.0:
    z_BxTxV = z_BxTxV / temperature
  logz_BxT = jax.nn.logsumexp(z_BxTxV, axis=-1)
  target_BxT = jnp.take_along_axis(z_BxTxV, targets_BxT[..., None], axis=-1)[..., 0] - logz_BxT
  argmax_BxT = jnp.argmax(z_BxTxV, axis=-1).astype(jnp.int32) if "argmax" in extra else None
  entropy_BxT = None
  if "entropy" in extra:
    logp_BxTxV = z_BxTxV - logz_BxT[..., None]
    entropy_BxT = -jnp.sum(jnp.exp(logp_BxTxV) * logp_BxTxV, axis=-1)
  return TokenStats(target_BxT, logz_BxT, argmax_BxT, entropy_BxT)


def unembed(h_BxTxD: jax.Array, w_DxV: jax.Array, dtype) -> jax.Array:
  """float32 logits of hidden states under the unembedding, the matmul in the compute `dtype`."""
  logits = projection.einsum("BTD,DV->BTV", h_BxTxD, w_DxV.astype(dtype), jnp.float32)
  return nn.with_logical_constraint(logits, ("act_batch", "act_len", "act_vocab"))


def unembed_stats(h_BxTxD: jax.Array, w_DxV: jax.Array, targets_BxT: jax.Array, chunk: int, dtype,
                  temperature: float = 1.0, extra: tuple[str, ...] = ()) -> TokenStats:
  """`from_logits(unembed(h, w))` computed `chunk` positions at a time (chunk <= 0 or >= T: at once). A length that
  is not a multiple of `chunk` is padded. `w_DxV` is taken in its storage dtype and cast inside each chunk, so its
  gradient accumulates over chunks in that dtype (float32 parameters: float32, as the one-matmul path)."""
  B, T, D = h_BxTxD.shape
  if chunk <= 0 or chunk >= T:
    return from_logits(unembed(h_BxTxD, w_DxV, dtype), targets_BxT, temperature, extra)
  pad = -T % chunk
  h_BxTxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
  targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  n = (T + pad) // chunk
  # chunk j holds positions j, j + n, j + 2n, ...: a sequence split over devices (context parallelism) keeps its split
  # within every chunk, so each device works on its own positions at each step instead of waiting its turn
  h_NxBxCxD = jnp.moveaxis(h_BxTxD.reshape(B, chunk, n, D), 2, 0)
  t_NxBxC = jnp.moveaxis(targets_BxT.reshape(B, chunk, n), 2, 0)

  @jax.checkpoint  # keep only the chunk's inputs; its logits are recomputed in the backward pass
  def one(h_BxCxD, t_BxC):
    return from_logits(unembed(h_BxCxD, w_DxV, dtype), t_BxC, temperature, extra)

  stats = jax.lax.map(lambda args: one(*args), (h_NxBxCxD, t_NxBxC))
  return TokenStats(*(None if x is None else jnp.moveaxis(x, 0, 2).reshape(B, n * chunk)[:, :T] for x in stats))
