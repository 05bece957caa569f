"""grain pipelines: packing keeps documents apart and loses nothing; shuffles, mixtures, process shards, state."""

import json

import numpy as np
import pytest

from fmjax import config_lib
from fmjax.data import ByteTokenizer, formats, layout, mixture, pipeline
from fmjax.data.sources import WHERE
import from_config

TOK = ByteTokenizer()
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def corpus(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return [f"doc{i} " + " ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for i in range(n)]


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def config(source, seq_len=32, batch=4, **data):
  c = config_lib.base()
  c.data.source, c.data.tokenizer = source, "bytes"
  c.train.seq_len, c.train.batch_size, c.eval.batches = seq_len, batch, 2
  c.data.update(data)
  return c


def rows(records, fmt="text", seq_len=32, seed=0, process=(0, 1), train=False, **data):
  c = config("unused", seq_len, **data)
  encode = formats.Encoder(fmt, TOK, "text", seq_len if fmt != "text" else 0, c.data.overlong)
  return pipeline._rows(records, encode, fmt, c.data, seq_len, seed, *process, train=train)


def text_records(texts):
  return [{"text": t, WHERE: f"mem[{i}]"} for i, t in enumerate(texts)]


def segments(row, prefix=""):
  """(segment id, tokens, targets, loss_mask, positions) per packed example of a row."""
  seg = row[prefix + "segment_ids"]
  return [(s, row[prefix + "tokens"][seg == s], row[prefix + "targets"][seg == s], row[prefix + "loss_mask"][seg == s],
           row[prefix + "positions"][seg == s]) for s in np.unique(seg[seg > 0])]


def test_text_packing_keeps_documents_apart_and_loses_no_token():
  texts = corpus()
  out = list(rows(text_records(texts)))
  pieces = []
  for row in out:
    seg = row["segment_ids"]
    assert np.all(np.diff(seg[seg > 0]) >= 0) and np.all(row["loss_mask"][seg == 0] == 0)
    for _, tokens, targets, mask, positions in segments(row):
      np.testing.assert_array_equal(positions, np.arange(len(tokens)))  # positions restart per segment
      np.testing.assert_array_equal(tokens[1:], targets[:-1])  # one contiguous piece of one document
      assert np.all(mask == 1)
      pieces.append((tokens, targets))
  # the pieces, in order, rebuild every document exactly: no token lost, repeated or paired across documents
  stream_tokens = np.concatenate([p[0] for p in pieces])
  stream_targets = np.concatenate([p[1] for p in pieces])
  expected = [np.concatenate([[TOK.bos_id], TOK.encode(t), [TOK.eos_id]]) for t in texts]
  np.testing.assert_array_equal(stream_tokens, np.concatenate([e[:-1] for e in expected]))
  np.testing.assert_array_equal(stream_targets, np.concatenate([e[1:] for e in expected]))
  assert not np.any((stream_tokens == TOK.eos_id))  # EOS is a target, never an input paired with the next BOS


def test_whole_example_packing_never_splits_or_mixes_examples():
  records = [{"prompt": f"q{i}?", "completion": "a" * (i % 7 + 1), WHERE: f"m{i}"} for i in range(30)]
  got = []
  for row in rows(records, "prompt_completion", seq_len=24):
    for _, tokens, targets, _, positions in segments(row):
      assert tokens[0] == TOK.bos_id and targets[-1] == TOK.eos_id and positions[0] == 0
      got.append(TOK.decode(tokens[1:]) + TOK.decode(targets[-1:]))
  assert sorted(got) == sorted(f"q{i}?" + "a" * (i % 7 + 1) for i in range(30))


def first_docs(ds, n):
  it = iter(ds)
  return [TOK.decode(next(it)["tokens"][:40]) for _ in range(n)]


def test_shuffle_is_deterministic_per_seed_and_differs_across_seeds():
  recs = text_records(corpus())
  a = first_docs(rows(recs, seed=0, train=True), 6)
  assert a == first_docs(rows(recs, seed=0, train=True), 6)
  assert a != first_docs(rows(recs, seed=1, train=True), 6)


def documents_seen(ds):
  """First words of the documents a stream holds, rebuilt from its segments in order."""
  stream = np.concatenate([tokens for row in ds for _, tokens, *_ in segments(row)])
  starts = np.flatnonzero(stream == TOK.bos_id)
  return [TOK.decode(doc[1:]).split(" ")[0] for doc in np.split(stream, starts[1:])]


def test_process_shards_are_disjoint_and_cover_the_data():
  texts = corpus(41)
  shards = [documents_seen(rows(text_records(texts), process=(p, 2))) for p in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(f"doc{i}" for i in range(41))
  assert len(shards[0]) == 21 and len(shards[1]) == 20


def test_data_shards_give_the_same_global_batches_on_any_process_count(tmp_path):
  c = config("unused", seq_len=16, batch=4, shards=2)
  c.data.mixture = {k: {"source": write_jsonl(tmp_path / f"{k}.jsonl", [{"text": t} for t in corpus(30, seed)]),
                        "weight": w} for k, seed, w in (("a", 1, "0.7"), ("b", 2, "0.3"))}

  def global_batches(processes, n=5):
    its = [iter(from_config.train_dataset(c, TOK, p, processes)[0]) for p in range(processes)]
    return [np.concatenate([next(it)["tokens"] for it in its]) for _ in range(n)], its

  one, (it,) = global_batches(1)
  assert len({r.tobytes() for b in one for r in b}) == 4 * 5  # real, distinct rows
  for a, b in zip(one, global_batches(2)[0], strict=True):
    np.testing.assert_array_equal(a, b)
  state = json.loads(json.dumps(it.get_state()))  # one process reading both shards resumes exactly too
  want = [next(it)["tokens"] for _ in range(3)]
  again = iter(from_config.train_dataset(c, TOK)[0])
  again.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(again)["tokens"], w)
  with pytest.raises(ValueError, match="data.shards=2 must be a multiple of the process count 3"):
    from_config.train_dataset(c, TOK, 0, 3)


def test_mixture_hits_its_weights_and_follows_the_step_schedule():
  n_batches, local = 300, 8
  streams = [rows(text_records([name * (i + 60) for i in range(20)]), train=True) for name in "abc"]
  mix = mixture.StepMixIterDataset(streams, [mixture.Schedule(w) for w in ("0.5", "0.3", "0.2")], local, seed=0)
  it = iter(mix.batch(local))
  counts = np.zeros(3)
  for _ in range(n_batches):
    b = it.__next__()
    for row in b["tokens"]:
      letters = set(TOK.decode(row[row > 2]))
      assert len(letters) == 1  # a row holds one source
      counts["abc".index(letters.pop())] += 1
  n = n_batches * local
  for k, w in enumerate((0.5, 0.3, 0.2)):  # 4 binomial standard deviations (~0.02 here)
    assert abs(counts[k] / n - w) < 4 * np.sqrt(w * (1 - w) / n), (counts / n)
  # weights that change with the step: source a only before step 10, b only from step 20, linear in between
  sched = [mixture.Schedule("0:1,10:1,20:0"), mixture.Schedule("0:0,10:0,20:1")]
  mix = mixture.StepMixIterDataset(streams[:2], sched, local, seed=0)
  choices = np.asarray([mixture.choose(mix, r) for r in range(30 * local)]).reshape(30, local)
  assert np.all(choices[:10] == 0) and np.all(choices[20:] == 1)
  assert 0 < choices[10:20].mean() < 1


def test_mixture_weights_must_not_all_vanish():
  with pytest.raises(ValueError, match="all zero at step 5"):
    mixture.weights_at([mixture.Schedule("0:1,5:0"), mixture.Schedule("0")], 5)
  with pytest.raises(ValueError, match="data.mixture.x.weight='heavy'"):
    mixture.Schedule("heavy", "data.mixture.x.weight")


def test_iterator_state_resumes_exactly(tmp_path):
  c = config("unused", seq_len=16, batch=4)
  c.data.mixture = {"a": {"source": write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in corpus(30, 1)]),
                          "weight": "0.7"},
                    "b": {"source": write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in corpus(30, 2)]),
                          "weight": "0.3"}}
  ds, _ = from_config.train_dataset(c, TOK)
  it = iter(ds)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(5)]
  again = iter(from_config.train_dataset(c, TOK)[0])
  again.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(again)["tokens"], e["tokens"])


def test_a_packer_state_read_back_from_json_resumes_at_a_document_boundary():
  # A checkpoint stores the state as JSON; grain's "no remainder" (-1, -1) comes back as a list. Row 1 of this corpus
  # ends exactly with a document: restored from there, a packer that took the list for a remainder skipped one.
  records = text_records(corpus(30, 1))
  seen_boundary = False
  for k in range(1, 8):
    it = iter(rows(records, seq_len=16, train=True))
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    seen_boundary |= all(v == [-1, -1] for v in state["remainder_slices"].values())
    want = next(it)
    again = iter(rows(records, seq_len=16, train=True))
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["tokens"], want["tokens"], err_msg=f"restored after row {k}")
  assert seen_boundary


def masked_text(row, prefix=""):
  """The targets that carry loss, decoded, per segment."""
  return [TOK.decode(targets[mask == 1]) for _, _, targets, mask, _ in segments(row, prefix)]


def test_every_record_format_puts_the_loss_on_the_right_tokens():
  eos = TOK.decode([TOK.eos_id])  # the byte tokenizer decodes EOS to nothing
  row = next(iter(rows([{"text": "plain text", WHERE: "t"}])))
  assert masked_text(row) == ["plain text" + eos]
  row = next(iter(rows([{"prompt": "Q: 2+2?", "completion": " A: 4", WHERE: "p"}], "prompt_completion")))
  assert masked_text(row) == [" A: 4"]
  (_, tokens, targets, mask, _), = segments(row)
  assert targets[-1] == TOK.eos_id and mask[-1] == 1  # the model learns to stop
  msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
          {"role": "assistant", "content": "ciao"}]
  row = next(iter(rows([{"messages": msgs, WHERE: "c"}], "chat", seq_len=128)))
  assert masked_text(row) == ["hello<|end|>ciao<|end|>"]
  (_, tokens, targets, mask, _), = segments(row)
  assert targets[-1] == TOK.eos_id and mask[-1] == 1
  pref = {"prompt": "Best city?", "chosen": " Rome", "rejected": " Mars", WHERE: "r"}
  row = next(iter(rows([pref], "preference")))
  assert masked_text(row, "chosen_") == [" Rome"] and masked_text(row, "rejected_") == [" Mars"]
  assert set(row) == set(layout.of_format("preference").dtypes())


def test_format_is_detected_from_the_record_keys():
  assert formats.detect({"messages": []}, "text") == "chat"
  assert formats.detect({"prompt": "", "chosen": "", "rejected": ""}, "text") == "preference"
  assert formats.detect({"prompt": "", "completion": ""}, "text") == "prompt_completion"
  assert formats.detect({"body": ""}, "body") == "text"
  with pytest.raises(ValueError, match=r"x.jsonl:3: cannot tell the format.*\['body'\]"):
    formats.detect({"body": "", WHERE: "x.jsonl:3"}, "text")


def test_overlong_examples_error_truncate_or_drop():
  records = [{"prompt": "p", "completion": "c" * n, WHERE: f"f.jsonl:{i + 1}"} for i, n in enumerate((3, 50, 4))]
  with pytest.raises(ValueError, match=r"f.jsonl:2: an example of 52 tokens exceeds train.seq_len=16.*overlong"):
    list(rows(records, "prompt_completion", seq_len=16))
  kept = [len(t) for r in rows(records, "prompt_completion", seq_len=16, overlong="drop") for _, t, *_ in segments(r)]
  assert sorted(kept) == [5, 6]
  cut = [len(t) for r in rows(records, "prompt_completion", seq_len=16, overlong="truncate")
         for _, t, *_ in segments(r)]
  assert sorted(cut) == [5, 6, 16]


def test_eval_batches_are_fixed_padded_and_split_between_processes(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in corpus(200)])
  c = config(path, seq_len=32, batch=4, holdout=0.1)
  full = from_config.eval_batches(c, TOK)["default"]
  assert len(full) == 2 and full[0]["tokens"].shape == (4, 32)
  halves = [from_config.eval_batches(c, TOK, p, 2)["default"] for p in range(2)]
  for k, batch in enumerate(full):
    np.testing.assert_array_equal(np.concatenate([h[k]["tokens"] for h in halves]), batch["tokens"])
  train = {TOK.decode(r["tokens"]) for _, r in zip(range(40), pipeline._rows(*pipeline._open(
      pipeline.train_specs(c.data)[0], c.data, "train", TOK, 32), c.data, 32, 0, 0, 1, False))}
  assert not train & {TOK.decode(r) for b in full for r in b["tokens"]}  # held-out rows never appear in training


def test_tokenizing_in_worker_processes_gives_the_same_batches(tmp_path):
  c = config(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in corpus(60)]), seq_len=16, batch=4)
  batches = []
  for workers in (0, 2):
    c.data.workers = workers
    it = iter(from_config.train_dataset(c, TOK)[0])
    batches.append([next(it)["tokens"] for _ in range(20)])
    if hasattr(it, "close"):
      it.close()
  np.testing.assert_array_equal(np.stack(batches[0]), np.stack(batches[1]))


def test_named_eval_sources_replace_the_held_out_training_data(tmp_path):
  path = write_jsonl(tmp_path / "h.jsonl", [{"text": t} for t in corpus(30)])
  c = config("embedded:prose", seq_len=32, batch=4)
  assert [(s.name, split) for s, split in from_config.eval_specs(c)] == [("default", "validation")]
  c.eval.sources = {"prose": "embedded:prose", "mine": path}
  assert {s.name: split for s, split in from_config.eval_specs(c)} == {"prose": "validation", "mine": "all"}
  c.eval.batches = 100  # more than there are: every held-out token once, the last batch padded
  got = from_config.eval_batches(c, TOK)
  assert np.sum(got["mine"][-1]["segment_ids"][-1]) == 0
  assert documents_seen(r for b in got["mine"] for r in _rows_of(b)) == [f"doc{i}" for i in range(30)]


def _rows_of(batch):
  return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["tokens"]))]


def test_orbax_saves_and_restores_the_iterator_position(tmp_path):
  import grain
  import orbax.checkpoint as ocp

  c = config(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in corpus(30)]), seq_len=16, batch=4)
  it = iter(from_config.train_dataset(c, TOK)[0])
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as m:
    m.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    m.wait_until_finished()
  expected = next(it)["tokens"]
  fresh = iter(from_config.train_dataset(c, TOK)[0])
  with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as m:
    m.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(next(fresh)["tokens"], expected)
