"""The packed stream: segments, positions and loss mask are right; no token is lost; per-process rows are disjoint."""

import numpy as np

from fmjax.data.packing import PackedStream

BOS, EOS = 1, 2


def docs():
  rng = np.random.default_rng(0)
  return [rng.integers(3, 50, size=n).astype(np.int32) for n in (5, 17, 3, 40, 9, 11, 26, 2)]


def test_rows_carry_documents_with_consistent_segments_positions_and_mask():
  s = PackedStream(docs(), batch_size=2, seq_len=16, seed=0, bos_id=BOS, eos_id=EOS)
  for step in range(3):
    b = s.batch(step)
    for tok, tgt, seg, pos, mask in zip(b["tokens"], b["targets"], b["segment_ids"], b["positions"],
                                        b["loss_mask"]):
      assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
      for t in range(16):  # a new segment starts exactly where positions restart at 0
        assert (pos[t] == 0) == (t == 0 or seg[t] != seg[t - 1])
        if tok[t] == BOS:
          assert pos[t] == 0
      # the loss counts a target only inside its document: never EOS -> next BOS
      assert not np.any(mask[(tok == EOS)])
      assert np.all(mask[(tok != EOS)] == 1)
      np.testing.assert_array_equal(tok[1:], tgt[:-1])


def test_one_epoch_covers_every_token_once_in_order():
  d = docs()
  s = PackedStream(d, batch_size=1, seq_len=8, seed=3, bos_id=BOS, eos_id=EOS)
  stream = np.concatenate([s.batch(i)["tokens"][0] for i in range(s.rows_per_epoch)])
  total = sum(len(x) + 2 for x in d)
  assert len(stream) == (total - 1) // 8 * 8
  order = np.random.default_rng([3, 0]).permutation(len(d))
  expected = np.concatenate([np.concatenate([[BOS], d[i], [EOS]]) for i in order])
  np.testing.assert_array_equal(stream, expected[:len(stream)])


def test_seeded_order_is_deterministic_and_seed_dependent():
  a = PackedStream(docs(), 2, 16, seed=0, bos_id=BOS, eos_id=EOS).batch(1)["tokens"]
  b = PackedStream(docs(), 2, 16, seed=0, bos_id=BOS, eos_id=EOS).batch(1)["tokens"]
  c = PackedStream(docs(), 2, 16, seed=1, bos_id=BOS, eos_id=EOS).batch(1)["tokens"]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_processes_read_disjoint_rows_that_form_the_global_batch():
  full = PackedStream(docs(), 4, 8, seed=0, bos_id=BOS, eos_id=EOS).batch(2)["tokens"]
  parts = [PackedStream(docs(), 4, 8, seed=0, bos_id=BOS, eos_id=EOS, process_index=p, process_count=2).batch(2)
           ["tokens"] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), full)


def test_resume_state_continues_the_stream():
  s = PackedStream(docs(), 2, 8, seed=0, bos_id=BOS, eos_id=EOS)
  next(s), next(s)
  state = s.get_state()
  expected = next(s)["tokens"]
  t = PackedStream(docs(), 2, 8, seed=0, bos_id=BOS, eos_id=EOS)
  t.set_state(state)
  np.testing.assert_array_equal(next(t)["tokens"], expected)
