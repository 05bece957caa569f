"""Greedy decoding by full recomputation: simple and exact, for checks and small models (no KV cache).

Prompts of different lengths share one fixed [B, L] buffer (L = longest prompt + max_new_tokens), so one compiled
forward serves every step; causal attention means the padding after a row's end never affects its next token.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def greedy(apply: Callable[..., jax.Array], params, prompts: Sequence[np.ndarray], max_new_tokens: int,
           stop_ids: Sequence[int] = ()) -> list[np.ndarray]:
  """The greedy continuation of each prompt (ids, without the prompt), ending at (and including) the first stop id
  or after `max_new_tokens`. `apply(params, tokens, segment_ids, positions) -> logits [B,T,V]`."""
  B, L = len(prompts), max(len(p) for p in prompts) + max_new_tokens
  tokens = np.zeros((B, L), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))
  segments = np.ones((B, L), np.int32)

  @jax.jit
  def next_token(params, tokens, lengths):
    logits = apply(params, tokens, segments, positions)
    return jnp.argmax(jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], axis=-1)

  done = np.zeros(B, bool)
  out = [[] for _ in range(B)]
  for _ in range(max_new_tokens):
    nxt = np.asarray(next_token(params, tokens, lengths))
    for i in np.flatnonzero(~done):
      out[i].append(int(nxt[i]))
      tokens[i, lengths[i]] = nxt[i]
      done[i] = int(nxt[i]) in stop_ids
    lengths = np.where(done, lengths, lengths + 1)
    if done.all():
      break
  return [np.asarray(o, np.int32) for o in out]
