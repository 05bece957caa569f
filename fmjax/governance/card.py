"""A Hugging Face model card (README.md: YAML metadata, then text) made from a run's lineage.

Metadata: `datasets` (every training source along the chain), `license` (the data's single license, else `other`
with `license_name`), `data_licenses`, `base_model` (the Hugging Face model the chain was imported from, if any),
`model-index` (each stage's last evaluation), tags. The text lists the stages with steps and tokens, the data with
its manifests, and flags data of unknown license.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from fmjax.governance import lineage, manifest

HF_LICENSES = {"apache-2.0", "mit", "cc-by-4.0", "cc-by-sa-4.0", "cc0-1.0", "bsd-3-clause", "gpl-3.0", "odc-by",
               "cc-by-nc-4.0", "llama3", "openrail"}  # ids the Hub knows, as written in its metadata


def metadata(runs: list[dict[str, Any]], name: str) -> dict[str, Any]:
  """The card's YAML metadata for a chain of runs (`lineage.chain`)."""
  licenses = lineage.licenses(runs)
  meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                          "tags": ["fmjax", *sorted({r["stage"] for r in runs})]}
  if len(licenses) == 1 and licenses[0].lower() in HF_LICENSES:
    meta["license"] = licenses[0].lower()
  else:
    meta["license"], meta["license_name"] = "other", " AND ".join(licenses).lower() or manifest.UNKNOWN
  meta["data_licenses"] = licenses
  meta["datasets"] = sorted({d["source"] for r in runs for d in r.get("data", []) if d["use"].startswith("train")})
  base = next((r["hf_model"] for r in runs if r.get("hf_model")), None)
  if base:
    meta["base_model"] = base
  results = []
  for run in runs:  # one result per stage, with its last evaluation's metrics
    metrics = [{"type": k, "value": round(float(v), 6), "name": k} for k, v in sorted(run["eval"].items())
               if isinstance(v, (int, float))]
    if metrics:
      source = next((d["source"] for d in run.get("data", []) if d["use"].startswith("train")), run["stage"])
      results.append({"task": {"type": "text-generation", "name": f"{run['stage']} (step {run['steps']})"},
                      "dataset": {"type": source, "name": f"{source} (held out)"}, "metrics": metrics})
  if results:
    meta["model-index"] = [{"name": name, "results": results}]
  return meta


def render(runs: list[dict[str, Any]], name: str) -> str:
  """README.md: the metadata block, then the stages, the data and the evaluation in Markdown."""
  meta = metadata(runs, name)
  lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {name}", "",
           "Trained with fmjax. Each stage started from the one above it.", "",
           "| stage | run | steps | tokens | data |", "|---|---|---|---|---|"]
  for run in runs:
    data = ", ".join(f"`{d['source']}`" for d in run.get("data", []) if d["use"].startswith("train")) or "—"
    what = run.get("hf_model", os.path.basename(run["workdir"]))
    lines.append(f"| {run['stage']} | {what} | {run['steps']:,} | {run['tokens']:,} | {data} |")
  lines += ["", "## Data", ""]
  for run in runs:
    for d in run.get("data", []):
      found = "; ".join(f"manifest {m['path']} (sha256 {m['sha256'][:16]}…)" for m in d["manifests"]) or "no manifest"
      lines.append(f"- {run['stage']}, {d['use']}: `{d['source']}`, license {' AND '.join(d['licenses'])}, {found}")
  if manifest.UNKNOWN in meta["data_licenses"]:
    lines += ["", "**Some training data has no recorded license.** Confirm the rights to use it before release."]
  frozen = [(run["stage"], f) for run in runs for f in run.get("frozen", [])]
  if frozen:
    lines += ["", "Frozen models read in training: " + "; ".join(
        f"{f['role']} of {stage}: {f['workdir']}" for stage, f in frozen) + "."]
  evals = [(run, k, v) for run in runs for k, v in sorted(run["eval"].items()) if isinstance(v, (int, float))]
  if evals:
    lines += ["", "## Evaluation", "", "| stage | step | metric | value |", "|---|---|---|---|"]
    lines += [f"| {run['stage']} | {run['steps']:,} | {k} | {v:.4f} |" for run, k, v in evals]
  return "\n".join(lines) + "\n"


def write(workdir: str, hf_dir: str, step: int = -1) -> str:
  """Writes `hf_dir`/README.md for run `workdir` at checkpoint `step`; returns its path."""
  runs = lineage.chain(workdir, step)
  path = os.path.join(hf_dir, "README.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(render(runs, os.path.basename(os.path.abspath(hf_dir))))
  return path
