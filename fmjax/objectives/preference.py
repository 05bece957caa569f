"""The preference heads (`dpo`, `cdpo`, `ipo`, `simpo`, `orpo`, `kto`): shared machinery and the registry entries.

`kto` also reads unpaired records ({"prompt", "completion", "label"}: TRL's unpaired preference format): each packed
example is one response, desirable (label true) or undesirable; see `_kto_unpaired`.

A preference batch holds packed chosen and rejected rows (`chosen_*`, `rejected_*`); the k-th example (segment) of
row i on both sides is one pair. Both sides go through ONE forward pass (stacked on the batch axis); each response's
log-probability is the sum over its loss-bearing tokens, gathered per (row, segment), so any number of pairs may
share a row and padding contributes nothing. Heads with a reference read it through `ctx.frozen['reference']` (the
frozen initial policy, or under a parameterisation the base with it off) without gradient, or, with `objective.reference =
'precomputed'`, from the batch's `chosen_ref_logps` / `rejected_ref_logps` columns, so no reference is in memory.

Metrics (means over pairs; `eval_` on held-out data): `rewards/chosen` = β·(logπ − logπ_ref)(chosen),
`rewards/rejected`, `rewards/margins`, `rewards/accuracy` (chosen reward > rejected reward), `logps/chosen`,
`logps/rejected`, and `logps/accuracy` (the policy itself finds the chosen response likelier: a preference accuracy
that is defined before training too, where rewards are all 0). Reference-free heads (simpo, orpo) report
β·(mean token log-prob) as rewards, as TRL's CPO does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fmjax import checks
from fmjax.model.token_stats import TokenStats
from fmjax.objectives import options
from fmjax.objectives import preference_losses as L
from fmjax.objectives.base import REFERENCE, Head, LossContext, LossOutput

SIDES = ("chosen_", "rejected_")


def segment_sums(values_BxT: jax.Array, segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, T+1]: the sum of `values` over each (row, segment id) of the row."""
  B, T = values_BxT.shape
  index = (jnp.arange(B)[:, None] * (T + 1) + segment_ids_BxT).reshape(-1)
  return jax.ops.segment_sum(values_BxT.reshape(-1), index, num_segments=B * (T + 1)).reshape(B, T + 1)


def stacked_sides(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The chosen rows then the rejected rows as one [2B, T] batch (every key both sides have, unprefixed): both
  sides of every pair in one forward pass."""
  keys = [k[len("chosen_"):] for k in batch if k.startswith("chosen_") and "rejected_" + k[len("chosen_"):] in batch]
  return {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]]) for k in keys}


def pair_logps(stats: Callable[..., TokenStats], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-pair sums over response tokens, each [B, T+1] (row, segment): `logp_c`, `logp_r`, token counts `n_c`,
  `n_r`, and `valid` (1 where both responses exist). One forward pass over both sides; `stats(inputs)` gives the
  model's token statistics of `inputs["targets"]`."""
  both = stacked_sides(batch)
  mask = both["loss_mask"].astype(jnp.float32)
  logp = stats(both).logp * mask
  seg = both["segment_ids"]
  sums, counts = segment_sums(logp, seg), segment_sums(mask, seg)
  B = batch["chosen_tokens"].shape[0]
  out = {"logp_c": sums[:B], "logp_r": sums[B:], "n_c": counts[:B], "n_r": counts[B:]}
  out["valid"] = ((out["n_c"] > 0) & (out["n_r"] > 0)).astype(jnp.float32)
  return out


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
  """The reference-free heads' (simpo, orpo)."""
  beta: float = options.field(0.1, "inverse temperature of the implicit reward",
                              checks.positive("the inverse temperature of the implicit reward"))


@dataclasses.dataclass(frozen=True)
class ReferenceOptions(Options):
  reference: str = options.field("model", "model (frozen, live) | precomputed (ref_*_logps in the data)",
                                 checks.one_of(("model", "precomputed")))


@dataclasses.dataclass(frozen=True)
class CdpoOptions(ReferenceOptions):
  # The conservative DPO loss of Mitchell (2023), −(1−ε)·logσ(βh) − ε·logσ(−βh). Not TRL's DPOTrainer
  # `label_smoothing`: its "sigmoid" loss ignores it (it smooths "robust", "exo_pair" and "aot"; CPOTrainer's
  # "sigmoid" applies it, without a reference model).
  label_smoothing: float = options.field(0.1, "ε, the probability that a preference label is flipped",
                                         checks.in_range(0, 0.5, "[)", "the probability a label is flipped"))


@dataclasses.dataclass(frozen=True)
class SimpoOptions(Options):
  simpo_gamma: float = options.field(0.5, "target reward margin", checks.non_negative("the target reward margin"))


@dataclasses.dataclass(frozen=True)
class KtoOptions(ReferenceOptions):
  kto_desirable_weight: float = options.field(1.0, "weight of desirable (chosen) responses", checks.positive())
  kto_undesirable_weight: float = options.field(1.0, "weight of undesirable (rejected) responses", checks.positive())


def _reference_needs(o: ReferenceOptions) -> dict[str, tuple]:
  """The Head fields of a head with a reference: a frozen model, or precomputed log-prob columns in the data."""
  if o.reference == "precomputed":
    return {"columns": ("ref_logps",)}
  return {"frozen": (REFERENCE,)}


def make_head(pair_loss: Callable[..., tuple[jax.Array, dict]], reference: bool):
  """`make(options) -> Head`. `pair_loss(p, ref, options)` gets the policy's and (if `reference`) the reference's
  per-pair sums and returns (loss [B,T+1], rewards (chosen, rejected))."""

  def make(objective_cfg: Any) -> Head:
    def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
      p = pair_logps(lambda inputs: ctx.token_stats(params, inputs), batch)
      ref = None
      if reference and objective_cfg.reference == "precomputed":  # tools/precompute_ref_logps.py's columns
        ref = {f"logp_{s[0]}": segment_sums(batch[s + "ref_logps"], batch[s + "segment_ids"]) for s in SIDES}
      elif reference:
        ref = jax.tree.map(jax.lax.stop_gradient, pair_logps(lambda inputs: ctx.frozen_stats(REFERENCE.role, inputs), batch))
      losses, (reward_c, reward_r) = pair_loss(p, ref, objective_cfg)
      valid = p["valid"]
      total = lambda x: jnp.sum(jnp.where(valid > 0, x, 0.0))  # noqa: E731  (padding pairs hold 0/0 terms)
      metrics = {"rewards/chosen": total(reward_c), "rewards/rejected": total(reward_r),
                 "rewards/margins": total(reward_c - reward_r),
                 "rewards/accuracy": total((reward_c > reward_r).astype(jnp.float32)),
                 "logps/chosen": total(p["logp_c"]), "logps/rejected": total(p["logp_r"]),
                 "logps/accuracy": total((p["logp_c"] > p["logp_r"]).astype(jnp.float32))}
      return total(losses), jnp.sum(valid), metrics

    return Head(loss, layouts=("pairs",), **(_reference_needs(objective_cfg) if reference else {}))

  return make


def _safe(n: jax.Array) -> jax.Array:
  return jnp.maximum(n, 1.0)  # padding pairs have no tokens


def _dpo(smoothed: bool):
  def pair_loss(p, ref, cfg):
    eps = float(cfg.label_smoothing) if smoothed else 0.0
    losses = L.dpo(p["logp_c"], p["logp_r"], ref["logp_c"], ref["logp_r"], cfg.beta, eps)
    return losses, (cfg.beta * (p["logp_c"] - ref["logp_c"]), cfg.beta * (p["logp_r"] - ref["logp_r"]))
  return pair_loss


def _ipo(p, ref, cfg):
  nc, nr = _safe(p["n_c"]), _safe(p["n_r"])
  losses = L.ipo(p["logp_c"], p["logp_r"], ref["logp_c"], ref["logp_r"], nc, nr, cfg.beta)
  return losses, (cfg.beta * (p["logp_c"] - ref["logp_c"]), cfg.beta * (p["logp_r"] - ref["logp_r"]))


def _simpo(p, ref, cfg):
  nc, nr = _safe(p["n_c"]), _safe(p["n_r"])
  losses = L.simpo(p["logp_c"], p["logp_r"], nc, nr, cfg.beta, cfg.simpo_gamma)
  return losses, (cfg.beta * p["logp_c"] / nc, cfg.beta * p["logp_r"] / nr)


def _orpo(p, ref, cfg):
  """Per pair: the chosen response's token-mean NLL plus the odds-ratio term."""
  nc, nr = _safe(p["n_c"]), _safe(p["n_r"])
  losses = -p["logp_c"] / nc + L.orpo(p["logp_c"], p["logp_r"], nc, nr, cfg.beta)
  return losses, (cfg.beta * p["logp_c"] / nc, cfg.beta * p["logp_r"] / nr)


def _kto(p, ref, cfg):
  """Each pair's chosen response as desirable, its rejected one as undesirable; the mean of the two."""
  both = lambda x: jnp.concatenate([x["logp_c"], x["logp_r"]])  # noqa: E731
  z0 = L.kto_reference_point(both(p), both(ref), jnp.concatenate([p["valid"], p["valid"]]))
  c, r = L.kto(p["logp_c"], p["logp_r"], ref["logp_c"], ref["logp_r"], cfg.beta, z0, cfg.kto_desirable_weight,
               cfg.kto_undesirable_weight)
  return (c + r) / 2, (cfg.beta * (p["logp_c"] - ref["logp_c"]), cfg.beta * (p["logp_r"] - ref["logp_r"]))


def _kto_unpaired(params, batch: dict[str, jax.Array], ctx: LossContext, cfg: Any) -> LossOutput:
  """KTO on unpaired records (`label` +1 desirable / −1 undesirable per example): the mean over responses of
  λ_D·(1 − σ(β·(r − z0))) or λ_U·(1 − σ(β·(z0 − r))), r = logπ − logπ_ref summed over the completion."""
  mask, seg = batch["loss_mask"].astype(jnp.float32), batch["segment_ids"]
  sums = lambda stats: segment_sums(stats.logp * mask, seg)  # noqa: E731
  logp = sums(ctx.token_stats(params, batch))
  ref = jax.lax.stop_gradient(sums(ctx.frozen_stats(REFERENCE.role, batch)))
  label = segment_sums(batch["label"], seg)
  good = (label > 0) & (segment_sums(mask, seg) > 0)
  bad = (label < 0) & (segment_sums(mask, seg) > 0)
  valid = (good | bad).astype(jnp.float32)
  z0 = L.kto_reference_point(logp, ref, valid)
  c, r = L.kto(logp, logp, ref, ref, cfg.beta, z0, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
  reward = cfg.beta * (logp - ref)
  total = lambda x, where: jnp.sum(jnp.where(where, x, 0.0))  # noqa: E731
  metrics = {"rewards/desirable": total(reward, good), "rewards/undesirable": total(reward, bad),
             "desirable_fraction": total(1.0, good), "kl": z0 * jnp.sum(valid)}
  return total(c, good) + total(r, bad), jnp.sum(valid), metrics


def _make_kto(objective_cfg: Any) -> Head:
  """`kto` on preference pairs (chosen = desirable, rejected = undesirable) or on unpaired labelled records."""
  paired = make_head(_kto, reference=True)(objective_cfg)

  def loss(params, batch: dict[str, jax.Array], ctx: LossContext) -> LossOutput:
    if "label" in batch:
      return _kto_unpaired(params, batch, ctx, objective_cfg)
    return paired.loss(params, batch, ctx)

  return Head(loss, layouts=("pairs", "unpaired"), columns=paired.columns, frozen=paired.frozen)


HEADS = {"dpo": options.HeadType(ReferenceOptions, make_head(_dpo(False), reference=True)),
         "cdpo": options.HeadType(CdpoOptions, make_head(_dpo(True), reference=True)),
         "ipo": options.HeadType(ReferenceOptions, make_head(_ipo, reference=True)),
         "simpo": options.HeadType(SimpoOptions, make_head(_simpo, reference=False)),
         "orpo": options.HeadType(Options, make_head(_orpo, reference=False)),
         "kto": options.HeadType(KtoOptions, _make_kto)}
