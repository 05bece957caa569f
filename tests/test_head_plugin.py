"""A loss head defined here, outside the package, that needs a frozen model: registered with one call, it trains
through the loop and compiles ahead of time for a TPU slice, with no edit to fmjax/."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import pytest

from fmjax import config_lib, objectives
from fmjax.model.token_stats import from_logits
from fmjax.objectives.lm import masked_nll
from fmjax.train import aot, loop

ANCHOR = objectives.Frozen("anchor")  # the starting policy, frozen


def make_anchored_lm(objective_cfg) -> objectives.Head:
  """Next-token loss plus KL(policy ‖ anchor) per token: a head that keeps the model near where it started."""

  def loss(params, batch, ctx):
    logits = ctx.apply(params, batch)
    anchor = jax.lax.stop_gradient(ctx.frozen[ANCHOR.role](batch))
    mask = batch["loss_mask"].astype(jnp.float32)
    log_p, log_q = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(anchor, -1)
    kl = jnp.sum(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1) * mask)
    loss_sum, weight, metrics = masked_nll(from_logits(logits, batch["targets"]), mask, 0.0)
    return loss_sum + kl, weight, {**metrics, "anchor_kl": kl}

  return objectives.Head(loss, frozen=(ANCHOR,), reports_nll=True)


@pytest.fixture
def anchored(monkeypatch, repo):
  monkeypatch.setitem(objectives.REGISTRY, "anchored_lm", objectives.HeadType(objectives.Options, make_anchored_lm))
  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  config_lib.use_head(c, "anchored_lm")
  c.train.steps, c.log.every_steps, c.eval.every_steps, c.checkpoint.async_save = 2, 1, 0, False
  c.optimizer.warmup_steps = 0  # step 1 trains at the peak lr, so step 2 sees moved params
  return c


def test_a_head_from_outside_the_package_trains_with_its_frozen_model(anchored, tmp_path):
  objectives.register("anchored_lm", make_anchored_lm)  # the public call (the fixture undoes it afterwards)
  exp = loop.train(anchored, str(tmp_path))
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  by_step = {r["step"]: r for r in rows}
  # Step 1 runs on the starting params, which the anchor copies: the KL is 0 up to float32 rounding (two programs
  # compute the same logits; another init would give KL ~ 1). Step 2 has moved away from the anchor.
  assert abs(by_step[1]["anchor_kl"]) < 1e-6
  assert by_step[2]["anchor_kl"] > 1e3 * max(abs(by_step[1]["anchor_kl"]), 1e-9)
  assert by_step[2]["loss"] > by_step[2]["nll"]  # the KL term is in the loss
  # The anchor is held once, frozen: not trained, not checkpointed.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), exp.state.params, exp.state.frozen["anchor"])
  assert max(jax.tree.leaves(moved)) > 0.0
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "2", "state", "frozen"))


def test_a_head_from_outside_the_package_compiles_for_v5p_8_with_its_frozen_model(anchored, v5p_8):
  topo, devices = v5p_8
  report = aot.analyse(anchored, topo, devices=devices, cost=False)
  args = report.memory.arguments
  assert report.verdict == "fits"
  assert args["frozen anchor"] == args["params (trained)"] > 0  # a copy of the params, sharded as they are


def test_divergence_guard_skips_spikes_then_stops_the_run_naming_the_step(anchored, monkeypatch, tmp_path):
  """From step 13 on the step reports a planted spike (its loss x1000): the loop tolerates three in a row
  (train.spike_skips), then stops the run with a message naming the step and the fix; metrics.jsonl records the
  spikes. (That a spike's update is skipped on the device: tests/test_train_step.py.)"""
  from fmjax.train import experiment

  config_lib.use_head(anchored, "lm")
  anchored.train.steps, anchored.checkpoint.every_steps = 30, 10
  real_build = experiment.build

  def build(spec, devices=None):
    exp = real_build(spec, devices)
    compiled = exp.run.step

    def planted(state, batch):
      if int(state.step) >= 12:
        state, metrics = compiled(state, batch)
        return state, {**metrics, "loss": metrics["loss"] * 1000, "spike": jnp.int32(1)}
      return compiled(state, batch)

    exp.run = dataclasses.replace(exp.run, step=planted)
    return exp

  monkeypatch.setattr(loop, "build", build)
  with pytest.raises(loop.DivergenceError, match=r"step 16: loss .* is a spike .* 4 in a row.*optimizer\.lr.*"
                                                 r"train\.spike_factor.*newest checkpoint is step 10"):
    loop.train(anchored, str(tmp_path))
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert [r["step"] for r in rows if r.get("spike")] == [13, 14, 15, 16]
  assert all(r["spike"] == 0 for r in rows if r["step"] <= 12)
