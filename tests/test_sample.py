"""KV-cache decoding equals full recomputation (ragged batches, every model variant); sampling filters and draws
match NumPy references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import sample
from fmjax.adapters import lora
from fmjax.model import Transformer, init_cache, init_params, resolve

FILTER, SAMPLE = jax.jit(sample.filter_logits), jax.jit(sample.sample_logits)  # one compile per shape

SMOKE = resolve("smoke")
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=r"(q|k|v|o|gate|up|down)_kernel$|unembed")
LENGTHS = (3, 7, 12)
VARIANTS = {
    "smoke": (SMOKE, None),
    "bias_qknorm_tied_rope_scaling": (dataclasses.replace(SMOKE, qkv_bias=True, qk_norm=True, tie_embeddings=True,
                                                          rope_scaling_factor=8.0, rope_original_max_len=64), None),
    "unscanned": (dataclasses.replace(SMOKE, scan_layers=False), None),
    "lora": (SMOKE, LORA),
    "bfloat16": (dataclasses.replace(SMOKE, dtype="bfloat16"), None),
}


def random_params(cfg, lora_cfg=None, seed=0):
  """The model's parameter tree filled from NumPy (no compiles): weights, biases and LoRA adapters N(0, 0.1), norm
  scales 1 + N(0, 0.05). Logits come out O(1) (float32 error ~1e-6), and every bias, norm and adapter matters."""
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), adapter=lora_cfg))
  rs = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rs.standard_normal(leaf.shape).astype(leaf.dtype)
    return 1 + 0.05 * noise if path[-1].key == "scale" else 0.1 * noise

  return jax.tree_util.tree_map_with_path(fill, shapes)


def prompts(seed=0, lengths=LENGTHS, vocab=512):
  rs = np.random.default_rng(seed)
  return [rs.integers(0, vocab, n).astype(np.int32) for n in lengths]


@pytest.fixture(scope="module")
def smoke_params():
  return random_params(SMOKE)


def full_logits(module, params, tokens_BxT):
  """[B,T,V] from one uncached forward of the whole buffer, each row one sequence from position 0."""
  positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
  forward = jax.jit(lambda p, t: module.apply({"params": p}, t, jnp.ones_like(t), positions_BxT))
  return np.asarray(forward(params, tokens_BxT))


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_full_recomputation_at_every_step(variant):
  cfg, lora_cfg = VARIANTS[variant]
  params = random_params(cfg, lora_cfg, seed=1)
  module, ps, steps = Transformer(cfg, lora_cfg), prompts(), 6
  B, P = len(ps), max(LENGTHS)
  lengths = np.asarray(LENGTHS)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, P + steps)).astype(np.int32)  # junk padding
  for i, p in enumerate(ps):
    tokens[i, :len(p)] = p
  cached = jax.jit(lambda p, t, pos, c: module.apply({"params": p}, t, jnp.ones_like(t), pos, cache=c))

  prefill, cache = cached(params, tokens[:, :P], np.broadcast_to(np.arange(P), (B, P)),
                          init_cache(cfg, B, P + steps))
  step_logits = [np.asarray(prefill)[np.arange(B), lengths - 1]]  # row b's next-token logits, one entry per step
  for j in range(steps - 1):  # row b feeds its newest token at its own position len_b + j
    tokens[np.arange(B), lengths + j] = step_logits[-1].argmax(-1)
    logits, cache = cached(params, tokens[np.arange(B), lengths + j][:, None], (lengths + j)[:, None], cache)
    step_logits.append(np.asarray(logits)[:, 0])
  tokens[np.arange(B), lengths + steps - 1] = step_logits[-1].argmax(-1)

  full = full_logits(module, params, tokens)  # causal: position t of the whole buffer is the forward of its prefix
  assert np.abs(full).max() > 1.0
  prefill = np.asarray(prefill)
  for b, n in enumerate(LENGTHS):
    got = np.concatenate([prefill[b, :n - 1], np.stack([s[b] for s in step_logits])])
    want = full[b, :n - 1 + steps]
    if cfg.dtype == "bfloat16":  # both paths round to bf16 (2^-8 relative), in different shapes and orders
      assert np.linalg.norm(got - want) / np.linalg.norm(want) < 4 * 2.0**-8
    else:
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
      np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_generate_greedy_equals_recomputation_and_each_prompt_alone(smoke_params):
  ps = prompts()
  apply = lambda p, *b: Transformer(SMOKE).apply({"params": p}, *b)  # noqa: E731
  together = sample.generate(SMOKE, None, smoke_params, ps, 8)
  reference = sample.greedy(apply, smoke_params, ps, 8)
  assert len({tuple(o) for o in together}) == 3 and all(len(o) == 8 for o in together)
  for p, out, ref in zip(ps, together, reference):
    np.testing.assert_array_equal(out, ref)
    (alone,) = sample.generate(SMOKE, None, smoke_params, [p], 8)
    np.testing.assert_array_equal(out, alone)


def test_stop_ids_and_stop_texts_end_rows(smoke_params):
  ps = prompts()
  full = sample.generate(SMOKE, None, smoke_params, ps, 8)
  stop = int(full[0][2])

  def cut(ids, ends):
    ids = list(ids)
    return next((ids[:k] for k in range(1, len(ids) + 1) if ends(ids[:k])), ids)

  stopped = sample.generate(SMOKE, None, smoke_params, ps, 8, stop_ids=[stop])
  assert list(stopped[0]) == list(full[0][:list(full[0]).index(stop) + 1])  # the stop id is included
  for got, ids in zip(stopped, full):
    assert list(got) == cut(ids, lambda s: s[-1] == stop)

  decode = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
  text = f"t{full[1][3]} t{full[1][4]}"  # spans two tokens of row 1
  by_text = sample.generate(SMOKE, None, smoke_params, ps, 8, stop_texts=[text], decode=decode)
  assert len(by_text[1]) <= 5 < len(full[1])
  for got, ids in zip(by_text, full):
    assert list(got) == cut(ids, lambda s: text in decode(s))


def test_sampling_top_k_1_is_greedy_and_a_seed_fixes_the_draws(smoke_params):
  ps = prompts()
  greedy = sample.generate(SMOKE, None, smoke_params, ps, 8)
  top1 = sample.generate(SMOKE, None, smoke_params, ps, 8, temperature=1.5, top_k=1, rng=jax.random.PRNGKey(3))
  for a, b in zip(top1, greedy):
    np.testing.assert_array_equal(a, b)
  draw = lambda seed: sample.generate(SMOKE, None, smoke_params, ps, 8, temperature=1.0,  # noqa: E731
                                      rng=jax.random.PRNGKey(seed))
  first, again, other = draw(0), draw(0), draw(1)
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))
  assert not all(np.array_equal(a, b) for a, b in zip(first, greedy))


def test_generate_rejects_bad_arguments(smoke_params):
  with pytest.raises(ValueError, match="needs `decode`"):
    sample.generate(SMOKE, None, smoke_params, prompts(), 4, stop_texts=["x"])
  with pytest.raises(ValueError, match="0 < top_p <= 1"):
    sample.generate(SMOKE, None, smoke_params, prompts(), 4, temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="at least one token"):
    sample.generate(SMOKE, None, smoke_params, [np.zeros(0, np.int32)], 4)


def np_filter(logits, top_k, top_p):
  """Float64 reference: keep the top k (ties at the k-th value kept), then the smallest most-likely set with
  probability >= p (ties with its least likely member kept)."""
  x = np.asarray(logits, np.float64)
  if top_k > 0:
    x = np.where(x >= np.sort(x)[::-1][min(top_k, len(x)) - 1], x, -np.inf)
  if top_p < 1:
    order = np.argsort(-x, kind="stable")
    probs = np.exp(x[order] - x[order[0]])
    cum = np.cumsum(probs / probs.sum())
    n = 1 + int(np.sum(cum[:-1] < top_p))
    x = np.where(x >= x[order[n - 1]], x, -np.inf)
  return x


@pytest.mark.parametrize("top_k", [0, 1, 3, 32, 100])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 1e-6])
def test_filter_logits_matches_numpy(top_k, top_p):
  logits = 2.0 * np.random.default_rng(top_k).standard_normal((16, 32)).astype(np.float32)
  got = np.asarray(FILTER(jnp.asarray(logits), top_k, top_p))
  for row, g in zip(logits, got):
    want = np_filter(row, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(g), np.isfinite(want))
    np.testing.assert_array_equal(g[np.isfinite(g)], row[np.isfinite(want)])


def test_filter_logits_edge_cases():
  def f(x, k=0, p=1.0):
    return np.isfinite(np.asarray(FILTER(jnp.asarray([x], jnp.float32), k, p)))[0]

  assert f([0.0, -100.0, -200.0], p=1.0).all()  # p = 1 keeps even tokens whose probability underflows
  assert list(f([0.5, 3.0, 1.0, 2.9], p=1e-6)) == [False, True, False, False]  # a tiny p keeps only the argmax
  assert list(f([1.0, 3.0, 3.0, 0.0, 3.0], k=2)) == [False, True, True, False, True]  # ties at the k-th value
  assert list(f([2.0, 2.0, 2.0, 0.0], p=0.1)) == [True, True, True, False]  # ties with the last nucleus token
  assert list(f([2.0, 1.0, 0.0, -1.0], k=3, p=0.7)) == list(np.isfinite(np_filter([2.0, 1.0, 0.0, -1.0], 3, 0.7)))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.5, 4, 1.0), (1.0, 0, 0.8), (0.5, 5, 0.9)])
def test_sampled_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
  logits = np.asarray([2.0, 1.5, 0.3, -0.4, 1.0, -1.2], np.float32)
  n = 20_000
  draws = SAMPLE(jax.random.PRNGKey(0), jnp.broadcast_to(jnp.asarray(logits), (n, 6)), temperature,
                               top_k, top_p)
  freq = np.bincount(np.asarray(draws), minlength=6) / n
  x = np_filter(logits / temperature, top_k, top_p)
  q = np.exp(x - x.max())
  q /= q.sum()
  assert np.all(freq[q == 0] == 0)
  np.testing.assert_array_less(np.abs(freq - q), 5 * np.sqrt(q * (1 - q) / n) + 1 / n)  # 5 sigma per token


def test_top_k_1_draws_are_the_argmax():
  logits = np.random.default_rng(2).standard_normal((64, 50)).astype(np.float32)
  draws = SAMPLE(jax.random.PRNGKey(3), logits, 2.0, top_k=1)
  np.testing.assert_array_equal(np.asarray(draws), logits.argmax(-1))
  tiny_p = SAMPLE(jax.random.PRNGKey(3), logits, 2.0, top_p=1e-6)
  np.testing.assert_array_equal(np.asarray(tiny_p), logits.argmax(-1))


def test_the_device_loop_draws_what_the_host_loop_draws(smoke_params):
  """Sampled ids and their log-probs, with stop ids ending rows at different steps: one device loop = the
  host-driven single-token steps."""
  ps = prompts()
  first = sample.generate(SMOKE, None, smoke_params, ps, 12, temperature=1.0, rng=jax.random.PRNGKey(5))
  stop = int(first[1][4])  # ends some rows early, not all at once
  kw = dict(temperature=0.9, top_p=0.95, stop_ids=[stop], rng=jax.random.PRNGKey(5), with_logps=True)
  ids, logps = sample.generate(SMOKE, None, smoke_params, ps, 12, **kw)
  host_ids, host_logps = sample.generate(SMOKE, None, smoke_params, ps, 12, device_loop=False, **kw)
  assert len({len(i) for i in ids}) > 1  # rows stopped at different steps
  for a, b, la, lb in zip(ids, host_ids, logps, host_logps):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(la, lb, atol=1e-6)
