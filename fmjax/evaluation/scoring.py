"""The one forward pass every evaluator shares: per-token log-probabilities of rows batched in fixed shapes."""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.objectives.lm import token_nll
from fmjax.errors import UserError


@functools.partial(jax.jit, static_argnums=0)
def _score(module: Any, params: Any, tokens_BxT: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
  logits_BxTxV = module.apply({"params": params}, tokens_BxT, jnp.ones_like(tokens_BxT), positions_BxT)
  nll_BxT, _ = token_nll(logits_BxTxV, targets_BxT)
  return -nll_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT


def bucket(length: int, minimum: int = 16) -> int:
  """`length` rounded up to a power of two (at least `minimum`), so rows of many lengths share few shapes."""
  return max(minimum, 1 << max(length - 1, 0).bit_length())


def logprobs(model: Any, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], batch_size: int,
             width: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """For each row, in order: log p(targets[i][t] | inputs[i][:t+1]) (float32) and whether that target is the
  argmax. Each row is one sequence from position 0, right-padded to `width` (0: per batch, its longest row rounded
  by `bucket`); the last batch is filled with empty rows, so every batch has shape [batch_size, width]. Padding
  never changes a row's values: attention is causal."""
  for start in range(0, len(inputs), batch_size):
    rows = range(start, min(start + batch_size, len(inputs)))
    T = width or bucket(max(len(inputs[i]) for i in rows))
    tokens_BxT = np.zeros((batch_size, T), np.int32)
    targets_BxT = np.zeros((batch_size, T), np.int32)
    for b, i in enumerate(rows):
      if len(inputs[i]) != len(targets[i]) or len(inputs[i]) > T:
        raise UserError(f"row {i}: {len(inputs[i])} inputs and {len(targets[i])} targets must match and fit "
                        f"in {T} positions.")
      tokens_BxT[b, :len(inputs[i])] = inputs[i]
      targets_BxT[b, :len(targets[i])] = targets[i]
    logp_BxT, greedy_BxT = jax.device_get(_score(model.module, model.params, tokens_BxT, targets_BxT))
    for b, i in enumerate(rows):
      yield logp_BxT[b, :len(targets[i])], greedy_BxT[b, :len(targets[i])]
