"""AdamW with a weight-decay mask, learning-rate schedules and global-norm clipping."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from fmjax.errors import UserError
from fmjax.spec import OPTIMIZERS, SCHEDULES



def make_schedule(opt: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `opt.lr`, then cosine / WSD / constant to `opt.lr * opt.min_lr_ratio`.

  WSD (warmup-stable-decay) holds the peak and decays over the last `opt.decay_fraction` of training, linearly or
  with the 1-sqrt shape (`opt.decay_shape`).
  """
  peak, warmup, floor = opt.lr, opt.warmup_steps, opt.lr * opt.min_lr_ratio
  if opt.schedule not in SCHEDULES:
    raise UserError(f"optimizer.schedule={opt.schedule!r} is not one of {SCHEDULES}.")
  if warmup >= total_steps and total_steps > 1:
    raise UserError(f"optimizer.warmup_steps={warmup} must be smaller than train.steps={total_steps}.")
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  rest = max(total_steps - warmup, 1)
  if opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, rest, alpha=opt.min_lr_ratio)
  elif opt.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:
    decay = max(int(round(rest * opt.decay_fraction)), 1)
    stable = rest - decay

    def after(step):
      frac = jnp.clip((step - stable) / decay, 0.0, 1.0)
      shape = frac if opt.decay_shape == "linear" else 1 - jnp.sqrt(1 - frac)
      return peak - (peak - floor) * shape

    if opt.decay_shape not in ("linear", "sqrt"):
      raise UserError(f"optimizer.decay_shape={opt.decay_shape!r}: use 'linear' or 'sqrt'.")
  return optax.join_schedules([warm, after], [warmup]) if warmup else after


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def decay_mask(params: Any, no_decay_regex: str) -> Any:
  """True for parameters that get weight decay: those whose path does not match `no_decay_regex`."""
  pattern = re.compile(no_decay_regex) if no_decay_regex else None
  return jax.tree_util.tree_map_with_path(lambda p, _: not (pattern and pattern.search(path_str(p))), params)




def make_optimizer(opt: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping (when `opt.clip_norm` > 0), then AdamW (or plain SGD) with masked decoupled weight decay."""
  mask = lambda p: decay_mask(p, opt.no_decay_regex)  # noqa: E731
  if opt.name == "adamw":
    core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask)
  elif opt.name == "sgd":
    core = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask), optax.sgd(schedule))
  else:
    raise UserError(f"optimizer.name={opt.name!r} is not one of {OPTIMIZERS}.")
  return optax.chain(optax.clip_by_global_norm(opt.clip_norm), core) if opt.clip_norm > 0 else core
