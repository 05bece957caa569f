"""Curation rules on their own: PII patterns, quality filters, MinHash and LSH, connected components, input kinds."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from curation_corpus import PII_ITEMS, PII_TYPES, VOCAB, random_words, shingle_jaccard
from fmjax.curation import dedup, pii, quality


def test_exact_dedup_normalizes_case_whitespace_and_nfkc():
  variants = ["Hello  World.\n", "hello world.", "HELLO\tWORLD.", "Ｈｅｌｌｏ world."]
  digests = {dedup.digest(dedup.normalize(v)) for v in variants}
  assert len(digests) == 1
  assert dedup.digest(dedup.normalize("hello world!")) not in digests


@pytest.mark.parametrize("item", list(PII_ITEMS))
def test_pii_item_is_replaced_by_its_placeholder(item):
  placeholder = PII_ITEMS[item]
  text, counts = pii.scrub(f"Write to {item}, please.")
  assert text == f"Write to {placeholder}, please." and counts == {PII_TYPES[placeholder]: 1}


def test_pii_generic_secret_values_keep_the_key_name():
  text, counts = pii.scrub("api_key=0123456789abcdef0123 and SECRET: 'dGhpcyBpcyBhIHNlY3JldDEyMw==' ok")
  assert text == "api_key=<API_KEY> and SECRET: '<API_KEY>' ok" and counts == {"API_KEY": 2}


@pytest.mark.parametrize("text", [
    "Python 3.11.2 was released on 2024-01-02 at 12:30:45.",
    "numpy 1.26.4, build 10.0.19041.1, section 1.2.3.4.5, ratio 16:9, pi is 3.14159",
    "Order 12345 shipped 1,234,567 units for $1,234.56 on 2024/01/02 and 2024.01.02.",
    "ISBN 978-3-16-148410-0, timestamp 1700000000000, card-like 4111111111111112, SSN-like 123-45-6789",
    "std::vector<int> and A::B and MAC 00:1A:2B:3C:4D:5E; x+12345678 is math; 5551234567 has no separators",
    "the key point: token counts are 2048, the secret is patience, and sk-learn is a package",
    "me@localhost, user@ host.com and an @handle",
    "not addresses: 999.10.10.10 and 10.01.2.3; zero-padded in the form +000000120",
])
def test_pii_leaves_ordinary_numbers_versions_dates_alone(text):
  assert pii.scrub(text) == (text, {})


def test_luhn():
  for number in ("4111111111111111", "5500000000000004", "378282246310005", "6011111111111117", "0"):
    assert pii.luhn_valid(number), number
  for number in ("4111111111111112", "5500000000000005", "1234567812345678"):
    assert not pii.luhn_valid(number), number


def test_minhash_estimates_jaccard_within_tolerance():
  rng = np.random.default_rng(1)
  hasher = dedup.MinHasher(num_perm=128, shingle_size=5)
  base = random_words(rng, 400)
  for changes in (3, 10, 25, 60, 120):
    other = list(base)
    for i in rng.choice(len(base), changes, replace=False):
      other[i] = "q" + other[i]
    a, b = " ".join(base), " ".join(other)
    true = shingle_jaccard(a, b)
    est = dedup.estimate_jaccard(hasher.signature(dedup.normalize(a)), hasher.signature(dedup.normalize(b)))
    assert abs(est - true) < 0.1, (changes, true, est)
    sa, sb = (hasher.signature(dedup.normalize(t)) for t in (a, b))  # 8-bit values, corrected for chance, agree
    assert abs(dedup.Bands.jaccard(dedup.Bands.low_bits(sa), dedup.Bands.low_bits(sb)) - true) < 0.1


def test_lsh_candidates_are_verified_by_estimated_jaccard():
  from fmjax.curation import stages

  rng = np.random.default_rng(6)
  bands = dedup.Bands(threshold=0.8)
  sig = rng.integers(0, 2**32, 128, dtype=np.uint64).astype(np.uint32)
  shares_bands = sig.copy()  # the first 4 bands (36 values) agree, so LSH surely proposes the pair; J ~ 0.3
  shares_bands[40:] = rng.integers(0, 2**32, 88, dtype=np.uint64)
  close = sig.copy()
  close[rng.choice(128, 10, replace=False)] += 1  # J ~ 0.92
  assert bands.keys(sig)[:4] == bands.keys(shares_bands)[:4] and bands.keys(sig)[4:] != bands.keys(shares_bands)[4:]
  bucket = (bands.keys(sig)[0], [(7, bands.low_bits(close)), (3, bands.low_bits(sig)),
                                 (5, bands.low_bits(shares_bands))])
  [(first, later, est)] = list(stages.candidate_edges(0.8)(bucket))
  assert (first, later) == (3, 7) and 0.85 < est < 0.97
  assert not list(stages.candidate_edges(0.8)((0, [(1, bands.low_bits(sig))])))


def test_lsh_params_standard_choice():
  assert dedup.lsh_params(0.8, 128) == (14, 9)
  for t in (0.5, 0.7, 0.9):
    b, r = dedup.lsh_params(t, 128)
    assert b * r <= 128
  assert dedup.lsh_params(0.9, 128)[1] > dedup.lsh_params(0.5, 128)[1]  # stricter threshold: longer bands
  with pytest.raises(ValueError, match="threshold=1.5"):
    dedup.lsh_params(1.5, 128)


@pytest.mark.parametrize("rule,text", [
    ("min_chars", "short"),
    ("min_alpha_ratio", "1234 5678 9012 3456 7890 " * 20),
    ("max_dup_line_ratio", "\n".join(["same line here"] * 5 + ["a different line of words"] * 2) + "x" * 150),
    ("max_repeated_ngram_ratio", "buy cheap watches online today " * 40),
])
def test_quality_rules_name_the_rule(rule, text):
  assert quality.check(text, quality.QualityConfig()) == rule


def test_quality_word_limits_and_ratios():
  cfg = quality.QualityConfig(min_chars=0, min_words=5, max_words=8)
  assert quality.check("one two three", cfg) == "min_words"
  assert quality.check("a b c d e f g h i j", cfg) == "max_words"
  assert quality.check("a b c d e f", cfg) is None
  assert quality.alpha_ratio("abc 123") == 0.5 and quality.alpha_ratio("héllo wörld") == 1.0
  assert quality.repeated_ngram_ratio(dedup.normalize("a b c d e " * 2), 5) == 0.5  # the 2nd copy is repeated
  assert quality.repeated_ngram_ratio(dedup.normalize(" ".join(VOCAB[:300])), 5) == 0.0
  with pytest.raises(ValueError, match="min_alpha_ratio=1.5"):
    quality.QualityConfig(min_alpha_ratio=1.5)


def test_every_input_kind_reads_the_same_records(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from array_record.python import array_record_module

  from fmjax.curation import read

  records = [{"text": f"document {i} " + "words " * i, "id": i} for i in range(5)]
  with open(tmp_path / "a.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet", row_group_size=2)
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / "a.array_record"), "group_size:1")
  for r in records[:4]:
    writer.write(json.dumps(r).encode())
  writer.write(b"plain text is a record too")
  writer.close()
  got = {kind: list(read.Input(str(tmp_path / f"a{kind}"))) for kind in (".jsonl", ".parquet", ".array_record")}
  assert got[".jsonl"] == [("ok", i + 1, r) for i, r in enumerate(records)]
  assert got[".parquet"] == [("ok", i, r) for i, r in enumerate(records)]
  assert got[".array_record"] == [("ok", i, r) for i, r in enumerate(records[:4])] + [
      ("ok", 4, {"text": "plain text is a record too"})]
  assert read.list_inputs([f"{tmp_path}/a.*"]) == [f"{tmp_path}/a{k}" for k in (".array_record", ".jsonl", ".parquet")]
  source = read.Input(str(tmp_path / "a.parquet"))
  list(source)
  assert source.stats()["records"] == 5
  assert source.stats()["sha256"] == hashlib.sha256((tmp_path / "a.parquet").read_bytes()).hexdigest()


def test_components_agree_with_scipy():
  from scipy.sparse import coo_matrix
  from scipy.sparse.csgraph import connected_components

  rng = np.random.default_rng(8)
  ids = rng.choice(10**9, 400, replace=False)
  edges = ids[rng.integers(0, 400, (300, 2))]
  nodes, roots = dedup.components(edges)
  assert list(nodes) == sorted(set(edges.ravel()))
  index = {n: i for i, n in enumerate(nodes)}
  u, v = np.vectorize(index.get)(edges).T
  _, labels = connected_components(coo_matrix((np.ones(len(u)), (u, v)), shape=(len(nodes),) * 2), directed=False)
  for label in np.unique(labels):
    members = nodes[labels == label]
    assert set(roots[labels == label]) == {members.min()}
  assert len(set(roots)) == len(np.unique(labels)) < len(nodes)
