"""The sharded train step: same numbers on 1 and 8 devices, accumulation = full batch, skip of non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config_lib
import from_config

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]


def make_config(repo, mesh=(1, 1, 1), grad_accum=1, optimizer="sgd"):
  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  c.train.seq_len, c.train.batch_size, c.train.grad_accum = 32, 8, grad_accum
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  c.optimizer.name, c.optimizer.schedule, c.optimizer.warmup_steps = optimizer, "constant", 0
  if optimizer == "sgd":  # new params = old - grads: comparing params compares raw gradients
    c.optimizer.lr, c.optimizer.clip_norm, c.optimizer.weight_decay = 1.0, 0.0, 0.0
  return c


def one_step(config, devices):
  exp = from_config.build(config, devices=devices)
  before = jax.device_get(exp.state.params)
  state, metrics = exp.run.step(exp.state, exp.next_batch())
  return before, jax.device_get(state.params), jax.device_get(metrics), state


def rel_err(a, b):
  a, b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]), np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(b)])
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def single_device(repo):
  return one_step(make_config(repo), jax.devices()[:1])


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_step_matches_single_device(repo, single_device, mesh):
  before1, after1, m1, _ = single_device
  before8, after8, m8, state8 = one_step(make_config(repo, mesh), jax.devices())
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state8.params))
  jax.tree.map(np.testing.assert_array_equal, before8, before1)  # same init, whatever the sharding
  assert abs(m8["loss"] - m1["loss"]) <= 1e-5 * abs(m1["loss"])
  grads1 = jax.tree.map(np.subtract, before1, after1)
  grads8 = jax.tree.map(np.subtract, before8, after8)
  assert rel_err(grads8, grads1) <= 1e-5
  assert rel_err(after8, after1) <= 1e-5
  assert max(np.abs(g).max() for g in jax.tree.leaves(grads1)) > 1e-4  # the step did move the params


def test_grad_accumulation_equals_full_batch(repo, single_device):
  before1, after1, m1, _ = single_device
  before4, after4, m4, _ = one_step(make_config(repo, (1, 2, 1), grad_accum=4), jax.devices()[:2])
  assert abs(m4["loss"] - m1["loss"]) <= 1e-5 * abs(m1["loss"])
  assert m4["tokens"] == m1["tokens"]
  assert rel_err(jax.tree.map(np.subtract, before4, after4), jax.tree.map(np.subtract, before1, after1)) <= 1e-5


def test_adamw_step_is_device_count_invariant(repo):
  _, after1, m1, _ = one_step(make_config(repo, optimizer="adamw"), jax.devices()[:1])
  _, after8, m8, _ = one_step(make_config(repo, (2, 2, 2), optimizer="adamw"), jax.devices())
  assert abs(m8["grad_norm"] - m1["grad_norm"]) <= 1e-5 * m1["grad_norm"]
  assert rel_err(after8, after1) <= 1e-5


def toy_state(tx, window=1):
  from fmjax.train.state import TrainState

  params = {"w": jnp.ones(3)}
  return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                    recent_losses=jnp.full((window,), jnp.nan, jnp.float32))


def no_context(base, frozen, rng=None):
  return None  # the toy losses ignore their context


def test_nonfinite_step_is_skipped_when_configured():
  import optax

  from fmjax.train import step as step_lib

  nan_loss = lambda p, batch, ctx: (jnp.sum(p["w"]) * jnp.nan, jnp.float32(1.0), {})  # noqa: E731
  tx = optax.sgd(0.1)
  state = toy_state(tx)
  new, metrics = jax.jit(step_lib.make(nan_loss, no_context, tx, lambda s: 0.1, skip_nonfinite=True))(state, {})
  np.testing.assert_array_equal(new.params["w"], state.params["w"])
  assert int(metrics["skipped"]) == 1 and int(new.step) == 1
  new, metrics = jax.jit(step_lib.make(nan_loss, no_context, tx, lambda s: 0.1))(state, {})
  assert np.isnan(new.params["w"]).all() and int(metrics["skipped"]) == 0  # applied: the loop then stops the run


def test_loss_spike_skips_its_update_and_later_steps_train_on():
  """A planted spike (loss x1000 at one step) keeps the params and optimizer state; the steps around it update."""
  import optax

  from fmjax.train import step as step_lib

  scaled = lambda p, batch, ctx: (batch["scale"] * jnp.sum(p["w"] ** 2), jnp.float32(1.0), {})  # noqa: E731
  tx = optax.adam(1e-3)
  step = jax.jit(step_lib.make(scaled, no_context, tx, lambda s: 1e-3, spike_factor=2.0))
  state = toy_state(tx, window=16)
  scales = [1.0] * 10 + [1000.0] + [1.0] * 3
  history = []
  for scale in scales:
    before = state
    state, m = step(state, {"scale": jnp.float32(scale)})
    moved = not np.array_equal(np.asarray(state.params["w"]), np.asarray(before.params["w"]))
    history.append((int(m["spike"]), int(m["skipped"]), moved))
  assert history[10] == (1, 1, False)  # the spike: judged against the median of 10 accepted losses, not applied
  assert all(h == (0, 0, True) for i, h in enumerate(history) if i != 10)
  assert int(state.step) == len(scales)
  # the spike's loss never entered the history the median is taken over
  assert float(np.nanmax(np.asarray(state.recent_losses))) < 4.0


def test_spike_guard_judges_from_the_first_loss_and_ignores_small_losses():
  from fmjax.train.step import is_spike

  assert not bool(is_spike(jnp.float32(1e6), jnp.full((16,), jnp.nan), 2.0)[0])  # nothing to judge against yet
  assert bool(is_spike(jnp.float32(3.01), jnp.full((16,), jnp.nan).at[:1].set(1.0), 2.0)[0])  # > 1 + 2·1
  assert not bool(is_spike(jnp.float32(2.99), jnp.full((16,), jnp.nan).at[:1].set(1.0), 2.0)[0])
  assert bool(is_spike(jnp.float32(3.01), jnp.full((16,), jnp.nan).at[:8].set(1.0), 2.0)[0])
  assert not bool(is_spike(jnp.float32(1.5), jnp.full((16,), 0.01), 2.0)[0])  # 0.01 + 2·max(0.01, 1) = 2.01
  assert not bool(is_spike(jnp.float32(1e6), jnp.full((16,), 1.0), 0.0)[0])  # factor 0 = off
