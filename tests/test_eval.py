"""Held-out evaluation: a leak-free document split, and a sharded eval equal to an unsharded recomputation."""

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import config_lib
from fmjax.data import embedded
from fmjax.model import Transformer
from fmjax.objectives.lm import token_nll
import from_config


def test_validation_split_is_disjoint_from_train_and_covers_the_corpus():
  train, val, full = (embedded.load("prose", s) for s in ("train", "validation", "all"))
  assert val and train
  assert not set(train) & set(val)
  assert sorted(train + val) == sorted(full)
  assert 0.05 <= len(val) / len(full) <= 0.15


def test_sharded_eval_and_its_position_buckets_equal_an_unsharded_recomputation(repo):
  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  c.train.seq_len, c.eval.batches = 32, 3
  c.eval.position_buckets = 3  # 32 positions: 0-10, 11-21, 22-31
  c.data.text_packing = "stream"  # every position of a row holds a token
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  exp = from_config.build(c)
  got = jax.device_get(exp.run.evaluate(exp.state))
  params = jax.device_get(exp.state.params)
  nll_sum = weight = 0.0
  bucket_sum, bucket_weight = np.zeros(3), np.zeros(3)
  for b in from_config.eval_batches(c, exp.run.tokenizer)["default"]:
    logits = Transformer(exp.run.model_cfg).apply({"params": params}, b["tokens"], b["segment_ids"], b["positions"])
    nll, _ = token_nll(logits, jnp.asarray(b["targets"]))
    nll = np.asarray(nll, np.float64) * b["loss_mask"]
    nll_sum += float(np.sum(nll))
    weight += float(b["loss_mask"].sum())
    bucket = b["positions"] * 3 // 32
    bucket_sum += np.bincount(bucket.ravel(), nll.ravel(), 3)
    bucket_weight += np.bincount(bucket.ravel(), b["loss_mask"].ravel(), 3)
  assert len(exp.run.eval_batches["default"]) == 3
  np.testing.assert_allclose(got["eval_loss"], nll_sum / weight, rtol=1e-5)
  np.testing.assert_allclose(got["eval_perplexity"], np.exp(nll_sum / weight), rtol=1e-5)
  assert [k for k in got if k.startswith("eval_loss_pos/")] == ["eval_loss_pos/0-10", "eval_loss_pos/11-21",
                                                                "eval_loss_pos/22-31"]
  np.testing.assert_allclose([got[f"eval_loss_pos/{k}"] for k in ("0-10", "11-21", "22-31")],
                             bucket_sum / bucket_weight, rtol=1e-5)
  np.testing.assert_allclose(np.sum(bucket_sum) / np.sum(bucket_weight), got["eval_loss"], rtol=1e-5)


def test_each_named_eval_source_is_logged_and_the_total_is_their_token_mean(repo, tmp_path):
  c = config_lib.load(f"{repo}/configs/pretrain.py:smoke")
  c.train.seq_len, c.eval.batches = 32, 2
  c.data.tokenizer = "bytes"
  c.model.vocab_size = 384
  notes = tmp_path / "notes.jsonl"
  notes.write_text("".join(f'{{"text": "note {i}: the same short line"}}\n' for i in range(300)))
  c.data.mixture = {"prose": {"source": "embedded:prose", "weight": "0.7"}, "notes": {"source": str(notes)}}
  exp = from_config.build(c)
  got = jax.device_get(exp.run.evaluate(exp.state))
  assert {"eval_loss", "eval_loss/prose", "eval_loss/notes", "eval_perplexity/notes"} <= set(got)
  weights = {name: sum(float(np.sum(b["loss_mask"])) for b in batches)
             for name, batches in exp.run.eval_batches.items()}
  total = sum(got[f"eval_loss/{n}"] * w for n, w in weights.items()) / sum(weights.values())
  np.testing.assert_allclose(got["eval_loss"], total, rtol=1e-5)
  assert abs(got["eval_loss/prose"] - got["eval_loss/notes"]) > 1e-3  # two different held-out sets
