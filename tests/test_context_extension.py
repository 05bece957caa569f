"""Context extension (configs/cpt.py:extend): documents joined into one stream per row, held-out NLL by position
bucket, the variant's length and RoPE, and the smoke run end to end."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config_lib, spec
from fmjax.data import ByteTokenizer, formats, pipeline
from fmjax.data.sources import WHERE
from fmjax.errors import UserError
from fmjax.train import position_loss
import from_config

TOK = ByteTokenizer()


def _records(n=40):
  rng = np.random.default_rng(0)
  return [{"text": f"doc{i} " + "x" * int(rng.integers(1, 50)), WHERE: f"mem[{i}]"} for i in range(n)]


def _config(source="unused", seq_len=32, **data):
  c = config_lib.base()
  c.data.source, c.data.tokenizer, c.data.text_packing = source, "bytes", "stream"
  c.train.seq_len, c.train.batch_size, c.eval.batches = seq_len, 4, 2
  c.data.update(data)
  return c


def test_stream_packing_fills_every_row_with_one_segment_of_the_joined_documents(tmp_path):
  records = _records()
  c = _config()
  encode = formats.Encoder("text", TOK)
  out = list(pipeline._rows(records, encode, "text", c.data, 32, 0, 0, 1, train=False))  # in order: eval's path
  real = [row["segment_ids"] > 0 for row in out]
  assert all(np.all(r) for r in real[:-1]) and not np.all(real[-1])  # only the stream's last row is padded
  for row, r in zip(out, real):
    np.testing.assert_array_equal(row["segment_ids"], r.astype(np.int32))  # one segment across the row
    np.testing.assert_array_equal(row["positions"], np.where(r, np.arange(32), 0))  # 0..T-1, as RoPE sees them
    np.testing.assert_array_equal(row["loss_mask"], r.astype(np.float32))
  expected = [np.concatenate([[TOK.bos_id], TOK.encode(x["text"]), [TOK.eos_id]]) for x in records]
  np.testing.assert_array_equal(np.concatenate([row["tokens"][r] for row, r in zip(out, real)]),
                                np.concatenate([e[:-1] for e in expected]))
  np.testing.assert_array_equal(np.concatenate([row["targets"][r] for row, r in zip(out, real)]),
                                np.concatenate([e[1:] for e in expected]))
  assert sum(len(e) - 1 for e in expected) > 10 * 32  # many documents per row: rows hold several
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"text": x["text"]}) + "\n" for x in records))
  it = iter(from_config.train_dataset(_config(str(path)), TOK)[0])  # training: shuffled, repeated, batched
  for _ in range(5):
    batch = next(it)
    assert np.all(batch["segment_ids"] == 1) and np.all(batch["positions"] == np.arange(32))


def test_text_packing_refuses_a_bad_value_and_formats_that_are_never_cut(tmp_path):
  c = _config()
  c.data.text_packing = "packed"
  with pytest.raises(UserError, match=r"^data.text_packing='packed' must be one of \('documents', 'stream'\)"):
    spec.resolve(c)
  path = tmp_path / "chat.jsonl"
  chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
  path.write_text((json.dumps(chat) + "\n") * 20)
  with pytest.raises(UserError, match="data.text_packing='stream' joins text documents.*chat records"):
    from_config.train_dataset(_config(str(path)), TOK)


def test_position_bucket_sums_equal_a_numpy_recomputation():
  assert position_loss.names(512, 4) == ["0-127", "128-255", "256-383", "384-511"]
  assert position_loss.names(10, 3) == ["0-3", "4-6", "7-9"]
  rng = np.random.default_rng(0)
  nll = rng.gamma(2.0, 2.0, (3, 10)).astype(np.float32)
  mask = (rng.random((3, 10)) > 0.3).astype(np.float32)
  positions = np.concatenate([np.arange(10)[None], np.r_[np.arange(4), np.arange(6)][None],  # two documents
                              np.r_[np.arange(7), np.zeros(3, int)][None]]).astype(np.int32)
  sums, weights = position_loss.bucket_sums(jnp.asarray(nll), jnp.asarray(mask), jnp.asarray(positions), 10, 3)
  bucket = positions * 3 // 10
  np.testing.assert_allclose(sums, [np.sum((nll * mask)[bucket == i]) for i in range(3)], rtol=1e-6)
  np.testing.assert_allclose(weights, [np.sum(mask[bucket == i]) for i in range(3)])
  got = position_loss.metrics([(0, 0, {}, (sums, weights))] * 2, 10, "/code")  # two batches' sums, then divided
  np.testing.assert_allclose([got[f"eval_loss_pos/{k}/code"] for k in ("0-3", "4-6", "7-9")], sums / weights,
                             rtol=1e-6)
  empty = position_loss.metrics([(0, 0, {}, (sums, weights.at[1].set(0)))], 10)
  assert np.isnan(empty["eval_loss_pos/4-6"]) and np.isfinite(empty["eval_loss_pos/7-9"])  # no tokens: no number


def test_extend_variant_sets_the_length_the_rope_and_the_long_document_data(repo, tmp_path):
  s = spec.resolve(config_lib.load(f"{repo}/configs/cpt.py:smoke,extend"))
  assert s.train.seq_len == 512 and (s.model.rope_scaling_factor, s.model.rope_original_max_len) == (4.0, 128)
  assert s.model.rope_theta == 1e4 and s.data.text_packing == "stream" and s.eval.position_buckets == 4
  assert s.eval.at_start and s.init_from.bootstrap.endswith("configs/pretrain.py:smoke")
  s = spec.resolve(config_lib.load(f"{repo}/configs/cpt.py:extend,factor=8,rope=theta"))
  assert s.train.seq_len == 8 * 256 and s.model.rope_scaling_factor == 0  # `small`: head_dim 64
  np.testing.assert_allclose(s.model.rope_theta, 1e4 * 8 ** (64 / 62))
  base = tmp_path / "base"  # a base run whose config.json says how long and with which RoPE it trained
  base.mkdir()
  (base / "config.json").write_text(json.dumps({"train": {"seq_len": 4096}, "model": {
      "rope_theta": 5e5, "rope_scaling_factor": 8.0, "rope_original_max_len": 512}}))
  s = spec.resolve(config_lib.load(f"{repo}/configs/cpt.py:init_from={base},extend,factor=8"))
  assert s.train.seq_len == 32768 and s.model.rope_theta == 5e5
  assert (s.model.rope_scaling_factor, s.model.rope_original_max_len) == (64.0, 512)  # scaled once more
  for bad, message in (("extend,factor=1", "factor=1 must be >= 2"), ("extend,rope=yarn", "rope='yarn' must be"),
                       ("factor=8", "belong to `extend`")):
    with pytest.raises(ValueError, match=message):
      config_lib.load(f"{repo}/configs/cpt.py:{bad}")


@pytest.mark.slow
def test_extend_smoke_run_logs_loss_by_position_before_and_after(repo, tmp_path, cpu_env):
  proc = subprocess.run([sys.executable, "-m", "fmjax.main", "--config=configs/cpt.py:smoke,extend",
                         f"--workdir={tmp_path}"], cwd=repo, capture_output=True, text=True, timeout=400,
                        env=cpu_env(1))
  assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines()
                                          if line[:1] in "EF" or "rror" in line)[-6000:]
  evals = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 10, 20, 30]
  keys = [f"eval_loss_pos/{k}" for k in ("0-127", "128-255", "256-383", "384-511")]
  before, after = evals[0], evals[-1]
  assert all(k in before and f"{k}/code" in before and f"{k}/prose" in after for k in keys)
  assert all(np.isfinite(after[k]) and after[k] < before[k] for k in keys)
  assert json.load(open(tmp_path / "config.json"))["train"]["seq_len"] == 512
