"""Reading a score model (`model.num_labels > 0`, whose output is [B,T,num_labels] per token) at each sequence's last
token, per packed segment: the same value whether a sequence is packed with others or padded alone in its row."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def last_token_scores(scores_BxTxK: jax.Array, segment_ids_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(scores [B, T+1, K] at the last token of each (row, segment id), present [B, T+1] 1.0 where that segment has
  tokens). Segment 0 is padding and never present. The last token is the sequence's last input token (the one
  whose target is EOS), as transformers' sequence classifiers read the last non-pad token."""
  B, T = segment_ids_BxT.shape
  index = (jnp.arange(B)[:, None] * (T + 1) + segment_ids_BxT).reshape(-1)
  t = jnp.broadcast_to(jnp.arange(T), (B, T)).reshape(-1)
  last = jax.ops.segment_max(t, index, num_segments=B * (T + 1)).reshape(B, T + 1)  # empty: the int minimum
  present = (last >= 0) & (jnp.arange(T + 1) > 0)[None]
  pooled = jnp.take_along_axis(scores_BxTxK, jnp.clip(last, 0, T - 1)[..., None], axis=1)
  return jnp.where(present[..., None], pooled, 0.0), present.astype(jnp.float32)

