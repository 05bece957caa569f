"""Parameter and optimizer-state sizes of a training setup, from shapes alone (no arrays are allocated)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax

from fmjax import adapters, quant
from fmjax.model import init_params, resolve


@dataclasses.dataclass(frozen=True)
class Footprint:
  total: int  # parameters of the model (base + adapters)
  trainable: int  # parameters that train
  trainable_bytes: int
  optimizer_bytes: int  # AdamW state for the trained parameters
  frozen_bytes: int  # weights held but not trained (a parameterisation's base)


def _bytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def footprint(model: str, adapter: adapters.Adapter | None = None, param_dtype: str = "bfloat16",
              scheme: quant.Scheme = quant.Scheme()) -> Footprint:
  """Sizes for full fine-tuning (no `adapter`) or training `adapter` over preset `model` (its frozen base stored
  under `scheme`), via `jax.eval_shape`."""
  cfg = resolve(model, {"param_dtype": param_dtype})
  params = jax.eval_shape(lambda r: init_params(cfg, r, adapter=adapter), jax.random.PRNGKey(0))
  trained, frozen = adapters.split(adapter, params) if adapter else (params, {})
  frozen = jax.eval_shape(lambda t: quant.quantize_tree(t, scheme), frozen)
  opt = jax.eval_shape(optax.adamw(1e-4).init, trained)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  return Footprint(count(params), count(trained), _bytes(trained), _bytes(opt), quant.nbytes(frozen))


def gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
