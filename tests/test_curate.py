"""Curation: planted duplicates, near duplicates, PII and junk are removed exactly; clean documents pass unchanged."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fmjax import curation
from fmjax.curation import dedup, pii, quality
from fmjax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vocabulary() -> list[str]:
  import pydoc_data.topics

  return sorted(set(re.findall(r"[a-z]{3,}", " ".join(pydoc_data.topics.topics.values()).lower())))


VOCAB = _vocabulary()


def render(words: list[str]) -> str:
  """Sentences of 10 words, capitalised, 4 sentences per paragraph."""
  sentences = [" ".join(words[k:k + 10]).capitalize() + "." for k in range(0, len(words), 10)]
  return "\n".join(" ".join(sentences[k:k + 4]) for k in range(0, len(sentences), 4))


def random_words(rng: np.random.Generator, n: int) -> list[str]:
  return [VOCAB[i] for i in rng.integers(0, len(VOCAB), n)]


def shingle_jaccard(a: str, b: str, k: int = 5) -> float:
  """True Jaccard of the k-word shingle sets of two texts, as dedup normalizes them."""
  def shingles(t):
    w = dedup.normalize(t).split(" ")
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}
  sa, sb = shingles(a), shingles(b)
  return len(sa & sb) / len(sa | sb)


PII_ITEMS = {  # planted string -> placeholder
    "ada.lovelace@example.org": "<EMAIL>", "j_smith+news@mail.example.co.uk": "<EMAIL>",
    "(555) 123-4567": "<PHONE>", "555-987-6543": "<PHONE>", "555.246.8100": "<PHONE>",
    "+44 20 7946 0958": "<PHONE>", "+1-202-555-0143": "<PHONE>",
    "192.168.10.42": "<IP_ADDRESS>", "2001:db8:85a3::8a2e:370:7334": "<IP_ADDRESS>",
    "fe80::1ff:fe23:4567:890a": "<IP_ADDRESS>",
    "4111 1111 1111 1111": "<CREDIT_CARD>", "5500-0000-0000-0004": "<CREDIT_CARD>", "378282246310005": "<CREDIT_CARD>",
    "AKIAIOSFODNN7EXAMPLE": "<API_KEY>", "ghp_" + "A1b2C3d4E5" * 3 + "F6g7H8": "<API_KEY>",
    "github_pat_" + "11ABCDEFG0" * 4 + "xyz_789": "<API_KEY>", "sk-proj-" + "Xy9" * 16: "<API_KEY>",
    "xoxb-2048-4096-" + "Ab1" * 8: "<API_KEY>", "AIza" + "SyA1b2c3d4e5f6g7h8i9j0" + "K_L-m3n4o5p6q": "<API_KEY>",
}
PII_TYPES = {v: k for k, v in pii.PLACEHOLDERS.items()}


def build_corpus(seed: int = 0) -> dict:
  """Records in stream order plus what is planted: clean (some with PII), exact / near duplicates, junk."""
  rng = np.random.default_rng(seed)
  clean = {f"clean-{i}": random_words(rng, int(rng.integers(220, 320))) for i in range(150)}
  texts = {k: render(w) for k, w in clean.items()}
  expected = dict(texts)  # id -> text expected in the output
  ids = list(clean)

  # PII: every item once, inside otherwise clean documents; the output must carry the placeholder instead.
  pii_counts: dict[str, int] = {t: 0 for t in pii.PLACEHOLDERS}
  items = list(PII_ITEMS.items())
  for n, k in enumerate(ids[100:100 + len(items) // 2 + 1]):
    words = clean[k]
    parts_in, parts_out = [], []
    for item, placeholder in items[2 * n:2 * n + 2]:
      parts_in.append(f"Contact {item} today")
      parts_out.append(f"Contact {placeholder} today")
      pii_counts[PII_TYPES[placeholder]] += 1
    base = render(words)
    texts[k] = base + "\n" + " and ".join(parts_in) + "."
    expected[k] = base + "\n" + " and ".join(parts_out) + "."

  stream = [(k, texts[k]) for k in ids]
  sources = ids[:90]  # duplicates copy documents without PII

  def insert_after(source: str, rec: tuple[str, str]) -> None:
    pos = next(i for i, (k, _) in enumerate(stream) if k == source)
    stream.insert(int(rng.integers(pos + 1, len(stream) + 1)), rec)

  variants = [lambda t: t, str.upper, lambda t: t.replace(" ", "  ").replace("\n", "\n\n"),
              lambda t: "  " + t.replace(". ", ".\t") + " \n", str.swapcase,
              lambda t: "".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in t[:40]) + t[40:]]
  exact = {}
  for n, src in enumerate(rng.choice(sources, 12, replace=False)):
    exact[f"exact-{n}"] = src
    insert_after(src, (f"exact-{n}", variants[n % len(variants)](texts[src])))

  near, near_jaccard = {}, {}
  long_sources = [k for k in sources if len(clean[k]) >= 270 and k not in exact.values()]
  for n, src in enumerate(rng.choice(long_sources, 12, replace=False)):
    tokens = texts[src].split(" ")  # edit the text in place: 2 words changed, 1 inserted
    for i in rng.choice(len(tokens), 2, replace=False):
      tokens[i] = "zebra" + tokens[i]
    tokens.insert(int(rng.integers(len(tokens))), "inserted")
    text = " ".join(tokens)
    near[f"near-{n}"], near_jaccard[f"near-{n}"] = src, shingle_jaccard(text, texts[src])
    insert_after(src, (f"near-{n}", text))

  junk_texts = {
      "min_chars": "Too short to keep.",
      "max_chars": render(random_words(rng, 5000)),
      "min_alpha_ratio": "\n".join(" ".join(str(x) for x in rng.integers(0, 10**6, 8)) for _ in range(15)),
      "max_dup_line_ratio": "\n".join(["Subscribe to our newsletter for updates."] * 8 +
                                      [render(random_words(rng, 12)) for _ in range(4)]),
      "max_repeated_ngram_ratio": " ".join([render(random_words(rng, 40))] +
                                           ["click here to buy cheap watches online now"] * 12),
  }
  junk = {}
  for rule, text in junk_texts.items():
    junk[f"junk-{rule}"] = rule
    stream.insert(int(rng.integers(len(stream) + 1)), (f"junk-{rule}", text))
  return dict(records=[{"text": t, "id": k, "lang": "en"} for k, t in stream], clean=ids, expected=expected,
              exact=exact, near=near, near_jaccard=near_jaccard, junk=junk, pii_counts=pii_counts)


TEST_QUALITY = curation.QualityConfig(max_chars=20_000)


@pytest.fixture(scope="module")
def corpus():
  return build_corpus()


@pytest.fixture(scope="module")
def curated(corpus):
  cfg = curation.CurationConfig(quality=TEST_QUALITY)
  report = curation.Report(cfg)
  out = list(curation.curate(iter(corpus["records"]), cfg, report))
  return out, report.to_dict()


def test_planted_duplicates_are_removed_with_precision_and_recall_one(corpus, curated):
  out, _ = curated
  assert min(corpus["near_jaccard"].values()) > 0.85  # planted well above the 0.8 threshold
  kept = [r["id"] for r in out]
  assert len(kept) == len(set(kept))
  dropped = {r["id"] for r in corpus["records"]} - set(kept) - set(corpus["junk"])
  planted = set(corpus["exact"]) | set(corpus["near"])
  precision = len(dropped & planted) / max(len(dropped), 1)
  recall = len(dropped & planted) / len(planted)
  assert (precision, recall) == (1.0, 1.0), (sorted(dropped - planted), sorted(planted - dropped))
  assert kept == [r["id"] for r in corpus["records"] if r["id"] in set(corpus["clean"])]  # order kept too


def test_clean_docs_unchanged_and_pii_replaced(corpus, curated):
  out, report = curated
  for r in out:
    assert r["text"] == corpus["expected"][r["id"]], r["id"]
    assert r["lang"] == "en" and set(r) == {"text", "id", "lang"}  # other fields kept, nothing added
  everything = json.dumps([r["text"] for r in out]) + json.dumps(report)
  for item in PII_ITEMS:
    assert item not in everything, item
    assert json.dumps(item)[1:-1] not in everything, item
  for placeholder in set(PII_ITEMS.values()):
    assert any(placeholder in r["text"] for r in out)


def test_report_counts_match_the_plant(corpus, curated):
  out, report = curated
  n_in = len(corpus["records"])
  assert report["input_docs"] == n_in and report["kept_docs"] == len(out) == len(corpus["clean"])
  expected_drops = {rule: 0 for rule in curation.RULES} | {r: 1 for r in corpus["junk"].values()}
  expected_drops |= {"exact_duplicate": len(corpus["exact"]), "near_duplicate": len(corpus["near"])}
  assert report["dropped"] == expected_drops
  assert report["dropped_docs"] == n_in - len(out)
  assert report["pii_replacements"] == corpus["pii_counts"]
  assert report["docs_with_pii"] == (len(PII_ITEMS) + 1) // 2
  ex = report["examples"]
  assert {e["id"] for e in ex["exact_duplicate"]} <= set(corpus["exact"]) and len(ex["exact_duplicate"]) == 5
  for e in ex["near_duplicate"]:  # kept_index points at the kept original
    assert out[e["kept_index"]]["id"] == corpus["near"][e["id"]] and e["jaccard"] >= 0.8
    assert len(e["text"]) <= 203
  for rule in corpus["junk"].values():
    assert [e["id"] for e in ex[rule]] == [f"junk-{rule}"]


def test_exact_dedup_normalizes_case_whitespace_and_nfkc():
  variants = ["Hello  World.\n", "hello world.", "HELLO\tWORLD.", "Ｈｅｌｌｏ world."]
  digests = {dedup.ExactDeduper.digest(dedup.normalize(v)) for v in variants}
  assert len(digests) == 1
  assert dedup.ExactDeduper.digest(dedup.normalize("hello world!")) not in digests


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
    near = dedup.NearDeduper(threshold=0.5)  # the index stores 8-bit signatures; its corrected estimate agrees
    near.add(near.signature(dedup.normalize(a)))
    _, index_est = near.query(near.signature(dedup.normalize(b)))
    assert index_est == 0.0 or abs(index_est - true) < 0.1, (changes, true, index_est)


def test_lsh_candidates_are_verified_by_estimated_jaccard():
  rng = np.random.default_rng(6)
  near = dedup.NearDeduper(threshold=0.8)
  sig = rng.integers(0, 2**32, 128, dtype=np.uint64).astype(np.uint32)
  assert near.query_or_add(sig) == (None, 0.0)
  shares_bands = sig.copy()  # the first 4 bands (36 values) agree, so LSH surely proposes the pair; J ~ 0.3
  shares_bands[40:] = rng.integers(0, 2**32, 88, dtype=np.uint64)
  original, est = near.query(shares_bands)
  assert original is None and 0.2 < est < 0.45
  close = sig.copy()
  close[rng.choice(128, 10, replace=False)] += 1  # J ~ 0.92
  original, est = near.query(close)
  assert original == 0 and 0.85 < est < 0.97


def test_exact_copy_of_a_near_duplicate_points_at_the_kept_original():
  rng = np.random.default_rng(7)
  words = random_words(rng, 300)
  a = render(words)
  tokens = a.split(" ")
  tokens[100] = "changed"
  b = " ".join(tokens)
  cfg = curation.CurationConfig()
  report = curation.Report(cfg)
  out = list(curation.curate([{"text": a}, {"text": b}, {"text": b.upper()}], cfg, report))
  assert out == [{"text": a}]
  ex = report.to_dict()["examples"]
  assert ex["near_duplicate"][0]["id"] == "#1" and ex["near_duplicate"][0]["kept_index"] == 0
  assert ex["exact_duplicate"][0]["id"] == "#2" and ex["exact_duplicate"][0]["kept_index"] == 0


def test_lsh_params_standard_choice():
  assert dedup.lsh_params(0.8, 128) == (14, 9)
  for t in (0.5, 0.7, 0.9):
    b, r = dedup.lsh_params(t, 128)
    assert b * r <= 128
  assert dedup.lsh_params(0.9, 128)[1] > dedup.lsh_params(0.5, 128)[1]  # stricter threshold: longer bands
  with pytest.raises(ValueError, match="threshold=1.5"):
    dedup.lsh_params(1.5, 128)


def test_hash_table_grows_and_keeps_first_value():
  rng = np.random.default_rng(2)
  keys = [int(k) for k in rng.integers(0, 2**64, 20_000, dtype=np.uint64)] + [0]
  table = dedup.HashTable(capacity=8)
  for i, k in enumerate(keys):
    table.put(k, i)
  for k in keys:
    table.put(k, 999_999)  # first insert wins
  assert len(table) == len(keys) and len(table.keys) <= 2 * len(keys) / 0.7
  assert all(table.get(k) == i for i, k in enumerate(keys))
  assert table.get(12345) is None


def test_near_dedup_memory_per_kept_doc_is_bounded():
  rng = np.random.default_rng(3)
  near = dedup.NearDeduper()
  n = 3000
  for _ in range(n):
    near.query_or_add(near.signature(words=rng.integers(0, 2**32, 200, dtype=np.uint64)))
  assert near.size == n
  assert near.nbytes / n < 1024, near.nbytes / n


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


def test_cli_end_to_end(tmp_path, corpus):
  src = tmp_path / "in"
  src.mkdir()
  records = corpus["records"]
  half = len(records) // 2
  for k, part in enumerate((records[:half], records[half:])):  # read in path order: the stream order is kept
    with open(src / f"part{k}.jsonl", "w") as f:
      for r in part:
        f.write(json.dumps(r) + "\n\n")
  (src / "note.txt").write_text("Reach me at ada.lovelace@example.org. " + render(random_words(
      np.random.default_rng(5), 60)))
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "curate.py"), f"--input={src}/*",
                         f"--output={out}", "--max_chars=20000"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "kept 151 of" in proc.stdout and "report" in proc.stdout
  kept = [json.loads(line) for line in open(out / "curated.jsonl")]
  report = json.loads((out / "report.json").read_text())
  assert report["input_docs"] == len(records) + 1 and report["kept_docs"] == len(kept) == 151
  assert report["dropped"]["exact_duplicate"] == len(corpus["exact"])
  assert report["dropped"]["near_duplicate"] == len(corpus["near"])
  txt = [r for r in kept if "id" not in r]
  assert len(txt) == 1 and txt[0]["text"].startswith("Reach me at <EMAIL>.") and set(txt[0]) == {"text"}
  assert {r["id"] for r in kept if "id" in r} == set(corpus["clean"])
  assert report["pii_replacements"]["EMAIL"] == corpus["pii_counts"]["EMAIL"] + 1


def run_cli(*args: str) -> dict:
  import importlib.util

  spec = importlib.util.spec_from_file_location("curate_cli", os.path.join(REPO, "tools", "curate.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main(list(args))


def test_cli_errors_name_the_glob_the_line_and_the_field(tmp_path):
  with pytest.raises(UserError, match=r"--input='.*nothing-\*\.jsonl' matches no files; check the path"):
    run_cli(f"--input={tmp_path}/nothing-*.jsonl", f"--output={tmp_path}/o")
  good = json.dumps({"text": render(random_words(np.random.default_rng(4), 50))})
  (tmp_path / "bad.jsonl").write_text(good + "\n" + '{"text": "unterminated\n' + json.dumps({"body": "x"}) + "\n")
  with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON .*--on_error=skip"):
    run_cli(f"--input={tmp_path}/bad.jsonl", f"--output={tmp_path}/o")
  assert not os.path.exists(tmp_path / "o" / "curated.jsonl")  # no partial output
  (tmp_path / "nofield.jsonl").write_text(good + "\n" + json.dumps({"body": "x"}) + "\n")
  with pytest.raises(UserError, match=r"nofield\.jsonl:2: the record has no string field 'text' .*set --field"):
    run_cli(f"--input={tmp_path}/nofield.jsonl", f"--output={tmp_path}/o")
  report = run_cli(f"--input={tmp_path}/*.jsonl", f"--output={tmp_path}/o", "--on_error=skip")
  assert report["dropped"]["bad_record"] == 3 and report["dropped"]["exact_duplicate"] == 1
  assert report["kept_docs"] == 1 and report["input_docs"] == 5
  assert [e["id"] for e in report["examples"]["bad_record"]] == [f"{tmp_path}/bad.jsonl:2", f"{tmp_path}/bad.jsonl:3",
                                                                 f"{tmp_path}/nofield.jsonl:2"]
  with pytest.raises(UserError, match="exists; choose another --output or pass --overwrite"):
    run_cli(f"--input={tmp_path}/*.jsonl", f"--output={tmp_path}/o", "--on_error=skip")
  with pytest.raises(UserError, match=r"near_dedup_threshold=1\.2 must be in \(0, 1\)"):
    run_cli(f"--input={tmp_path}/*.jsonl", f"--output={tmp_path}/o2", "--near_dedup_threshold=1.2")
