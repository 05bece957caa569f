"""Preference heads: each loss against float64 NumPy, closed forms, pairs kept apart in packed rows, padding-proof."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config_lib, objectives
from fmjax.data import ByteTokenizer, embedded, formats, instruct, layout, pipeline
from fmjax.data.sources import WHERE
from fmjax.objectives import LossContext
from fmjax.objectives import preference_losses as L

TOK = ByteTokenizer()
rng = np.random.default_rng(0)
P = 64
PC, PR, RC, RR = (-rng.uniform(1, 60, P).astype(np.float32) for _ in range(4))
NC, NR = (rng.integers(1, 40, P).astype(np.float32) for _ in range(2))
f64 = lambda *xs: [np.asarray(x, np.float64) for x in xs]  # noqa: E731


def logsig(x):
  return -np.logaddexp(0.0, -x)


def close(ours, ref):
  np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_and_cdpo_match_float64(eps):
  pc, pr, rc, rr = f64(PC, PR, RC, RR)
  h = (pc - pr) - (rc - rr)
  close(L.dpo(PC, PR, RC, RR, 0.1, eps), -(1 - eps) * logsig(0.1 * h) - eps * logsig(-0.1 * h))


def test_ipo_simpo_orpo_kto_match_float64():
  pc, pr, rc, rr, nc, nr = f64(PC, PR, RC, RR, NC, NR)
  close(L.ipo(PC, PR, RC, RR, NC, NR, 0.5), ((pc / nc - pr / nr) - (rc / nc - rr / nr) - 1 / (2 * 0.5)) ** 2)
  close(L.simpo(PC, PR, NC, NR, 2.0, 0.8), -logsig(2.0 * (pc / nc - pr / nr) - 0.8))
  a_c, a_r = pc / nc, pr / nr
  log_odds = (a_c - a_r) - (np.log(1 - np.exp(a_c)) - np.log(1 - np.exp(a_r)))
  close(L.orpo_log_odds(PC, PR, NC, NR), log_odds)
  close(L.orpo(PC, PR, NC, NR, 0.1), -0.1 * logsig(log_odds))
  z0 = max(np.mean(np.concatenate([pc - rc, pr - rr])), 0.0)
  close(L.kto_reference_point(jnp.concatenate([PC, PR]), jnp.concatenate([RC, RR]), jnp.ones(2 * P)), z0)
  c, r = L.kto(PC, PR, RC, RR, 0.1, np.float32(z0), 1.0, 1.33)
  close(c, 1 - 1 / (1 + np.exp(-0.1 * ((pc - rc) - z0))))
  close(r, 1.33 * (1 - 1 / (1 + np.exp(-0.1 * (z0 - (pr - rr))))))


def test_closed_forms():
  close(L.dpo(PC, PR, PC, PR, 0.1), np.full(P, math.log(2)))  # policy = reference
  close(L.dpo(PC, PR, PC, PR, 0.1, 0.25), np.full(P, math.log(2)))
  close(L.ipo(PC, PR, PC, PR, NC, NR, 0.5), np.full(P, 1.0))  # (0 − 1/(2β))² = 1/(4β²)
  close(L.dpo(PC, PR, RC, RR, 0.1, 0.3), L.dpo(PR, PC, RR, RC, 0.1, 0.7))  # swapping the pair flips the label
  margin = np.float32(0.25)  # SimPO at the target margin: −logσ(0) = ln 2
  close(L.simpo(margin * NC, np.zeros(P, np.float32), NC, NR, 2.0, 0.5), np.full(P, math.log(2)))
  grad = jax.grad(lambda pc, pr: jnp.sum(L.dpo(pc, pr, RC, RR, 0.1)), argnums=(0, 1))(PC, PR)
  assert np.all(grad[0] < 0) and np.all(grad[1] > 0)  # raise the chosen, lower the rejected
  tiny = jnp.full(4, -1e-8, jnp.float32)
  assert np.all(np.isfinite(L.orpo(tiny, tiny * 3, jnp.ones(4), jnp.ones(4), 0.1)))


def pairs(n=12):
  records = [{"prompt": f"q{i}: " + "w" * (i % 5), "chosen": f" right {i}", "rejected": " wrong" + "!" * (i % 7),
              WHERE: f"m{i}"} for i in range(n)]
  c = config_lib.base()
  return pipeline._rows(records, formats.Encoder("preference", TOK, "text", 48), "preference", c.data, 48, 0, 0, 1,
                        train=False)


def batch_of(rows, pad=0):
  b = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  return {k: np.pad(v, ((0, 0), (0, pad))) for k, v in b.items()}


def test_pairs_share_segments_across_sides():
  for row in pairs():
    seg_c, seg_r = row["chosen_segment_ids"], row["rejected_segment_ids"]
    assert set(np.unique(seg_c)) - {0} == set(np.unique(seg_r)) - {0}
    for s in np.unique(seg_c[seg_c > 0]):
      prompt_c = TOK.decode(row["chosen_tokens"][seg_c == s]).split(" right")[0]
      assert TOK.decode(row["rejected_tokens"][seg_r == s]).startswith(prompt_c)  # one pair, one prompt


def fake_model(seed):
  """apply(inputs) -> logits that depend on each token and its position only."""
  table = jax.random.normal(jax.random.PRNGKey(seed), (512, TOK.vocab_size))
  return lambda inputs: 3.0 * table[(inputs["tokens"] * 7 + inputs["positions"]) % 512]


def per_pair_reference(batch, model_seed, ref_seed, beta):
  """Each pair's DPO loss from its own unpacked sequences, in float64."""
  out = []
  for i in range(batch["chosen_tokens"].shape[0]):
    for s in np.unique(batch["chosen_segment_ids"][i][batch["chosen_segment_ids"][i] > 0]):
      logps = {}
      for name, seed in (("p", model_seed), ("r", ref_seed)):
        for side in ("chosen_", "rejected_"):
          sel = batch[side + "segment_ids"][i] == s
          tokens, targets = batch[side + "tokens"][i][sel], batch[side + "targets"][i][sel]
          mask = batch[side + "loss_mask"][i][sel]
          logits = np.asarray(fake_model(seed)({"tokens": tokens, "positions": np.arange(len(tokens))}), np.float64)
          lp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
          logps[name + side] = np.sum(np.take_along_axis(lp, targets[:, None], -1)[:, 0] * mask)
      h = (logps["pchosen_"] - logps["prejected_"]) - (logps["rchosen_"] - logps["rrejected_"])
      out.append(-logsig(beta * h))
  return np.asarray(out)


@pytest.mark.parametrize("pad", [0, 16])
def test_dpo_head_on_packed_pairs_equals_each_pair_alone_and_ignores_padding(pad):
  rows = list(pairs())
  batch = batch_of(rows + [{k: np.zeros_like(v) for k, v in rows[0].items()}], pad)  # + an all-padding row
  cfg = config_lib.use_head(config_lib.base(), "dpo", beta=0.5)
  policy, reference = fake_model(1), fake_model(2)
  ctx = LossContext(apply=lambda params, inputs: policy(inputs), frozen={"reference": reference})
  loss_sum, weight, metrics = objectives.get(cfg).loss(None, {k: jnp.asarray(v) for k, v in batch.items()}, ctx)
  expected = per_pair_reference(batch, 1, 2, 0.5)
  assert float(weight) == len(expected) == 12
  np.testing.assert_allclose(float(loss_sum) / float(weight), expected.mean(), rtol=1e-5)
  assert 0 <= float(metrics["rewards/accuracy"]) <= float(weight)


def test_embedded_preference_pairs_are_right_vs_another_functions_answer():
  train, held = instruct.preference_records("train"), instruct.preference_records("validation")
  assert len(train) > 5000 and len(held) > 500
  record = dict(held)["summarize:json.dumps"]
  assert record["prompt"][0]["content"].startswith("Summarize this function in one sentence:\ndef dumps(obj")
  assert record["chosen"][0]["content"] == "Serialize ``obj`` to a JSON formatted ``str``."
  assert record["rejected"][0]["content"] != record["chosen"][0]["content"]
  assert all(r["chosen"] != r["rejected"] for _, r in train)
  api = embedded.api_entries()
  module = lambda key: api[key.split(":", 1)[1]]["module"]  # noqa: E731
  assert not {module(k) for k, _ in train} & {module(k) for k, _ in held}  # held out by module, as embedded:instruct


def test_kto_on_unpaired_records_matches_each_response_alone():
  records = [{"prompt": f"q{i}: ", "completion": " yes" * (i % 3 + 1), "label": i % 3 != 0, WHERE: f"u{i}"}
             for i in range(10)]
  assert formats.detect(records[0], "text") == "unpaired"
  c = config_lib.base()
  rows = list(pipeline._rows(records, formats.Encoder("unpaired", TOK, "text", 48), "unpaired", c.data, 48, 0, 0, 1,
                             train=False))
  batch = batch_of(rows, pad=5)
  assert set(batch) == set(layout.of_format("unpaired").dtypes()) and "label" in batch
  cfg = config_lib.use_head(config_lib.base(), "kto", beta=0.5, kto_undesirable_weight=1.5)
  policy, reference = fake_model(1), fake_model(2)
  ctx = LossContext(apply=lambda params, inputs: policy(inputs), frozen={"reference": reference})
  loss_sum, weight, metrics = objectives.get(cfg).loss(None, {k: jnp.asarray(v) for k, v in batch.items()}, ctx)
  r, labels = [], []  # each response alone, float64
  for i in range(batch["tokens"].shape[0]):
    for s in np.unique(batch["segment_ids"][i][batch["segment_ids"][i] > 0]):
      sel = batch["segment_ids"][i] == s
      tokens, targets, mask = batch["tokens"][i][sel], batch["targets"][i][sel], batch["loss_mask"][i][sel]
      lp = [np.sum(np.take_along_axis(log_softmax_np(m({"tokens": tokens, "positions": np.arange(len(tokens))})), targets[:, None],
                                      -1)[:, 0] * mask) for m in (policy, reference)]
      r.append(lp[0] - lp[1])
      labels.append(batch["label"][i][sel][0] > 0)
  r, labels = np.asarray(r), np.asarray(labels)
  z0 = max(r.mean(), 0.0)
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  losses = np.where(labels, 1 - sig(0.5 * (r - z0)), 1.5 * (1 - sig(0.5 * (z0 - r))))
  assert float(weight) == 10 and labels.sum() == 6
  np.testing.assert_allclose(float(loss_sum) / float(weight), losses.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]) / float(weight), z0, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="label must be true"):
    formats.Encoder("unpaired", TOK)({"prompt": "p", "completion": "c", "label": "yes"})


def log_softmax_np(logits):
  x = np.asarray(logits, np.float64)
  return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
