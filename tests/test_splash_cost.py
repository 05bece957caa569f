"""The splash kernels' analytic cost (fmjax.model.splash.kernel_cost), which projected step times add because a
compiler's cost model counts a Pallas call as almost free, against XLA's own FLOP count and the causal mask itself;
and when `attention_impl=auto` runs the kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.model import splash

HD = 64


def xla_flops(f, *args) -> float:
  ca = jax.jit(f).lower(*args).compile().cost_analysis()
  return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])


def test_one_tile_costs_the_dense_matmuls_xla_counts():
  """With one tile (sequence = block) the kernel does exactly the dense attention's matmuls: QKᵀ and PV forward;
  backward the four gradient matmuls of those two plus QKᵀ again, which is what XLA keeps of a jax.vjp that returns
  only the gradients (PV itself is dead there)."""
  T = 128
  q, k, v, do = (jnp.ones((T, HD), jnp.float32) for _ in range(4))
  scores = lambda q, k: q @ k.T  # noqa: E731
  attend = lambda q, k, v: scores(q, k) @ v  # noqa: E731  (the matmul structure; the softmax is elementwise)

  def backward(q, k, v, do):
    return jax.vjp(attend, q, k, v)[1](do)

  cost = splash.kernel_cost(T, HD, itemsize=2)
  assert cost["forward"][0] == xla_flops(attend, q, k, v)
  assert cost["backward"][0] == xla_flops(backward, q, k, v, do) == 5 * xla_flops(scores, q, k)


def test_long_sequences_take_the_separate_backward_kernels():
  """Past FUSED_MAX_KV_BLOCKS key blocks the fused backward's partial-dQ buffer (one per key block) is too large:
  the dq and dkv kernels run instead, 3 + 4 tile matmuls per kept tile against the forward's 2."""
  short, long = 512 * splash.FUSED_MAX_KV_BLOCKS, 512 * (splash.FUSED_MAX_KV_BLOCKS + 1)
  assert splash.fused_backward(short, 512) and not splash.fused_backward(long, 512)
  for T, matmuls in ((short, 5), (long, 7)):
    cost = splash.kernel_cost(T, HD, 2)
    assert cost["backward"][0] * 2 == cost["forward"][0] * matmuls


def test_tiles_are_those_the_causal_mask_keeps():
  """A block is computed iff the causal mask keeps any of its entries; the count is read off the mask."""
  for T in (512, 1024, 4096, 3 * 128):
    b = splash.block_size(T)
    n = T // b
    mask = np.tril(np.ones((T, T), bool))
    kept = mask.reshape(n, b, n, b).any(axis=(1, 3)).sum()
    assert splash.kernel_cost(T, HD, 2)["forward"][0] == kept * 2 * (2 * b * b * HD)


def test_bytes_grow_with_the_streamed_tiles_and_the_itemsize():
  small, large = splash.kernel_cost(1024, HD, 2), splash.kernel_cost(2048, HD, 2)
  # forward: K and V streamed per kept tile (2 x 512 x 64 x 2 bytes each) plus Q, O and the float32 log-sum-exp
  assert small["forward"][1] == 3 * 2 * 512 * HD * 2 + 2 * 1024 * HD * 2 + 4 * 1024
  assert large["forward"][1] > 2 * small["forward"][1]  # kept tiles grow with the square of the length
  assert splash.kernel_cost(1024, HD, 4)["backward"][1] > small["backward"][1]


def test_auto_runs_the_kernel_only_for_tpu_and_whole_tiles():
  assert jax.devices()[0].platform == "cpu"
  assert not splash.applies("auto", 256, 4)  # here: the XLA path
  assert splash.applies("auto", 256, 4, platform="tpu")
  assert not splash.applies("auto", 200, 4, platform="tpu")  # not a multiple of 128: XLA attention
  assert splash.applies("splash", 256, 4)  # asked for: interpret mode off TPU
  assert not splash.applies("xla", 256, 4, platform="tpu")
