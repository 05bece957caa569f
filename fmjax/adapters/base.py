"""The parameterisation contract: how the trainable weights adapt a frozen base.

The model exposes two hook points and calls the active parameterisation at each; it knows no method by name:
  project(module, name, spec, x, w, axes)   each projection einsum (attention q/k/v/o, MLP gate/up/down, unembed)
                                            for which changes_projection(module, name) is true; the others are
                                            the plain einsum (fmjax.model.projection)
  block_output(module, x, layer_params, inputs)   each block's output (the residual stream), with the layer's
                                                  slice of `layer_params` and the batch's per-token `columns`
An adapter's parameters live in the same tree as the base's, and `owns(path)` tells them apart: training keeps the
owned leaves as the trainable tree and the rest as the frozen base (`split` / `combine`), and a checkpoint holds the
trainable tree alone. With the adapter off (`Transformer(cfg)`), the same base computes the base model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A parameterisation. Subclasses are frozen dataclasses built by `from_config(section)` from their config
  section, and override the hooks they use."""

  title: ClassVar[str] = ""  # its name in messages
  section: ClassVar[str] = ""  # the config section of its options (its registry name)
  merge_command: ClassVar[str] = ""  # the command that folds a run into full weights ({workdir}: the run), if any
  columns: ClassVar[tuple[str, ...]] = ()  # per-token int32 batch columns the model passes to `block_output`
  off_hint: ClassVar[str] = ""  # how to switch it off, for the error when two are on
  # (option, predicate, what the value must be): checked at start with the run's other config values
  rules: ClassVar[tuple[tuple[str, Callable[[Any], bool], str], ...]] = ()

  off: ClassVar[dict[str, Any]] = {}  # the config section's values that differ from the fields': it starts off

  @classmethod
  def section_defaults(cls) -> dict[str, Any]:
    """The config section of this parameterisation: every field at its default, switched off."""
    return {f.name: f.default for f in dataclasses.fields(cls)} | cls.off

  @classmethod
  def enabled(cls, section: Any) -> bool:
    """Whether the config section switches this parameterisation on."""
    raise NotImplementedError

  @classmethod
  def from_config(cls, section: Any) -> "Adapter":
    return cls(**section.to_dict()).validate()

  @classmethod
  def owns_path(cls, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (a tuple of names) is one this parameterisation creates."""
    raise NotImplementedError

  def owns(self, path: tuple[str, ...]) -> bool:
    return self.owns_path(path)

  def validate(self) -> "Adapter":
    """Checks its options against `rules` and that it is on (built from a section whose switch is off, it is not)."""
    for key, ok, what in self.rules:
      if not ok(getattr(self, key)):
        raise UserError(f"{self.section}.{key}={getattr(self, key)!r} must be {what}.")
    return self

  def project(self, module: Any, name: str, spec: str, x: jax.Array, w: jax.Array, axes: tuple[str, ...],
              out_dtype: Any = None) -> jax.Array:
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)

  def changes_projection(self, module: Any, name: str) -> bool:
    """Whether `project` for kernel `name` of `module` differs from the plain einsum (the fused unembedding applies
    only where it does not)."""
    return False

  def layer_params(self, module: Any, num_layers: int) -> Any:
    """Parameters the blocks read, created in the top module with a leading [num_layers] axis (None: none)."""
    return None

  def block_output(self, module: Any, x: jax.Array, layer_params: Any, inputs: dict[str, jax.Array] | None
                   ) -> jax.Array:
    """The residual stream after a block, [B,T,D]; `inputs` is None in decoding steps (after the prompt)."""
    return x

  def check(self, base: Any) -> None:
    """Fails with a UserError when the adapter cannot apply to this base (e.g. targets that select nothing)."""

  def merge(self, params: Any) -> dict:
    """The base with the adapter folded in, adapter leaves removed."""
    raise UserError(f"a {self.title} run cannot be merged into the base weights; load the run itself (fmjax.load, "
                    "tools/generate.py), which applies it over its base.")

  def flops_per_token(self, cfg: Any, seq_len: int, trained: int) -> float:
    """Its own training FLOPs per token (forward and backward) besides the base's; `trained`: its parameters."""
    return 0.0

  def batch_columns(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `columns` for one packed row (tokens, targets, loss_mask, segment_ids, positions as numpy arrays)."""
    return {}

  def prompt_columns(self, prompt_lengths: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """The `columns` for a generation's prefill: right-padded prompts of `prompt_lengths`, `width` wide."""
    return {}

  def describe(self, trained: int) -> str:
    return f"{trained:,} trained: {self.title}"


PARTS = "parts"  # the params subtree of a loss head's own trainable modules (fmjax/objectives/base.py `Part`)
# new output heads on the base (a reward model's or a classifier's score, a loss head's parts) train under any adapter
TASK_HEADS = ("score", PARTS)


def split(adapter: Adapter, params: Any) -> tuple[dict, dict]:
  """(the trained leaves: the adapter's and a task head's, as PEFT's `modules_to_save`; the base's), each a nested
  dict of the same layout."""
  flat = traverse_util.flatten_dict(params)
  mine = {p: v for p, v in flat.items() if adapter.owns(tuple(map(str, p))) or str(p[0]) in TASK_HEADS}
  return (traverse_util.unflatten_dict(mine),
          traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in mine}))


def combine(base: Any, trained: Any) -> dict:
  """The full tree the model applies: the base with the adapter's leaves in place."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(trained)})
