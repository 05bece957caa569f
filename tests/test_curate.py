"""Curation: planted duplicates, near duplicates, PII and junk are removed exactly; clean documents pass unchanged."""

from __future__ import annotations

import datetime
import glob
import hashlib
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
NOTE = "Reach me at ada.lovelace@example.org. " + render(random_words(np.random.default_rng(5), 60))
LICENSES = {"*part0.jsonl": "CC-BY-4.0", "*part1.jsonl": "MIT"}  # note.txt has none: 'unknown'


def without_timing(report: dict) -> dict:
  return {k: v for k, v in report.items() if k not in ("seconds", "docs_per_second")}


def shards(out) -> list[dict]:
  return [json.loads(line) for path in sorted(glob.glob(f"{out}/curated-*.jsonl")) for line in open(path)]


@pytest.fixture(scope="module")
def corpus():
  return build_corpus()


@pytest.fixture(scope="module")
def planted(corpus, tmp_path_factory):
  """The corpus in two .jsonl files (blank lines between records) and a .txt, curated in this process (1 worker)
  and by the CLI with 2 worker processes."""
  root = tmp_path_factory.mktemp("planted")
  src = root / "in"
  src.mkdir()
  records = corpus["records"]
  half = len(records) // 2
  where = {}  # the place curation names a record by -> its id
  for k, part in enumerate((records[:half], records[half:])):
    with open(src / f"part{k}.jsonl", "w") as f:
      for n, r in enumerate(part):
        f.write(json.dumps(r) + "\n\n")
        where[f"{src}/part{k}.jsonl:{2 * n + 1}"] = r["id"]
  (src / "note.txt").write_text(NOTE)
  where[f"{src}/note.txt"] = "note"
  (root / "licenses.json").write_text(json.dumps(LICENSES))
  report = curation.run([f"{src}/*"], str(root / "out1"), curation.CurationConfig(quality=TEST_QUALITY),
                        license_map=LICENSES)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "curate.py"), f"--input={src}/*",
                         f"--output={root / 'out2'}", "--max_chars=20000", "--runner=direct", "--num_workers=2",
                         f"--license_map={root / 'licenses.json'}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return dict(root=root, src=src, where=where, report=report, out=shards(root / "out1"), cli=proc.stdout)


def test_one_and_two_workers_write_the_same_output(planted):
  root = planted["root"]
  one, two = (sorted(os.listdir(root / d)) for d in ("out1", "out2"))
  assert one == two == ["curated-00000-of-00001.jsonl", "manifest.json", "report.json"]
  assert (root / "out1" / one[0]).read_bytes() == (root / "out2" / one[0]).read_bytes()
  reports = [json.loads((root / d / "report.json").read_text()) for d in ("out1", "out2")]
  assert without_timing(reports[0]) == without_timing(reports[1]) and reports[0]["kept_docs"] == 151
  manifests = [json.loads((root / d / "manifest.json").read_text()) for d in ("out1", "out2")]
  assert [{k: v for k, v in m.items() if k != "created"} for m in manifests][0] == {
      k: v for k, v in manifests[1].items() if k != "created"}
  assert "kept 151 of 180 docs from 3 input(s)" in planted["cli"] and "2 worker(s)" in planted["cli"]
  assert "WARNING: 1 of 3 input(s) have license 'unknown'" in planted["cli"] and "note.txt" in planted["cli"]


def test_planted_duplicates_are_removed_with_precision_and_recall_one(corpus, planted):
  out = [r for r in planted["out"] if "id" in r]
  assert min(corpus["near_jaccard"].values()) > 0.85  # planted well above the 0.8 threshold
  kept = [r["id"] for r in out]
  assert len(kept) == len(set(kept))
  dropped = {r["id"] for r in corpus["records"]} - set(kept) - set(corpus["junk"])
  planted_ids = set(corpus["exact"]) | set(corpus["near"])
  precision = len(dropped & planted_ids) / max(len(dropped), 1)
  recall = len(dropped & planted_ids) / len(planted_ids)
  assert (precision, recall) == (1.0, 1.0), (sorted(dropped - planted_ids), sorted(planted_ids - dropped))
  assert kept == [r["id"] for r in corpus["records"] if r["id"] in set(corpus["clean"])]  # input order kept too


def test_clean_docs_unchanged_and_pii_replaced(corpus, planted):
  out, report = planted["out"], planted["report"]
  note = [r for r in out if "id" not in r]
  assert len(note) == 1 and note[0] == {"text": NOTE.replace("ada.lovelace@example.org", "<EMAIL>")}
  for r in out[:-1] if out[-1] is note[0] else out:
    if "id" in r:
      assert r["text"] == corpus["expected"][r["id"]], r["id"]
      assert r["lang"] == "en" and set(r) == {"text", "id", "lang"}  # other fields kept, nothing added
  manifest_text = (planted["root"] / "out1" / "manifest.json").read_text()
  everything = json.dumps([r["text"] for r in out]) + json.dumps(report) + manifest_text
  for item in PII_ITEMS:
    assert item not in everything, item
    assert json.dumps(item)[1:-1] not in everything, item
  for placeholder in set(PII_ITEMS.values()):
    assert any(placeholder in r["text"] for r in out)


def test_report_counts_match_the_plant(corpus, planted):
  out, report, where = planted["out"], planted["report"], planted["where"]
  n_in = len(corpus["records"]) + 1
  assert report["input_docs"] == n_in and report["kept_docs"] == len(out) == len(corpus["clean"]) + 1
  expected_drops = {rule: 0 for rule in ("bad_record", *curation.RULES)} | {r: 1 for r in corpus["junk"].values()}
  expected_drops |= {"exact_duplicate": len(corpus["exact"]), "near_duplicate": len(corpus["near"])}
  assert report["dropped"] == expected_drops
  assert report["dropped_docs"] == n_in - len(out)
  assert report["pii_replacements"] == corpus["pii_counts"] | {"EMAIL": corpus["pii_counts"]["EMAIL"] + 1}
  assert report["docs_with_pii"] == (len(PII_ITEMS) + 1) // 2 + 1
  ex = report["examples"]
  exact = [where[e["id"]] for e in ex["exact_duplicate"]]
  assert len(exact) == 5 and set(exact) <= set(corpus["exact"])
  assert all(where[e["kept"]] == corpus["exact"][where[e["id"]]] for e in ex["exact_duplicate"])
  assert len(ex["near_duplicate"]) == 5
  for e in ex["near_duplicate"]:  # `kept` names the kept original's place
    assert where[e["kept"]] == corpus["near"][where[e["id"]]] and e["jaccard"] >= 0.8
    assert len(e["text"]) <= 203
  for rule in corpus["junk"].values():
    assert [where[e["id"]] for e in ex[rule]] == [f"junk-{rule}"]
  firsts = [e["id"] for e in ex["exact_duplicate"]]  # the first five in input order, not any five
  assert firsts == [w for w in where if where[w] in corpus["exact"]][:5]


def test_manifest_records_inputs_licenses_rules_counts_and_outputs(corpus, planted):
  root, src, report = planted["root"], planted["src"], planted["report"]
  m = json.loads((root / "out1" / "manifest.json").read_text())
  assert m["tool"] == "curate" and m["version"] == 1 and m["parents"] == []
  assert {"python", "fmjax", "apache-beam", "numpy"} <= set(m["versions"])
  assert abs(datetime.datetime.fromisoformat(m["created"]) - datetime.datetime.now(datetime.timezone.utc)
             ) < datetime.timedelta(minutes=30)
  names = [f"{src}/note.txt", f"{src}/part0.jsonl", f"{src}/part1.jsonl"]
  assert [i["uri"] for i in m["inputs"]] == names
  for item in m["inputs"]:
    data = open(item["uri"], "rb").read()
    assert item["sha256"] == hashlib.sha256(data).hexdigest() and item["bytes"] == len(data)
  half = len(corpus["records"]) // 2
  assert [i["records"] for i in m["inputs"]] == [1, half, len(corpus["records"]) - half]
  assert [i["license"] for i in m["inputs"]] == ["unknown", "CC-BY-4.0", "MIT"]
  assert m["licenses"] == {"CC-BY-4.0": 1, "MIT": 1, "unknown": 1} and m["unknown_license_inputs"] == 1
  assert m["counts"]["removed"] == report["dropped"] and m["counts"]["pii_found"] == report["pii_replacements"]
  assert m["counts"]["kept_docs"] == 151 and m["rules"]["near_dedup_threshold"] == 0.8
  assert m["rules"]["quality"]["max_chars"] == 20_000
  [output] = m["outputs"]
  data = (root / "out1" / output["file"]).read_bytes()
  assert output["records"] == 151 and output["sha256"] == hashlib.sha256(data).hexdigest()


def test_shards_partition_the_output_in_input_order(planted, tmp_path):
  report = curation.run([f"{planted['src']}/*"], str(tmp_path), curation.CurationConfig(quality=TEST_QUALITY),
                        num_shards=3)
  files = sorted(glob.glob(f"{tmp_path}/curated-*.jsonl"))
  assert [os.path.basename(f) for f in files] == [f"curated-{i:05d}-of-00003.jsonl" for i in range(3)]
  parts = [[json.loads(line) for line in open(f)] for f in files]
  assert all(parts) and report["kept_docs"] == sum(map(len, parts)) == 151
  position = {json.dumps(r, sort_keys=True): i for i, r in enumerate(planted["out"])}
  for part in parts:
    idx = [position[json.dumps(r, sort_keys=True)] for r in part]
    assert idx == sorted(idx)
  assert sorted(position[json.dumps(r, sort_keys=True)] for part in parts for r in part) == list(range(151))


def test_near_duplicates_are_removed_by_connected_component(tmp_path):
  """A ~ B ~ D but A !~ D: one component, so only A is kept; C, an exact copy of B, counts as exact."""
  rng = np.random.default_rng(11)
  words = random_words(rng, 400)
  def edit(ws, positions):
    ws = list(ws)
    for i in positions:
      ws[i] = "zz" + ws[i]
    return ws
  spots = rng.permutation(np.arange(10, 390, 5))  # well apart, so each change hits 5 shingles of its own
  a, b = words, edit(words, spots[:8])
  d = edit(b, spots[8:16])
  texts = {"A": render(a), "B": render(b), "C": render(b).upper(), "D": render(d)}
  cfg = curation.CurationConfig(num_perm=512, near_dedup_threshold=0.74)
  j = {k: shingle_jaccard(texts[x], texts[y]) for k, (x, y) in {"AB": "AB", "BD": "BD", "AD": "AD"}.items()}
  assert j["AB"] > 0.8 and j["BD"] > 0.8 and j["AD"] < 0.69, j
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t, "id": k}) + "\n" for k, t in texts.items()))
  report = curation.run([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), cfg)
  assert [r["id"] for r in shards(tmp_path / "out")] == ["A"]
  ex = {e["id"].rsplit(":", 1)[1]: e for rule in ("exact_duplicate", "near_duplicate")
        for e in report["examples"][rule]}
  line = {"A": "1", "B": "2", "C": "3", "D": "4"}
  assert report["dropped"]["exact_duplicate"] == 1 and ex[line["C"]]["kept"].endswith(":" + line["B"])
  assert report["dropped"]["near_duplicate"] == 2
  assert ex[line["B"]]["kept"].endswith(":1") and ex[line["D"]]["kept"].endswith(":1")  # D is kept by no one else


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
  with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON .*--on_error=skip to count and skip such "
                     r"records\.$"):
    run_cli(f"--input={tmp_path}/bad.jsonl", f"--output={tmp_path}/o")
  assert not glob.glob(f"{tmp_path}/o/curated-*")  # no partial output
  (tmp_path / "nofield.jsonl").write_text(good + "\n" + json.dumps({"body": "x"}) + "\n")
  with pytest.raises(UserError, match=r"nofield\.jsonl:2: the record has no string field 'text' .*set --field"):
    run_cli(f"--input={tmp_path}/nofield.jsonl", f"--output={tmp_path}/o")
  report = run_cli(f"--input={tmp_path}/*.jsonl", f"--output={tmp_path}/o", "--on_error=skip", "--license=MIT")
  assert report["dropped"]["bad_record"] == 3 and report["dropped"]["exact_duplicate"] == 1
  assert report["kept_docs"] == 1 and report["input_docs"] == 5
  assert [e["id"] for e in report["examples"]["bad_record"]] == [f"{tmp_path}/bad.jsonl:2", f"{tmp_path}/bad.jsonl:3",
                                                                 f"{tmp_path}/nofield.jsonl:2"]
  with pytest.raises(UserError, match="already holds curated shards; choose another --output or pass --overwrite"):
    run_cli(f"--input={tmp_path}/*.jsonl", f"--output={tmp_path}/o", "--on_error=skip")
  with pytest.raises(UserError, match=r"near_dedup_threshold=1\.2 must be in \(0, 1\)"):
    run_cli(f"--input={tmp_path}/*.jsonl", f"--output={tmp_path}/o2", "--near_dedup_threshold=1.2")
  with pytest.raises(UserError, match=r"'--project=p' is neither this tool's flag .* \(e\.g\. --runner=dataflow\)"):
    run_cli(f"--input={tmp_path}/*.jsonl", f"--output={tmp_path}/o2", "--project=p")
  (tmp_path / "map.json").write_text('["MIT"]')
  with pytest.raises(UserError, match=r"--license_map=.* must map globs to license ids"):
    run_cli(f"--input={tmp_path}/*.jsonl", f"--output={tmp_path}/o2", f"--license_map={tmp_path}/map.json")


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
