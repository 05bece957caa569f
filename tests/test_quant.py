"""Quantized bases: NF4 / int8 storage equals bitsandbytes' on the same blocks; a quantized projection computes, and
trains adapters, exactly as the float model over the dequantized weights; int8 matmuls equal their closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fmjax import adapters, quant
from fmjax.adapters import lora
from fmjax.model import Transformer, init_params, projection, resolve
from fmjax.quant import blockwise, codes

bnb_f = pytest.importorskip("bitsandbytes.functional")  # the hf extra installs it


def bnb_weight(seed=0, out=96, inputs=512, dtype=torch.float32):
  """A torch Linear weight [out, in] with an all-zero block, and NF4's midpoints (ties) in another."""
  g = torch.Generator().manual_seed(seed)
  w = torch.randn(out, inputs, generator=g) * 0.02
  w[3, :128] = 0
  mid = codes.NF4_MIDPOINTS  # with absmax 1: values exactly between two codes, and one float32 step either side
  w[5, :45] = torch.from_numpy(np.concatenate([mid, np.nextafter(mid, np.float32(2)),
                                               np.nextafter(mid, np.float32(-2))]))
  w[5, 45:64] = 0.0
  w[5, 45] = 1.0
  return w.to(dtype)


def as_kernel(w: torch.Tensor) -> jnp.ndarray:
  """The fmjax kernel [in, out] of a torch weight [out, in], in its dtype."""
  dtype = jnp.bfloat16 if w.dtype == torch.bfloat16 else jnp.float32
  return jnp.asarray(w.float().numpy().T).astype(dtype)


def test_code_books_are_bitsandbytes():
  np.testing.assert_array_equal(codes.NF4, bnb_f.get_4bit_type("nf4", "cpu").numpy())
  np.testing.assert_array_equal(codes.dynamic8(), bnb_f.create_dynamic_map().numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_equals_bitsandbytes(dtype, blocksize):
  w = bnb_weight(dtype=dtype)
  packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
  ours, absmax = blockwise.nf4_quantize(as_kernel(w), blocksize)
  np.testing.assert_array_equal(np.asarray(ours).T.ravel(), packed.numpy().ravel())  # codes, nibble order
  np.testing.assert_array_equal(np.asarray(absmax).T.ravel(), state.absmax.numpy())
  assert np.asarray(absmax).T.ravel()[3 * 512 // blocksize] == 0  # the zero block
  back = blockwise.nf4_dequantize(ours, absmax, as_kernel(w).dtype)
  np.testing.assert_array_equal(np.asarray(back.astype(jnp.float32)).T, bnb_f.dequantize_4bit(packed, state).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_equals_bitsandbytes(dtype):
  w = bnb_weight(seed=1, dtype=dtype)
  w[7, :3] = torch.tensor([1.0, 0.5 / 127, 1.5 / 127]).to(dtype)  # 127·w/absmax at .5: round half to even
  w[7, 3:] = 0
  q, stats, _ = bnb_f.int8_vectorwise_quant(w.clone())
  ours, absmax = blockwise.int8_quantize(as_kernel(w))
  np.testing.assert_array_equal(np.asarray(ours).T, q.numpy())
  np.testing.assert_array_equal(np.asarray(absmax), stats.numpy())
  np.testing.assert_array_equal(np.asarray(blockwise.int8_dequantize(ours, absmax, jnp.float32)).T,
                                bnb_f.int8_vectorwise_dequant(q, stats).numpy())


def test_double_quantisation_equals_bitsandbytes():
  """The 8-bit scale codes equal bitsandbytes' reference blockwise quantizer (its default, pure-torch kernel; its
  CPU kernel rounds a few values near code midpoints the other way) on the same values, including a short last
  block; and scales and weights dequantized from bitsandbytes' own nested state equal its dequantization."""
  w = bnb_weight(seed=2, out=100, inputs=512)
  packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
  assert state.nested
  ours_q, ours_absmax = blockwise.nf4_quantize(as_kernel(w), 64)
  plain_absmax = np.asarray(ours_absmax).T.ravel()  # 800 scales: three blocks of 256 and one of 32
  values = torch.from_numpy(plain_absmax.copy()) - state.offset
  reference = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
      torch._C.DispatchKeySet("CompositeExplicitAutograd"), values, bnb_f.create_dynamic_map(), 256)
  q8, absmax2 = blockwise.blockwise8_quantize(jnp.asarray(values.numpy()))
  np.testing.assert_array_equal(np.asarray(q8), reference[0].numpy())
  np.testing.assert_array_equal(np.asarray(absmax2), reference[1].numpy())
  # bitsandbytes' nested state in fmjax's layout: scales [I/64, O], bitsandbytes orders them [O, I/64]
  nested = jnp.asarray(state.absmax.numpy().reshape(100, 8).T)
  scales = blockwise.double_dequantize(nested, jnp.asarray(state.state2.absmax.numpy()), jnp.asarray(state.offset))
  np.testing.assert_array_equal(np.asarray(scales).T.ravel(),
                                (bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy())
  np.testing.assert_array_equal(np.asarray(ours_q).T.ravel(), packed.numpy().ravel())  # the 4-bit codes: unchanged
  weight = blockwise.nf4_dequantize(ours_q, scales, jnp.float32)
  np.testing.assert_array_equal(np.asarray(weight).T, bnb_f.dequantize_4bit(packed, state).numpy())
  # fmjax's own offset is the float32 mean of the same scales (its last bit may differ from torch's reduction)
  _, _, offset = blockwise.double_quantize(ours_absmax)
  np.testing.assert_allclose(float(offset), float(state.offset), rtol=1e-6)


def test_model_kernels_are_the_layers_bitsandbytes_would_store():
  """A q kernel [D, N, H], an o kernel [N, H, D] (blocks across heads: H < 64) and the embedding [V, D] hold the
  codes bitsandbytes stores for q_proj [N·H, D], o_proj [D, N·H] and the embedding table (Embedding4bit's rows)."""
  rng = np.random.default_rng(0)
  D, N, H, V = 128, 4, 32, 96
  scheme = quant.Scheme("nf4", 64)
  for kernel, n_in, torch_weight, transposed in (
      (rng.normal(size=(D, N, H)), 1, lambda k: k.reshape(D, N * H).T, False),
      (rng.normal(size=(N, H, D)), 2, lambda k: k.reshape(N * H, D).T, False),
      (rng.normal(size=(V, D)), 1, lambda k: k, True)):
    kernel = kernel.astype(np.float32)
    q = quant.quantize(jnp.asarray(kernel), scheme, n_in, transposed=transposed)
    packed, state = bnb_f.quantize_4bit(torch.from_numpy(np.ascontiguousarray(torch_weight(kernel))), blocksize=64,
                                        quant_type="nf4")
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(q.codes.shape[0], -1).T.ravel(), packed.numpy().ravel())
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(
        torch_weight(bnb_f.dequantize_4bit(packed, state).numpy().T.reshape(kernel.shape[::-1]).T)
        if transposed else bnb_f.dequantize_4bit(packed, state).numpy().T.reshape(kernel.shape)))
    assert q.shape == kernel.shape


def batch(cfg, B=2, T=16):
  tokens = jax.random.randint(jax.random.PRNGKey(2), (B, T), 0, cfg.vocab_size)
  return tokens, jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(T), (B, T))


@pytest.mark.parametrize("kind,double,overrides", [
    ("nf4", False, {}),
    ("nf4", True, {"scan_layers": False, "tie_embeddings": True}),
    ("int8", False, {"qkv_bias": True}),
])
def test_quantized_projections_equal_the_float_model_on_dequantized_weights(kind, double, overrides):
  """Logits and every adapter gradient over a quantized base equal the float model's over the dequantized base
  (1e-5), and the backward pass keeps no dequantized kernel: its residuals are the packed codes."""
  cfg = resolve("smoke", overrides)
  adapter = lora.LoraConfig(rank=4, targets=r"(q|k|v|o|gate|up|down)_kernel$|unembed")
  trained, base = adapters.split(adapter, init_params(cfg, jax.random.PRNGKey(0), adapter=adapter))
  leaves, tree = jax.tree.flatten(trained)
  trained = tree.unflatten([x + 0.05 * jax.random.normal(jax.random.PRNGKey(i), x.shape) for i, x in enumerate(leaves)])
  q = quant.quantize_tree(base, quant.Scheme(kind, 32, double))
  assert quant.count(q) == quant.count(base) and quant.nbytes(q) < 0.45 * quant.nbytes(base)
  model = Transformer(cfg, adapter)

  def loss(t, b):
    return jnp.mean(jnp.sin(model.apply({"params": adapters.combine(b, t)}, *batch(cfg))))

  value, grads = jax.jit(jax.value_and_grad(loss))(trained, q)
  want, want_grads = jax.jit(jax.value_and_grad(loss))(trained, quant.dequantize_tree(q))
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))
  assert float(jnp.max(jnp.abs(value - loss(trained, base)))) > 0  # quantization changed the model
  kernels = {tuple(x.shape) for x in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, quant.Quantized))
             if isinstance(x, quant.Quantized)}
  assert len(kernels) >= 4
  _, backward = jax.vjp(lambda t: loss(t, q), trained)  # its leaves: the residuals the backward pass keeps
  saved = jax.tree.leaves(backward)
  assert any(s.dtype in (jnp.uint8, jnp.int8) for s in saved)
  assert not [s.shape for s in saved if jnp.issubdtype(s.dtype, jnp.floating) and tuple(s.shape) in kernels]


def test_int8_matmuls_equal_their_closed_form():
  """int8_einsum's output and both cotangents equal float64 recomputations of the three quantized matmuls (integer
  products exact), and stay within 3% of the float projection."""
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, 5, 32))
  w = jax.random.normal(kw, (32, 4, 8)) * 0.1
  g = jax.random.normal(kg, (2, 5, 4, 8))
  spec = "BTD,DNH->BTNH"

  def closed(a, b, sub_a, sub_b, out):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    summed = set(sub_a) & set(sub_b)
    qa, qb = [], []
    for v, subs, qs in ((a, sub_a, qa), (b, sub_b, qb)):
      axes = tuple(i for i, c in enumerate(subs) if c in summed)
      scale = np.max(np.abs(v), axis=axes, keepdims=True) / np.float32(127)
      qs.append((np.round(v / scale).astype(np.int64), scale.astype(np.float64)))
    (ia, sa), (ib, sb) = qa[0], qb[0]
    acc = np.einsum(f"{sub_a},{sub_b}->{out}", ia, ib)
    fa = "".join(c for c in sub_a if c not in summed)
    fb = "".join(c for c in sub_b if c not in summed)
    return acc * np.einsum(f"{fa},{fb}->{out}", sa.squeeze(), sb.squeeze())

  y, vjp = jax.vjp(lambda x, w: projection.int8_einsum(spec, x, w), x, w)
  dx, dw = vjp(g)
  np.testing.assert_allclose(y, closed(x, w, "BTD", "DNH", "BTNH"), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dx, closed(g, w, "BTNH", "DNH", "BTD"), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dw, closed(x, g, "BTD", "BTNH", "DNH"), rtol=1e-5, atol=1e-6)
  exact = jnp.einsum(spec, x, w)
  assert 0 < float(jnp.linalg.norm(y - exact) / jnp.linalg.norm(exact)) < 0.03
