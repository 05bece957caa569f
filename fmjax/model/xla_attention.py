"""Attention through `jax.nn.dot_product_attention` (XLA or cuDNN), with causal query blocks on CPU.

XLA computes causal attention over the whole T x T square of scores and masks half of it away. On CPU, where the
train step is compute-bound, the queries go in `QUERY_BLOCKS` blocks instead, each attending only to the keys up to
its own end: 37.5% of the score work is skipped (torch's CPU SDPA kernel skips the masked tiles likewise). The
values are those of one full call, as every key a block leaves out is masked for all its queries. Other platforms
keep the single call (the blocks were measured on CPU only; cuDNN and splash skip masked tiles themselves).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

QUERY_BLOCKS = 4
MIN_BLOCKED_LEN = 256  # blocks of at least 64 queries; shorter sequences (smoke runs, tests) keep one call


def attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, mask_Bx1xTxS: jax.Array,
              causal: bool, implementation: str = "xla") -> jax.Array:
  """Softmax(q kᵀ / sqrt(H)) v under the boolean mask, with grouped-query heads. `causal`: the mask hides every key
  after its query (S == T, as without a KV cache), so on CPU the queries may go in blocks."""
  scale = 1.0 / math.sqrt(q_BxTxNxH.shape[-1])

  def full(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)

  T = q_BxTxNxH.shape[1]
  if not causal or implementation != "xla" or T < MIN_BLOCKED_LEN or T % QUERY_BLOCKS:
    return full(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS)

  def blocked(q, k, v, mask):
    c = T // QUERY_BLOCKS
    outs = []
    for i in range(QUERY_BLOCKS):
      rows, seen = slice(i * c, (i + 1) * c), slice(0, (i + 1) * c)  # this block's queries, the keys up to its end
      outs.append(full(q[:, rows], k[:, seen], v[:, seen], mask[:, :, rows, seen]))
    return jnp.concatenate(outs, axis=1)

  return jax.lax.platform_dependent(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, cpu=blocked, default=full)
