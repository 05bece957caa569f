"""The loss-head contract: a pure loss, and a declaration (data, not behaviour) of what the head needs.

Training, evaluation and the AOT planner read the declaration in one place (fmjax/train/step.py and
fmjax/train/frozen.py); none of them knows a head by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from fmjax.adapters.base import PARTS  # noqa: F401  (re-exported: the trained params' subtree of the heads' parts)
from fmjax.errors import UserError
from fmjax.model.token_stats import TokenStats, from_logits

# (loss_sum, weight, metric_sums): the step divides summed losses and summed metrics by the summed weight, so
# gradient accumulation, packing and multi-host all give the true mean over tokens (or pairs, for pair losses).
LossOutput = tuple[jax.Array, jax.Array, dict[str, jax.Array]]

# logits_fn(inputs) -> logits [B,T,V] float32 (a score model's: [B,T,num_labels]). `inputs` maps "tokens",
# "segment_ids", "positions" (and the per-token columns the run's parameterisation reads) to [B,T]
# arrays: a batch, or one side of one.
LogitsFn = Callable[[Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class Frozen:
  """A frozen model a head compares with, read by the head as `ctx.frozen[role]`.

  source "policy": the params the run starts from (its `init_from`, else its initialisation), held as a copy; under a
    parameterisation (fmjax/adapters), the frozen base with it off, so no second copy exists.
  source "run": another run's weights: `objective.<key>` names its run directory, `objective.<key>_step` the step
    (-1 = newest) and, with no directory, `objective.<key>_bootstrap` a config pre-trained into WORKDIR/<key> first.
    Its architecture is that run's; it must share this run's vocabulary.
  """
  role: str
  source: str = "policy"  # policy | run
  key: str = ""  # source "run": the objective.* key naming the run directory (default: the role)

  def __post_init__(self):
    if self.source not in ("policy", "run"):
      raise ValueError(f"Frozen({self.role!r}).source={self.source!r} must be 'policy' or 'run'.")

  @property
  def config_key(self) -> str:
    return self.key or self.role


REFERENCE = Frozen("reference")  # the starting policy (under a parameterisation: the base with it off)
REWARD_MODEL = Frozen("reward_model", source="run")  # objective.reward_model: a reward model's run


@dataclasses.dataclass(frozen=True)
class Rollout:
  """How a head's batches come from the policy (the generic driver: fmjax/train/rollout.py). Each rollout samples
  `group` completions of each prompt with the current params, scores every completion with the reward functions of
  `rewards` ('name[:weight],...'; 'model' is the frozen REWARD_MODEL), and lays them out one per row (prompt +
  completion, loss on the completion). `per_completion(rewards [N], group)` gives the head's columns, one value per
  completion, written on its completion's tokens; `sampler_logps` names the per-token column that receives the
  sampler's log-probs ('' = none).

  A head that needs more than per-completion values (PPO's critic values and GAE, a trainer-side log-prob) adds
  `prepare(params, batch, ctx) -> {column: [B,T]}`: run on the device over the laid-out rollout, train.batch_size
  rows at a time, under the params that sampled it, before any optimizer step on it (names: `prepared`); and/or
  `finish(rows, rewards) -> ({column: [N,T]}, {metric: float})`: on the host in numpy over the whole rollout (`rows`:
  every column so far; names: `finished`). A rollout holds `minibatches` train batches; the next
  `iterations` × `minibatches` optimizer steps train on it, one minibatch each, `iterations` passes (epochs) in a
  fresh order each. A reward function that runs longer than `reward_timeout` seconds (0 = no limit) stops the run
  with an error naming it."""
  group: int
  max_completion_length: int
  rewards: str
  per_completion: Callable[[np.ndarray, int], Mapping[str, np.ndarray]]
  columns: tuple[str, ...]  # the names per_completion returns
  sampler_logps: str = ""
  iterations: int = 1
  minibatches: int = 1
  prepare: Callable[..., Mapping[str, jax.Array]] | None = None
  prepared: tuple[str, ...] = ()
  finish: Callable[..., tuple[Mapping[str, np.ndarray], Mapping[str, float]]] | None = None
  finished: tuple[str, ...] = ()
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  mask_truncated: bool = False  # no loss on completions that hit the length limit
  missing_eos_penalty: float = 0.0  # subtracted from the reward of a completion that hit the length limit
  reward_timeout: float = 300.0  # seconds per reward function call (objective.reward_timeout)
  group_key: str = "num_generations"  # the head's option keys behind `group` and `iterations`, for messages ('': fixed)
  iterations_key: str = "num_iterations"
  minibatches_key: str = "num_mini_batches"

  @property
  def batch_columns(self) -> tuple[str, ...]:
    """Every column the rollout adds to the five sequence keys."""
    return self.columns + ((self.sampler_logps,) if self.sampler_logps else ()) + self.prepared + self.finished

  @property
  def steps(self) -> int:
    """Optimizer steps on one rollout."""
    return int(self.iterations) * int(self.minibatches)


@dataclasses.dataclass(frozen=True)
class Part:
  """A trainable module a head adds: `make(model_cfg)` builds it; its params live under the trained params' PARTS
  subtree, train, checkpoint and resume with the rest, and are read through `ctx.forward(..., parts=(name,))`. It
  reads the trunk's final hidden states [B,T,D] (a value head, a second score head) or, with `reads="inputs"`, the
  tokens, segment ids and positions: a network of its own (a separate critic), which a fresh run starts from the
  checkpoint of run `init` at `init_step` (objective.<init_key>; '' = the run the policy starts from, if any), a
  task head that run lacks fresh."""
  name: str
  make: Callable[[Any], nn.Module]
  reads: str = "hidden"  # hidden | inputs
  init: str = ""
  init_step: int = -1
  init_key: str = ""

  def __post_init__(self):
    if self.reads not in ("hidden", "inputs"):
      raise ValueError(f"Part({self.name!r}).reads={self.reads!r} must be 'hidden' or 'inputs'.")



@dataclasses.dataclass(frozen=True)
class Head:
  """A configured loss head: its pure loss and what it needs."""
  loss: Callable[..., LossOutput]  # loss(params, batch, ctx: LossContext) -> LossOutput
  layouts: tuple[str, ...] = ("text",)  # batch layouts it trains on (fmjax/data/layout.py); the first is the default
  columns: tuple[str, ...] = ()  # per-example columns it needs in the batch (e.g. 'ref_logps')
  frozen: tuple[Frozen, ...] = ()  # frozen models it reads through ctx.frozen
  reports_nll: bool = False  # its metrics hold `nll`, a per-token mean: evaluation adds perplexity
  # what `ctx.apply` must return: "logits" (over the vocabulary: model.num_labels = 0), "score" (a reward model's
  # one score: num_labels = 1) or "labels" (a classifier's scores: num_labels >= 2)
  output: str = "logits"
  # it trains on its own samples: the data yields prompts, and each batch is a rollout of the current params
  rollout: Rollout | None = None
  parts: tuple[Part, ...] = ()  # trainable modules of its own over the trunk's hidden states

  def __post_init__(self):
    if self.rollout is not None:
      object.__setattr__(self, "layouts", ("rollouts",))
      object.__setattr__(self, "columns", self.rollout.batch_columns)

  def check_model(self, name: str, num_labels: int) -> None:
    """The model's output head must be the one the loss reads."""
    need = {"logits": "0 (a language model)", "score": "1 (a reward model)", "labels": ">= 2 (one per class)"}
    ok = {"logits": num_labels == 0, "score": num_labels == 1, "labels": num_labels >= 2}[self.output]
    if not ok:
      raise UserError(f"objective.name={name!r} reads {self.output} from the model but model.num_labels="
                      f"{num_labels}; set model.num_labels to {need[self.output]}.")


# stats_fn(inputs, temperature, extra) -> TokenStats [B,T] of inputs["targets"] under the model's next-token
# distribution, with the token_stats.EXTRA statistics named in `extra`
StatsFn = Callable[[Mapping[str, jax.Array], float, tuple[str, ...]], TokenStats]


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What a head may use besides the trainable params and the batch.

  A head that reads only per-token statistics of the targets (log-probs and log-partition; the greedy token and
  the entropy when it names them in `extra`) asks `token_stats` / `frozen_stats` for them: the training context
  fuses them with the unembedding (`model.loss_chunk`), so the [B,T,V] logits never exist. Given only `apply` /
  `frozen` (tests, custom contexts), they are computed from the logits."""
  apply: Callable[..., jax.Array]  # apply(params, inputs) -> logits [B,T,V] float32 (inputs: as LogitsFn's)
  frozen: Mapping[str, LogitsFn] = dataclasses.field(default_factory=dict)  # role -> the frozen model's logits
  stats: Callable[..., TokenStats] | None = None  # stats(params, inputs, temperature, extra), fused
  frozen_stats_fns: Mapping[str, StatsFn] = dataclasses.field(default_factory=dict)  # role -> fused stats
  # forward(params, inputs, temperature, extra, parts) -> (TokenStats, {part name: its output}): one pass
  forward_fn: Callable[..., tuple[TokenStats, dict[str, Any]]] | None = None
  # model_terms() -> (per-token loss, metrics) the model itself adds to the head's loss after the trained model's
  # calls (an MoE router's auxiliary losses), or None
  model_terms: Callable[[], tuple[jax.Array, dict[str, jax.Array]] | None] | None = None

  def token_stats(self, params: Any, inputs: Mapping[str, jax.Array], temperature: float = 1.0,
                  extra: tuple[str, ...] = ()) -> TokenStats:
    """The trained model's statistics of `inputs["targets"]` (`extra`: "argmax", "entropy")."""
    if self.stats is not None:
      return self.stats(params, inputs, temperature, extra)
    return from_logits(self.apply(params, inputs), inputs["targets"], temperature, extra)

  def forward(self, params: Any, inputs: Mapping[str, jax.Array], temperature: float = 1.0,
              extra: tuple[str, ...] = (), parts: tuple[str, ...] = ()) -> tuple[TokenStats, dict[str, Any]]:
    """One pass of the trained model: the statistics of `inputs["targets"]` and the output of each named part of
    the head over the final hidden states."""
    return self.forward_fn(params, inputs, temperature, extra, parts)

  def frozen_stats(self, role: str, inputs: Mapping[str, jax.Array], temperature: float = 1.0,
                   extra: tuple[str, ...] = ()) -> TokenStats:
    """Frozen model `role`'s statistics of `inputs["targets"]`."""
    if role in self.frozen_stats_fns:
      return self.frozen_stats_fns[role](inputs, temperature, extra)
    return from_logits(self.frozen[role](inputs), inputs["targets"], temperature, extra)
