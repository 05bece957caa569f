"""Perplexity and preference accuracy against float64 NumPy recomputations from `Model.logits`."""

import json
import math

import jax
import numpy as np
import pytest

from fmjax import data
from fmjax.api import Model
from fmjax.data import ByteTokenizer
from fmjax.evaluation import perplexity, preference_accuracy
from fmjax.model import init_params, resolve

TOK = ByteTokenizer()
TEXTS = ["The list type", "héllo wörld: non-ASCII bytes", "", "x = 1\n" * 5]


def make_model(seed: int) -> Model:
  cfg = resolve("smoke")
  return Model(cfg, init_params(cfg, jax.random.PRNGKey(seed)), TOK)


@pytest.fixture(scope="module")
def model() -> Model:
  return make_model(0)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def nll64(model: Model, ids: list[int]) -> np.ndarray:
  """−log p(ids[t+1] | ids[:t+1]) for every t: one whole row, float64."""
  logp = log_softmax64(model.logits(np.asarray(ids)[None, :-1]))[0]
  return -logp[np.arange(len(ids) - 1), ids[1:]]


def sequence(text: str) -> list[int]:
  return [TOK.bos_id, *TOK.encode(text).tolist(), TOK.eos_id]


def test_perplexity_and_bits_per_byte_equal_float64_recomputation_of_whole_texts(model):
  got = perplexity(model, TEXTS, seq_len=64, batch_size=3)  # 4 rows: the second batch is mostly padding
  nll = np.concatenate([nll64(model, sequence(t)) for t in TEXTS])
  n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
  assert (got.documents, got.tokens, got.bytes) == (4, n_bytes + 4, n_bytes)  # every byte and one EOS per text
  np.testing.assert_allclose(got.nll_sum, nll.sum(), rtol=1e-5)
  np.testing.assert_allclose(got.nll, nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(got.perplexity, math.exp(nll.mean()), rtol=1e-5)
  np.testing.assert_allclose(got.bits_per_byte, nll.sum() / math.log(2) / n_bytes, rtol=1e-5)


def test_padding_and_batching_do_not_change_the_result(model):
  base = perplexity(model, TEXTS, seq_len=64, batch_size=3)
  for seq_len, batch_size in ((64, 1), (128, 8)):
    got = perplexity(model, TEXTS, seq_len=seq_len, batch_size=batch_size)
    assert got.tokens == base.tokens
    np.testing.assert_allclose(got.nll_sum, base.nll_sum, rtol=1e-6)


@pytest.mark.parametrize("stride", [8, 1])
def test_windows_score_each_token_once_with_the_context_of_its_window(model, stride):
  text = "def add(a, b):\n  return a + b\n"  # 31 bytes: 32 targets, in windows of 8 inputs
  seq = sequence(text)
  # The first input each target sees: its own chunk's start (stride 8), or the 7 tokens before it (stride 1).
  starts = [t // 8 * 8 if stride == 8 else max(0, t - 7) for t in range(len(seq) - 1)]
  rows = np.zeros((len(starts), 8), np.int32)
  for t, s in enumerate(starts):
    rows[t, :t + 1 - s] = seq[s:t + 1]
  logp = log_softmax64(model.logits(rows))
  ref = -sum(logp[t, t - s, seq[t + 1]] for t, s in enumerate(starts))
  got = perplexity(model, [text], seq_len=8, stride=stride, batch_size=4)
  assert got.tokens == len(seq) - 1
  np.testing.assert_allclose(got.nll_sum, ref, rtol=1e-5)


def test_preference_accuracy_and_dpo_rewards_equal_a_direct_computation(model, tmp_path):
  user = lambda s: [{"role": "user", "content": s}]  # noqa: E731
  bot = lambda s: [{"role": "assistant", "content": s}]  # noqa: E731
  records = [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five, or so"},
             {"prompt": "Q: capital of France?", "chosen": " Paris is the capital.", "rejected": " Rome"},
             {"chosen": "no prompt at all", "rejected": "none"},
             {"prompt": user("Name a colour."), "chosen": bot("Blue."), "rejected": bot("A long and wrong answer.")},
             {"prompt": user("Say hi."), "chosen": bot("Hello there, friend!"), "rejected": bot("Bye.")}]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  source = data.open_source(str(path), "all")
  reference = make_model(1)
  got = preference_accuracy(model, [source[i] for i in range(len(source))], reference=reference, batch_size=3)

  def rendered(record, side):  # (prompt text, scored text) as fmjax's default chat template renders them
    prompt, response = record.get("prompt", ""), record[side]
    if isinstance(prompt, list):
      prompt = f"<|user|>{prompt[0]['content']}<|end|>"
    if isinstance(response, list):
      prompt, response = prompt + "<|assistant|>", f"{response[0]['content']}<|end|>"
    return prompt, response

  def logps(m):  # [pairs, 2]: Σ log p over the response's tokens and EOS
    out = []
    for r in records:
      for side in ("chosen", "rejected"):
        prompt, response = rendered(r, side)
        out.append(-nll64(m, sequence(prompt + response))[-len(response.encode()) - 1:].sum())
    return np.reshape(out, (-1, 2))

  policy, ref = logps(model), logps(reference)
  margins = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
  accuracy = np.mean(policy[:, 0] > policy[:, 1])
  assert 0 < accuracy < 1 and 0 < np.mean(margins > 0) < 1  # the pairs test both outcomes
  assert got.pairs == 5
  assert got.accuracy == accuracy
  assert got.reward_accuracy == np.mean(margins > 0)
  np.testing.assert_allclose([got.logp_chosen, got.logp_rejected], policy.mean(0), rtol=1e-5)
  np.testing.assert_allclose(got.reward_margin, margins.mean(), rtol=1e-4, atol=1e-4)
  assert preference_accuracy(model, records[:2]).reward_accuracy is None
