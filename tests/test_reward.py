"""Score models, the `reward` and `classify` heads: last-token scores per packed segment, the losses against float64
NumPy and closed forms, classification records, a new score head over a language model's trunk, tools/score.py."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import adapters, config_lib, objectives
from fmjax.data import ByteTokenizer, formats, layout, pipeline, topics
from fmjax.data.sources import WHERE, DataError
from fmjax.errors import UserError
from fmjax.model import ModelConfig, Transformer, init_params
from fmjax.objectives import LossContext
from fmjax.objectives.score import last_token_scores

TOK = ByteTokenizer()
CFG = ModelConfig(vocab_size=TOK.vocab_size, num_labels=1)


def logsig(x):
  return -np.logaddexp(0.0, -x)


def rows(fmt, records, seq_len=48, num_labels=0):
  c = config_lib.base()
  enc = formats.Encoder(fmt, TOK, "text", seq_len, num_labels=num_labels)
  return list(pipeline._rows(records, enc, fmt, c.data, seq_len, 0, 0, 1, train=False))


def batch_of(rs, pad=0):
  b = {k: np.stack([r[k] for r in rs]) for k in rs[0]}
  return {k: jnp.asarray(np.pad(v, ((0, 0), (0, pad)))) for k, v in b.items()}


def fake_scores(seed, k=1):
  """apply(inputs) -> [B,T,k] scores that depend on each token and its position only."""
  table = jax.random.normal(jax.random.PRNGKey(seed), (512, k))
  return lambda params, inputs: 2.0 * table[(inputs["tokens"] * 7 + inputs["positions"]) % 512]


def pairs(n=10):
  return [{"prompt": f"q{i}: " + "w" * (i % 5), "chosen": f" right {i}", "rejected": " wrong" + "!" * (i % 7),
           WHERE: f"m{i}"} for i in range(n)]


def test_a_sequence_scores_the_same_packed_with_others_and_padded_alone():
  params = init_params(CFG, jax.random.PRNGKey(0))
  model = Transformer(CFG)
  seqs = [np.asarray(TOK.encode(t), np.int32) for t in ("first one", "the second sequence", "3rd")]
  T = 40
  packed, seg, pos = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32), np.zeros((1, T), np.int32)
  at = 0
  for k, s in enumerate(seqs, 1):
    packed[0, at:at + len(s)], seg[0, at:at + len(s)], pos[0, at:at + len(s)] = s, k, np.arange(len(s))
    at += len(s)
  got, present = last_token_scores(model.apply({"params": params}, packed, seg, pos), jnp.asarray(seg))
  assert np.asarray(present[0]).tolist()[:5] == [0, 1, 1, 1, 0]
  for k, s in enumerate(seqs, 1):
    alone = np.zeros((1, T), np.int32)
    alone[0, :len(s)] = s
    one = (alone > 0).astype(np.int32) * 0 + (np.arange(T) < len(s))
    scores = model.apply({"params": params}, alone, one, np.broadcast_to(np.arange(T), (1, T)))
    np.testing.assert_allclose(float(got[0, k, 0]), float(scores[0, len(s) - 1, 0]), rtol=1e-5, atol=1e-6)
    assert float(got[0, k, 0]) != float(got[0, k % 3 + 1, 0])


@pytest.mark.parametrize("margin,center", [(0.0, 0.0), (0.5, 0.01)])
def test_reward_loss_matches_float64_bradley_terry_per_pair(margin, center):
  rs = rows("preference", pairs())
  batch = batch_of(rs + [{k: np.zeros_like(v) for k, v in rs[0].items()}], pad=8)  # + padding row and columns
  cfg = config_lib.use_head(config_lib.base(), "reward", reward_margin=margin, center_rewards_coefficient=center)
  apply = fake_scores(3)
  loss_sum, weight, metrics = objectives.get(cfg).loss(None, batch, LossContext(apply=apply))
  expected, acc, chosen_all = [], [], []
  for i in range(batch["chosen_tokens"].shape[0]):
    for s in np.unique(np.asarray(batch["chosen_segment_ids"][i])):
      if s == 0:
        continue
      r = {}
      for side in ("chosen_", "rejected_"):
        sel = np.asarray(batch[side + "segment_ids"][i]) == s
        toks = np.asarray(batch[side + "tokens"][i])[sel]
        r[side] = float(apply(None, {"tokens": toks, "positions": np.arange(len(toks))})[-1, 0])
      d = np.float64(r["chosen_"]) - r["rejected_"]
      expected.append(-logsig(d - margin) + center * (r["chosen_"] + r["rejected_"]) ** 2)
      acc.append(d > 0)
      chosen_all.append(r["chosen_"])
  assert float(weight) == len(expected) == 10
  np.testing.assert_allclose(float(loss_sum) / float(weight), np.mean(expected), rtol=1e-6)
  assert float(metrics["accuracy"]) == sum(acc)
  np.testing.assert_allclose(float(metrics["rewards/chosen"]) / 10, np.mean(chosen_all), rtol=1e-5)


def test_reward_loss_is_ln2_at_equal_scores_and_a_tie_is_no_hit():
  batch = batch_of(rows("preference", pairs(4)))
  cfg = config_lib.use_head(config_lib.base(), "reward")
  ctx = LossContext(apply=lambda params, inputs: jnp.zeros(inputs["tokens"].shape + (1,)))
  loss_sum, weight, metrics = objectives.get(cfg).loss(None, batch, ctx)
  np.testing.assert_allclose(float(loss_sum) / float(weight), math.log(2), rtol=1e-6)
  assert float(metrics["accuracy"]) == 0.0  # strictly higher counts; equal scores are no hit
  grad = jax.grad(lambda s: objectives.get(cfg).loss(
      None, batch, LossContext(apply=lambda p, inputs: jnp.full(inputs["tokens"].shape + (1,), s)))[0])(0.3)
  assert abs(float(grad)) < 1e-6  # the same shift on both sides changes nothing (without centring)


def classification_records(n=9, k=3):
  return [{"text": f"item {i} " + "x" * (i % 4), "label": i % k, WHERE: f"r{i}"} for i in range(n)]


def test_classify_loss_matches_float64_cross_entropy_and_packs():
  rs = rows("classification", classification_records(), num_labels=3)
  assert len(rs) < 9  # several records share a row
  batch = batch_of(rs, pad=4)
  cfg = config_lib.use_head(config_lib.base(), "classify")
  apply = fake_scores(5, k=3)
  loss_sum, weight, metrics = objectives.get(cfg).loss(None, batch, LossContext(apply=apply))
  nll, hits = [], 0
  for i in range(batch["tokens"].shape[0]):
    seg = np.asarray(batch["segment_ids"][i])
    for s in np.unique(seg[seg > 0]):
      toks = np.asarray(batch["tokens"][i])[seg == s]
      label = int(np.asarray(batch["label"][i])[seg == s][0])
      z = np.asarray(apply(None, {"tokens": toks, "positions": np.arange(len(toks))})[-1], np.float64)
      nll.append(np.logaddexp.reduce(z) - z[label])
      hits += int(np.argmax(z) == label)
  assert float(weight) == len(nll) == 9
  np.testing.assert_allclose(float(loss_sum) / 9, np.mean(nll), rtol=1e-6)
  assert float(metrics["accuracy"]) == hits


def test_classification_records_detect_and_bad_labels_name_the_fix():
  assert formats.detect({"text": "a", "label": 2}, "text") == "classification"
  assert formats.detect({"prompt": "a", "completion": "b", "label": True}, "text") == "unpaired"
  assert layout.of_format("classification") == layout.Layout("labelled", ("label",))
  enc = formats.Encoder("classification", TOK, num_labels=3)
  assert enc({"text": "abc", "label": 2})["label"][0] == 2.0
  for bad in (3, -1, "spam", True):
    with pytest.raises(DataError, match=r"label=.* must be a class id, an integer in \[0, 3\).*model.num_labels"):
      enc({"text": "abc", "label": bad, WHERE: "f.jsonl:4"})


def test_embedded_topics_are_labelled_docstrings_split_by_module():
  train, held = topics.load_records("train"), topics.load_records("validation")
  assert len(train) > 1000 and len(held) > 100
  assert {r["label"] for _, r in train} == set(range(len(topics.LABELS)))
  assert not {k for k, _ in train} & {k for k, _ in held}
  key, record = train[0]
  assert key.startswith("topics:") and topics.LABELS[record["label"]] == key[len("topics:"):].split(".")[0]


def test_a_head_and_the_model_output_must_agree():
  for name, num_labels, need in (("reward", 0, "1"), ("reward", 3, "1"), ("classify", 1, ">= 2"), ("sft", 1, "0")):
    cfg = config_lib.use_head(config_lib.base(), name)
    with pytest.raises(UserError, match=f"objective.name='{name}' .* model.num_labels={num_labels}; set "
                                        f"model.num_labels to {need}"):
      objectives.get(cfg).check_model(name, num_labels)
  objectives.get(config_lib.base().objective).check_model("lm", 0)


def test_a_score_head_trains_under_lora():
  from fmjax.adapters.lora import LoraConfig
  params = init_params(CFG, jax.random.PRNGKey(0), adapter=LoraConfig(rank=2))
  trained, base = adapters.split(LoraConfig(rank=2), params)
  assert "score" in trained and "score" not in base and "unembed" not in base


@pytest.mark.slow
def test_reward_run_starts_from_a_language_model_trunk_and_scores_like_training(tmp_path, repo, cpu_env):
  """A reward model started from a pre-trained run keeps its trunk and starts a fresh score head; tools/score.py
  gives each response the score the training loss reads."""
  import fmjax
  from fmjax.train import loop

  pt = config_lib.load(os.path.join(repo, "configs/pretrain.py:smoke"))
  pt.train.steps, pt.optimizer.warmup_steps, pt.eval.every_steps, pt.checkpoint.every_steps = 2, 0, 0, 2
  loop.train(pt, str(tmp_path / "pt"))
  c = config_lib.load(os.path.join(repo, f"configs/reward.py:smoke,init_from={tmp_path / 'pt'}"))
  c.train.steps, c.optimizer.warmup_steps, c.optimizer.lr = 1, 0, 1e-12
  c.eval.every_steps, c.checkpoint.every_steps = 0, 1
  exp = loop.train(c, str(tmp_path / "rm"))
  lm = fmjax.load(str(tmp_path / "pt"))
  rm = fmjax.load(str(tmp_path / "rm"))
  assert "unembed" in lm.params and "unembed" not in rm.params and rm.params["score"].shape == (64, 1)
  np.testing.assert_allclose(rm.params["embedding"], lm.params["embedding"], atol=1e-9)
  record = {"prompt": [{"role": "user", "content": "What does `len` do?"}],
            "chosen": [{"role": "assistant", "content": "Return the length."}],
            "rejected": [{"role": "assistant", "content": "Sort a list."}]}
  enc = formats.Encoder("preference", exp.run.tokenizer, chat_template=c.data.chat_template)
  ex = enc(dict(record))
  batch, width = {}, max(len(ex["chosen_tokens"]), len(ex["rejected_tokens"]))
  for side in ("chosen_", "rejected_"):
    n = len(ex[side + "tokens"])
    pad = lambda x: np.pad(x, (0, width - n))[None]  # noqa: E731
    batch.update({side + "tokens": pad(ex[side + "tokens"]), side + "segment_ids": pad(np.ones(n, np.int32)),
                  side + "positions": pad(np.arange(n))})
  from fmjax.objectives.preference import stacked_sides
  from fmjax.objectives.reward import pair_scores
  chosen, rejected, _ = pair_scores(rm.module.apply({"params": rm.params}, *(
      stacked_sides(batch)[k] for k in ("tokens", "segment_ids", "positions"))), batch)
  path = tmp_path / "pairs.jsonl"
  path.write_text(json.dumps(record) + "\n")
  out = subprocess.run([sys.executable, os.path.join(repo, "tools/score.py"), f"--workdir={tmp_path / 'rm'}",
                        f"--input={path}"], capture_output=True, text=True, env=cpu_env(), check=True)
  scored = json.loads(out.stdout)
  np.testing.assert_allclose(scored["score_chosen"], float(chosen[0, 1]), rtol=1e-5)
  np.testing.assert_allclose(scored["score_rejected"], float(rejected[0, 1]), rtol=1e-5)
  assert scored["score_chosen"] != scored["score_rejected"]


@pytest.mark.slow
def test_classify_smoke_runs_standalone(repo, tmp_path, cpu_env):
  proc = subprocess.run([sys.executable, "-m", "fmjax.main", "--config=configs/classify.py:smoke",
                         f"--workdir={tmp_path}"], cwd=repo, env=cpu_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[0]["step"] == 0 and 0 <= rows[0]["eval_accuracy"] <= 1  # the fresh head, before training
  assert rows[-1]["step"] == 30 and rows[-1]["loss"] < math.log(len(topics.LABELS))  # below the uniform guess
