"""The loss-head contract shared by every objective."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

# (loss_sum, weight, metric_sums): the step divides summed losses and summed metrics by the summed weight, so
# gradient accumulation, packing and multi-host all give the true mean over tokens (or pairs, for pair losses).
LossOutput = tuple[jax.Array, jax.Array, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What a head may use besides the trainable params and the batch."""

  apply: Callable[..., jax.Array]  # apply(params, tokens, segment_ids, positions) -> logits [B,T,V] float32
  frozen: Any = None  # frozen trees the head declared (reference policy, teacher)
  reference: Callable[..., jax.Array] | None = None  # reference(tokens, segment_ids, positions) -> logits
  teacher: Callable[..., jax.Array] | None = None  # teacher(tokens, segment_ids, positions) -> logits
