"""Curation on Beam: planted duplicates, near duplicates, PII and junk are removed exactly, clean documents pass
unchanged, 1 and 2 workers write the same bytes, and the report and manifest say what happened."""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from curation_corpus import PII_ITEMS, build_corpus, random_words, render, shingle_jaccard
from fmjax import curation
from fmjax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
