"""Decoding. `generate` samples with a KV cache; `greedy` recomputes the whole buffer for every token (no cache),
the simple and exact reference for checks.

`generate` right-pads the prompts into one [B, P] prefill that fills the cache (fmjax/model/transformer.py). Row b
then decodes at its own positions len_b - 1, len_b, ...: the first step feeds the last prompt token again (so the
prefill needs no logits), and each step writes one slot per row and samples one token. The steps run as one device
loop (`lax.while_loop`, ending when every row has stopped); with stop strings, which need the text, the host drives
one compiled single-token step per token instead. P and the cache length are rounded up to a multiple of `BUCKET`, so prompts of
similar lengths share compiled functions.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.model import ModelConfig, Transformer, init_cache
from fmjax.adapters import Adapter
from fmjax.errors import UserError

BUCKET = 64  # prefill and cache lengths are multiples of this


def filter_logits(logits_BxV: jax.Array, top_k: int | jax.Array = 0, top_p: float | jax.Array = 1.0) -> jax.Array:
  """The logits with everything outside the top-k (when k > 0) and then outside the top-p nucleus set to -inf.

  The nucleus is the smallest set of most likely tokens whose probability (renormalised after top-k) reaches p; it
  always holds the top token, and p >= 1 keeps everything. Tokens tied with the last one kept are kept too."""
  V = logits_BxV.shape[-1]
  sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
  kth_Bx1 = jnp.take(sorted_BxV, jnp.clip(top_k - 1, 0, V - 1), axis=-1)[..., None]
  kth_Bx1 = jnp.where(top_k > 0, kth_Bx1, -jnp.inf)
  sorted_BxV = jnp.where(sorted_BxV >= kth_Bx1, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more likely tokens; 0 for the top one
  n_Bx1 = jnp.sum(before_BxV < top_p, axis=-1, keepdims=True)
  pth_Bx1 = jnp.take_along_axis(sorted_BxV, n_Bx1 - 1, axis=-1)
  threshold_Bx1 = jnp.where(top_p >= 1, kth_Bx1, jnp.maximum(kth_Bx1, pth_Bx1))
  return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def sample_logits(rng: jax.Array, logits_BxV: jax.Array, temperature: float | jax.Array, top_k: int | jax.Array = 0,
                  top_p: float | jax.Array = 1.0) -> jax.Array:
  """One token id per row drawn from softmax(logits / temperature) restricted to `filter_logits` (temperature > 0)."""
  return jax.random.categorical(rng, filter_logits(logits_BxV / temperature, top_k, top_p), axis=-1)


@functools.lru_cache(maxsize=32)
def _compiled(model_cfg: ModelConfig, adapter: Adapter | None, sampling: bool):
  """(prefill, step) jitted for one model; jit keeps one executable per shape."""
  module = Transformer(model_cfg, adapter)

  @functools.partial(jax.jit, static_argnums=2)
  def prefill(params, tokens_BxP, cache_len, inputs):
    B, P = tokens_BxP.shape
    positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    _, cache = module.apply({"params": params}, tokens_BxP, jnp.ones_like(tokens_BxP), positions_BxP,
                            cache=init_cache(model_cfg, B, cache_len), adapter_inputs=inputs)
    return cache  # the logits are unused, so XLA drops the unembedding

  def step(params, cache, tokens_B, positions_B, rng, t, temperature, top_k, top_p, inputs):
    tokens_Bx1 = tokens_B[:, None]
    logits_Bx1xV, cache = module.apply({"params": params}, tokens_Bx1, jnp.ones_like(tokens_Bx1), positions_B[:, None],
                                       cache=cache, adapter_inputs=inputs)
    if sampling:
      next_B = sample_logits(jax.random.fold_in(rng, t), logits_Bx1xV[:, 0], temperature, top_k, top_p)
    else:
      next_B = jnp.argmax(logits_Bx1xV[:, 0], axis=-1)
    # the token's log-prob under softmax(logits / temperature), unfiltered: what a training forward recomputes
    logp_BxV = jax.nn.log_softmax(logits_Bx1xV[:, 0] / jnp.where(sampling, temperature, 1.0), axis=-1)
    return cache, next_B.astype(jnp.int32), jnp.take_along_axis(logp_BxV, next_B[:, None], axis=-1)[:, 0]

  @functools.partial(jax.jit, static_argnums=2)  # the cache is not returned, so donating it would buy nothing
  def decode(params, cache, max_new, tokens_B, positions_B, rng, temperature, top_k, top_p, first, stops_S):
    """Every decoding step in one device loop (no host round trip per token): ([B, max_new] ids, their log-probs,
    [B] lengths), each row ending at and including its first id in `stops_S`."""
    B = tokens_B.shape[0]
    later = jax.tree.map(jnp.zeros_like, first)

    def body(carry):
      t, cache, tokens_B, positions_B, done_B, ids_BxN, logps_BxN, lengths_B = carry
      inputs = jax.tree.map(lambda a, z: jnp.where(t == 0, a, z), first, later)
      cache, next_B, logp_B = step(params, cache, tokens_B, positions_B, rng, t, temperature, top_k, top_p, inputs)
      active_B = ~done_B  # a finished row re-feeds its last token at its last position: its outputs are ignored
      ids_BxN = ids_BxN.at[:, t].set(jnp.where(active_B, next_B, 0))
      logps_BxN = logps_BxN.at[:, t].set(jnp.where(active_B, logp_B, 0.0))
      done_B = done_B | (active_B & jnp.isin(next_B, stops_S))
      return (t + 1, cache, jnp.where(active_B, next_B, tokens_B), jnp.where(active_B, positions_B + 1, positions_B),
              done_B, ids_BxN, logps_BxN, lengths_B + active_B)

    carry = (jnp.int32(0), cache, tokens_B, positions_B, jnp.zeros(B, bool), jnp.zeros((B, max_new), jnp.int32),
             jnp.zeros((B, max_new), jnp.float32), jnp.zeros(B, jnp.int32))
    carry = jax.lax.while_loop(lambda c: (c[0] < max_new) & ~jnp.all(c[4]), body, carry)
    return carry[5], carry[6], carry[7]

  return prefill, jax.jit(step, donate_argnums=1), decode


def _bucket(n: int) -> int:
  return -(-n // BUCKET) * BUCKET


def generate(model_cfg: ModelConfig, adapter: Adapter | None, params, prompts: Sequence[np.ndarray],
             max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), rng: jax.Array | None = None, stop_texts: Sequence[str] = (),
             decode: Callable[[list[int]], str] | None = None, with_logps: bool = False, device_loop: bool = True):
  """Each prompt's continuation (ids, without the prompt), decoded with a KV cache: argmax at temperature 0, else a
  draw from softmax(logits / temperature) after top-k (k > 0) and top-p filtering (`filter_logits`), with a fresh
  key per step from `rng`. A row ends at (and includes) its first id in `stop_ids`, once `decode(ids)` contains one
  of `stop_texts`, or after `max_new_tokens`; finished rows stop changing, and decoding stops when all have ended.
  `with_logps`: also each continuation's per-token log-probs (float32) under softmax(logits / temperature), as
  (ids, logps) lists. `device_loop=False` drives the steps from the host (what stop strings need) in any case."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("generate needs at least one prompt and at least one token (e.g. BOS) in every prompt.")
  if any(np.min(p) < 0 or np.max(p) >= model_cfg.vocab_size for p in prompts):
    raise UserError(f"prompt ids must lie in [0, {model_cfg.vocab_size}) (model.vocab_size).")
  if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise UserError(f"need max_new_tokens >= 0, temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                    f"{max_new_tokens=}, {temperature=}, {top_k=}, {top_p=}.")
  if stop_texts and decode is None:
    raise UserError(f"stop_texts={list(stop_texts)} needs `decode` (ids -> text) to be found.")
  B, longest = len(prompts), max(len(p) for p in prompts)
  lengths_B = np.asarray([len(p) for p in prompts], np.int32)
  tokens_BxP = np.zeros((B, _bucket(longest)), np.int32)
  for i, p in enumerate(prompts):
    tokens_BxP[i, :len(p)] = p
  prefill, step, device_loop = _compiled(model_cfg, adapter, temperature > 0)
  # a parameterisation's per-token columns (e.g. edit positions) cover the prompt: the prefill, and the first
  # step, which re-feeds each prompt's last token; later steps get zeros
  columns = adapter.prompt_columns(lengths_B, tokens_BxP.shape[1]) if adapter is not None else {}
  cache = prefill(params, tokens_BxP, _bucket(longest + max_new_tokens), columns)
  tokens_B, positions_B = tokens_BxP[np.arange(B), lengths_B - 1], lengths_B - 1
  last = {k: v[np.arange(B), lengths_B - 1][:, None] for k, v in columns.items()}
  later = {k: np.zeros_like(v) for k, v in last.items()}
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if device_loop and not stop_texts and max_new_tokens:  # no host work between tokens: one device loop
    ids_BxN, logps_BxN, lengths_B = jax.device_get(device_loop(
        params, cache, max_new_tokens, tokens_B, positions_B, rng, temperature, top_k, top_p, last,
        np.asarray(stop_ids, np.int32)))
    ids = [ids_BxN[i, :n].astype(np.int32) for i, n in enumerate(lengths_B)]
    return (ids, [logps_BxN[i, :n] for i, n in enumerate(lengths_B)]) if with_logps else ids
  out, logps, done = [[] for _ in range(B)], [[] for _ in range(B)], np.zeros(B, bool)
  for t in range(max_new_tokens):
    cache, next_B, logp_B = step(params, cache, tokens_B, positions_B, rng, t, temperature, top_k, top_p,
                                 last if t == 0 else later)
    next_B, logp_B = np.asarray(next_B), np.asarray(logp_B)
    for i in np.flatnonzero(~done):  # a finished row re-feeds one token at one position: its outputs are ignored
      out[i].append(int(next_B[i]))
      logps[i].append(float(logp_B[i]))
      done[i] = out[i][-1] in stop_ids or any(s in decode(out[i]) for s in stop_texts)
      tokens_B[i], positions_B[i] = next_B[i], positions_B[i] + 1
    if done.all():
      break
  ids = [np.asarray(o, np.int32) for o in out]
  return (ids, [np.asarray(lp, np.float32) for lp in logps]) if with_logps else ids


@functools.partial(jax.jit, static_argnums=0)
def _last_argmax(apply: Callable[..., jax.Array], params, tokens_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """Argmax of each row's logits at its last token (position length - 1), from a full forward of the buffer."""
  B, L = tokens_BxL.shape
  positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  logits_BxLxV = apply(params, tokens_BxL, jnp.ones_like(tokens_BxL), positions_BxL)
  return jnp.argmax(jnp.take_along_axis(logits_BxLxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0], axis=-1)


def greedy(apply: Callable[..., jax.Array], params, prompts: Sequence[np.ndarray], max_new_tokens: int,
           stop_ids: Sequence[int] = ()) -> list[np.ndarray]:
  """The greedy continuation of each prompt (ids, without the prompt), ending at (and including) the first stop id
  or after `max_new_tokens`, by full recomputation. `apply(params, tokens, segment_ids, positions) -> logits [B,T,V]`.

  Prompts of different lengths share one fixed [B, L] buffer (L = longest prompt + max_new_tokens), so one compiled
  forward serves every step (and later calls with the same `apply` and shapes); causal attention means the padding
  after a row's end never affects its next token."""
  B, L = len(prompts), max(len(p) for p in prompts) + max_new_tokens
  tokens = np.zeros((B, L), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  done = np.zeros(B, bool)
  out = [[] for _ in range(B)]
  for _ in range(max_new_tokens):
    nxt = np.asarray(_last_argmax(apply, params, tokens, lengths))
    for i in np.flatnonzero(~done):
      out[i].append(int(nxt[i]))
      tokens[i, lengths[i]] = nxt[i]
      done[i] = int(nxt[i]) in stop_ids
    lengths = np.where(done, lengths, lengths + 1)
    if done.all():
      break
  return [np.asarray(o, np.int32) for o in out]
