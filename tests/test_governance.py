"""Governance: a curate -> prepare -> pretrain -> SFT -> DPO chain of smoke runs leaves manifests and lineage that
tools/audit.py follows back to the raw corpus, and the exported model card parses as a Hugging Face model card."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fmjax import curation
from fmjax.data import ByteTokenizer, formats, prepared
from fmjax.governance import lineage

pytestmark = pytest.mark.slow
BYTES = ["--config.data.tokenizer=bytes", "--config.model.vocab_size=384"]


def sha(path) -> str:
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def chain(tmp_path_factory, repo, cpu_env):
  root = tmp_path_factory.mktemp("chain")
  (root / "raw").mkdir()
  rng = np.random.default_rng(0)
  words = [w for w in open(os.path.join(repo, "README.md")).read().lower().split() if w.isalpha()]
  with open(root / "raw" / "a.jsonl", "w") as f:
    for _ in range(60):
      f.write(json.dumps({"text": " ".join(rng.choice(words, 150))}) + "\n")
  curation.run([str(root / "raw" / "*.jsonl")], str(root / "cur"), license_id="CC-BY-4.0")
  tok = ByteTokenizer()
  prepared.prepare(str(root / "cur" / "curated-*.jsonl"), formats.Encoder("text", tok), tok, str(root / "prep"))

  def train(config: str, workdir: str, *flags: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "fmjax.main", f"--config={config}", f"--workdir={root / workdir}",
                           *BYTES, *flags], cwd=repo, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

  train("configs/pretrain.py:smoke", "pt", f"--config.data.source=prepared:{root / 'prep'}", "--config.train.steps=8")
  train(f"configs/sft.py:smoke,init_from={root / 'pt'}", "sft", "--config.train.steps=6")
  train(f"configs/dpo.py:smoke,init_from={root / 'sft'}", "dpo", "--config.train.steps=4")
  return root


def test_prepare_manifest_names_the_curated_manifest_and_inherits_its_license(chain):
  m = json.loads((chain / "prep" / "manifest.json").read_text())
  assert m["parents"] == [{"path": str(chain / "cur" / "manifest.json"), "sha256": sha(chain / "cur" / "manifest.json"),
                           "tool": "curate"}]
  [item] = m["inputs"]
  assert item["uri"] == str(chain / "cur" / "curated-00000-of-00001.jsonl") and item["license"] == "CC-BY-4.0"
  assert item["sha256"] == sha(item["uri"]) and item["records"] == 60
  assert m["rules"]["tokenizer"] == "ByteTokenizer:259" and m["counts"]["examples"] == 60


def test_lineage_follows_init_from_back_to_the_data(chain):
  runs = lineage.chain(str(chain / "dpo"))
  assert [r["stage"] for r in runs] == ["lm", "sft", "dpo"]
  assert [r["workdir"] for r in runs] == [str(chain / d) for d in ("pt", "sft", "dpo")]
  assert [r["steps"] for r in runs] == [8, 6, 4]
  configs = [json.loads((chain / d / "config.json").read_text())["train"] for d in ("pt", "sft", "dpo")]
  rows = [1, 1, 2]  # a preference example is two rows (chosen, rejected)
  assert [r["tokens"] for r in runs] == [s * c["batch_size"] * c["seq_len"] * n
                                         for s, c, n in zip((8, 6, 4), configs, rows)]
  assert runs[1]["init_from"] == {"workdir": str(chain / "pt"), "step": 8}
  assert runs[2]["init_from"] == {"workdir": str(chain / "sft"), "step": 6}
  [data] = runs[0]["data"]
  assert data["source"] == f"prepared:{chain / 'prep'}" and data["licenses"] == ["CC-BY-4.0"]
  assert data["manifests"][0]["sha256"] == sha(chain / "prep" / "manifest.json")
  assert [d["source"] for d in runs[1]["data"]] == ["embedded:instruct"] and runs[1]["data"][0]["licenses"] == [
      "PSF-2.0"]
  assert lineage.licenses(runs) == ["CC-BY-4.0", "PSF-2.0"]
  metrics = [json.loads(line) for line in open(chain / "dpo" / "metrics.jsonl")]
  assert runs[2]["eval"]["eval_loss"] == [r for r in metrics if "eval_loss" in r][-1]["eval_loss"]


def test_audit_prints_the_chain_and_flags_a_changed_manifest(chain, repo, tmp_path):
  def audit() -> str:
    proc = subprocess.run([sys.executable, "tools/audit.py", str(chain / "dpo")], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
  out = audit()
  lines = out.splitlines()
  tokens = json.loads((chain / "pt" / "lineage.json").read_text())["tokens_per_step"] * 8
  assert lines[0] == f"1. lm: {chain / 'pt'} — 8 steps, {tokens:,} tokens"
  assert f"prepare manifest {chain / 'prep' / 'manifest.json'}" in out
  assert f"curate manifest {chain / 'cur' / 'manifest.json'}" in out  # the parent, one level deeper
  assert "2. sft:" in out and "3. dpo:" in out and "data licenses: CC-BY-4.0, PSF-2.0" in out
  assert "CHANGED" not in out and "WARNING" not in out
  path = chain / "cur" / "manifest.json"
  original = path.read_bytes()
  try:
    path.write_bytes(original.replace(b'"tool": "curate"', b'"tool": "curate" '))
    assert "CHANGED since recorded" in audit()
  finally:
    path.write_bytes(original)


def test_exported_model_card_parses_with_huggingface_hub(chain, repo, tmp_path):
  from huggingface_hub import ModelCard

  proc = subprocess.run([sys.executable, "tools/convert_hf.py", "export", f"--workdir={chain / 'dpo'}",
                         f"--hf_dir={tmp_path / 'hf'}"], cwd=repo, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  card = ModelCard.load(tmp_path / "hf" / "README.md")
  data = card.data.to_dict()
  assert data["license"] == "other" and data["license_name"] == "cc-by-4.0 and psf-2.0"
  assert data["data_licenses"] == ["CC-BY-4.0", "PSF-2.0"]
  assert data["datasets"] == sorted([f"prepared:{chain / 'prep'}", "embedded:instruct", "embedded:preference"])
  assert "base_model" not in data and set(data["tags"]) == {"fmjax", "lm", "sft", "dpo"}
  results = card.data.eval_results
  assert [r.task_name for r in results if r.metric_type == "eval_loss"] == ["lm (step 8)", "sft (step 6)",
                                                                             "dpo (step 4)"]
  runs = lineage.chain(str(chain / "dpo"))
  assert len(results) == sum(len(r["eval"]) for r in runs)
  assert "| sft | sft | 6 |" in card.text and "## Evaluation" in card.text
