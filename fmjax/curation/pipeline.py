"""Curation as one Beam pipeline: quality filters -> PII scrub -> exact dedup -> near dedup -> sharded JSONL.

Order and why:
  1. quality filters on the raw text: the cheapest way to drop junk, and junk never reaches dedup;
  2. PII scrub: the scrubbed text is what is written, so
  3. exact and 4. near dedup compare scrubbed text (normalized: NFKC, lowercase, collapsed whitespace). Two
     documents that differ only in their PII (a form letter sent to many addresses) are duplicates in the output.
The first occurrence in input order is kept: of each group of exact copies, and of each connected component of
near-duplicate pairs (a document that is both counts as an exact duplicate). The same transforms run on this
machine (`--runner=direct`, 1 or N worker processes) and on Dataflow, Flink or Spark; the output, report.json and
the counts in manifest.json are the same for any number of workers.

`run(...)` writes to DIR: `curated-SSSSS-of-NNNNN.jsonl` (kept records in input order within a shard, text
scrubbed, other fields kept), `report.json` (counts per rule, PII per type, the first examples per rule) and
`manifest.json` (`fmjax.governance.manifest`). A local DIR's output is written whole in a hidden staging directory
(DIR/.curating-*) and moved in only when the run succeeds, so a failed run (an --overwrite that fails too) leaves
DIR as it was.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
import uuid
from typing import Any

from fmjax.curation import pii, quality, read, runner
from fmjax.curation.read import CurationError
from fmjax.errors import UserError
from fmjax.governance import manifest

DUPLICATE_RULES = ("exact_duplicate", "near_duplicate")


@dataclasses.dataclass(frozen=True)
class CurationConfig:
  """What curation does; see the module docs of `quality`, `pii` and `dedup` for the rules."""
  field: str = "text"
  quality: quality.QualityConfig | None = dataclasses.field(default_factory=quality.QualityConfig)  # None: off
  pii: bool = True
  exact_dedup: bool = True
  near_dedup: bool = True
  near_dedup_threshold: float = 0.8
  num_perm: int = 128
  shingle_size: int = 5
  seed: int = 1
  max_examples: int = 5  # per rule in the report
  example_chars: int = 200

  def __post_init__(self):
    if not self.field:
      raise UserError("field='' names no text field; use the key that holds the text, e.g. 'text'.")
    if not 0.0 < self.near_dedup_threshold < 1.0:
      raise UserError(f"near_dedup_threshold={self.near_dedup_threshold} must be in (0, 1), e.g. 0.8.")
    if self.num_perm < 2 or self.shingle_size < 1:
      raise UserError(f"num_perm={self.num_perm} must be >= 2 (128 is typical) and shingle_size={self.shingle_size} "
                      ">= 1 (5 is typical).")

  @property
  def rules(self) -> tuple[str, ...]:
    """The rules that can drop a document, in the report's order."""
    return ("bad_record", *(quality.RULES if self.quality else ()),
            *(("exact_duplicate",) if self.exact_dedup else ()), *(("near_duplicate",) if self.near_dedup else ()))


class Examples:
  """Makes report examples: the document's place, a PII-scrubbed excerpt, and `kept` as a place too."""

  def __init__(self, cfg: CurationConfig, inputs: list[str]):
    self.cfg, self.inputs, self.field = cfg, inputs, cfg.field

  def example(self, order: int, text: str | None, **info: Any) -> dict:
    if "kept" in info:
      info["kept"] = read.where(self.inputs, info["kept"])
    out = {"id": read.where(self.inputs, order), **info}
    if text is not None:
      n = self.cfg.example_chars
      if self.cfg.pii:
        text = pii.scrub(text[:n + 300])[0]  # scrub before cutting, so a PII item is not cut out of recognition
      out["text"] = text if len(text) <= n else text[:n] + "..."
    return out


def report_dict(cfg: CurationConfig, tally: dict[str, int], examples: list[tuple[str, list]]) -> dict[str, Any]:
  """report.json's payload from the pipeline's tallies and first examples."""
  dropped = {rule: tally.get(f"dropped/{rule}", 0) for rule in cfg.rules}
  return {
      "input_docs": tally.get("input_docs", 0),
      "kept_docs": tally.get("kept_docs", 0),
      "dropped_docs": sum(dropped.values()),
      "dropped": dropped,
      "pii_replacements": {k: tally.get(f"pii/{k}", 0) for k in pii.PLACEHOLDERS} if cfg.pii else {},
      "docs_with_pii": tally.get("docs_with_pii", 0),
      "examples": {rule: [e for _, e in sorted(items, key=lambda x: x[0])] for rule, items in sorted(examples)},
      "config": dataclasses.asdict(cfg),
  }


def _finish(_: Any, output: str, cfg: CurationConfig, inputs: list[str], licenses: list[str], parents: list,
            created: str, tally: dict, examples: list, stats: list, files: list) -> None:
  """The pipeline's last step: writes report.json and manifest.json (through Beam's filesystems)."""
  from apache_beam.io.filesystems import FileSystems

  report = report_dict(cfg, tally, examples)
  items = []
  for s in sorted(stats, key=lambda s: s["index"]):
    item = {k: v for k, v in s.items() if k != "index"}
    items.append({**item, "license": licenses[s["index"]]})
  counts = {"input_docs": report["input_docs"], "kept_docs": report["kept_docs"], "removed": report["dropped"],
            "pii_found": report["pii_replacements"], "docs_with_pii": report["docs_with_pii"]}
  rules = {k: v for k, v in report["config"].items() if k not in ("max_examples", "example_chars")}
  record = manifest.build("curate", items, rules, sorted(files, key=lambda f: f["file"]), counts, parents, created,
                          manifest.tool_versions("apache-beam", "numpy"))
  for name, data in (("report.json", (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()),
                     (manifest.NAME, manifest.dumps(record))):
    with FileSystems.create(FileSystems.join(output, name)) as f:
      f.write(data)


def run(patterns: list[str], output: str, cfg: CurationConfig | None = None, *, runner_name: str = "direct",
        num_workers: int = 1, beam_args: list[str] = (), num_shards: int = 1, on_error: str = "raise",
        license_id: str = "", license_map: dict[str, str] | None = None, overwrite: bool = False,
        tfds_data_dir: str = "") -> dict[str, Any]:
  """Curates the inputs of `patterns` into `output`; returns the report (with `seconds`) and prints nothing."""
  runner.beam()  # an error naming the extra to install, before anything else
  cfg = cfg or CurationConfig()
  if on_error not in ("raise", "skip"):
    raise UserError(f"on_error={on_error!r} is unknown; use 'raise' or 'skip'.")
  if num_shards < 1:
    raise UserError(f"--num_shards={num_shards} must be >= 1.")
  inputs = read.list_inputs(list(patterns))
  licenses = [read.license_of(p, license_id, license_map or {}) for p in inputs]
  target, local = output, "://" not in output
  created = False
  if local:
    if os.path.exists(target) and not os.path.isdir(target):
      raise UserError(f"--output={target!r} is a file, not a directory; pass a directory, or move that file away.")
    if glob.glob(os.path.join(target, "curated-*.jsonl")) and not overwrite:
      raise UserError(f"{target} already holds curated shards; choose another --output or pass --overwrite.")
    created = not os.path.isdir(target)
    output = _staging(target)
  try:
    report = _run(inputs, licenses, output, cfg, runner_name, num_workers, beam_args, num_shards, on_error,
                  tfds_data_dir)
  except BaseException:
    if local:  # no partial output; the old one (if any) is untouched
      shutil.rmtree(output, ignore_errors=True)
      if created and not os.listdir(target):
        os.rmdir(target)
    raise
  if local:
    _swap_in(output, target)
  return report


def _staging(target: str) -> str:
  """A new hidden directory for a run's output inside directory `target` (created if missing): on its filesystem,
  so `_swap_in` moves files by renaming them even where `target` is a mount point."""
  os.makedirs(target, exist_ok=True)
  path = os.path.join(target, f".curating-{uuid.uuid4().hex[:8]}")
  os.mkdir(path)
  return path


def _swap_in(staging: str, target: str) -> None:
  """Replaces the curation output in `target` (shards, report, manifest; other files stay) by the finished run's in
  `staging`. The old manifest goes first and the new one comes last, so that whatever the moment, a manifest names
  exactly the shards beside it (or there is none)."""
  new = sorted(n for n in os.listdir(staging) if n != manifest.NAME)
  stale = {os.path.basename(p) for pattern in ("curated-*.jsonl", "*.partial")
           for p in glob.glob(os.path.join(target, pattern))} - set(new)
  if os.path.exists(os.path.join(target, manifest.NAME)):
    os.remove(os.path.join(target, manifest.NAME))
  for name in new:
    os.replace(os.path.join(staging, name), os.path.join(target, name))
  for name in sorted(stale):
    os.remove(os.path.join(target, name))
  os.replace(os.path.join(staging, manifest.NAME), os.path.join(target, manifest.NAME))
  os.rmdir(staging)


def _run(inputs: list[str], licenses: list[str], output: str, cfg: CurationConfig, runner_name: str,
         num_workers: int, beam_args: list[str], num_shards: int, on_error: str, tfds_data_dir: str) -> dict[str, Any]:
  """Runs the pipeline writing into directory (or URI) `output`; returns the report."""
  beam = runner.beam()
  from fmjax.curation import stages

  examples = Examples(cfg, inputs)
  created = manifest.now()
  t0 = time.perf_counter()
  p = runner.pipeline(runner_name, num_workers, list(beam_args))
  try:
    with p:
      curate = stages.Curate(inputs, output, cfg, examples, num_shards, tfds_data_dir,
                             spread=not runner.is_direct(runner_name))
      files = p | "Inputs" >> beam.Create(list(range(len(inputs)))) | curate
      if on_error == "raise":
        _ = curate.bad | "Stop at a bad record" >> beam.Map(_raise_bad, inputs)
      _ = (p | "Once" >> beam.Create([None])
           | "Report" >> beam.Map(_finish, output, cfg, inputs, licenses, manifest.parents(inputs), created,
                                  tally=beam.pvalue.AsSingleton(curate.tallies),
                                  examples=beam.pvalue.AsList(curate.examples),
                                  stats=beam.pvalue.AsSingleton(curate.stats),
                                  files=beam.pvalue.AsSingleton(files)))
  except Exception as e:
    message = runner.failure(e)
    if message is None:
      raise
    raise CurationError(message) from None
  seconds = time.perf_counter() - t0
  from apache_beam.io.filesystems import FileSystems

  with FileSystems.open(FileSystems.join(output, "report.json")) as f:
    report = json.loads(f.read())
  report.update(input_files=len(inputs), seconds=round(seconds, 3),
                docs_per_second=round(report["input_docs"] / max(seconds, 1e-9), 1))
  with FileSystems.create(FileSystems.join(output, "report.json")) as f:
    f.write((json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
  return report


def _raise_bad(bad: tuple[int, str], inputs: list[str]) -> None:
  raise CurationError(f"{read.where(inputs, bad[0])}: {bad[1]}; fix or remove it, or pass --on_error=skip to "
                      "count and skip such records.")
