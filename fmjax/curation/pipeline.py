"""Streaming curation: quality filters -> PII scrub -> exact dedup -> near dedup, one record at a time.

Order and why:
  1. quality filters on the raw text: cheapest way to drop junk, and junk never enters the dedup indexes;
  2. PII scrub: the scrubbed text is what is written, so
  3. exact and 4. near dedup compare scrubbed text (normalized: NFKC, lowercase, collapsed whitespace). Two
     documents that differ only in their PII (a form letter sent to many addresses) are duplicates in the output.
The first occurrence is kept. A near duplicate's exact digest is remembered too (pointing at the kept document it
duplicates), so a later exact copy of it is counted as an exact duplicate.

Memory: records stream through; only the dedup indexes grow, by about 0.5 KB per kept document (see
`fmjax.curation.dedup`), plus at most `max_examples` truncated examples per rule in the report.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterable, Iterator

from fmjax.curation import dedup, pii, quality
from fmjax.errors import UserError

WHERE = "_where"  # record key naming a record's origin (file:line), as in fmjax.data.sources; never written out
DUPLICATE_RULES = ("exact_duplicate", "near_duplicate")


class CurationError(UserError):
  """Bad input: the message names the file/line/field and the fix."""


@dataclasses.dataclass(frozen=True)
class CurationConfig:
  """What `curate` does; see the module docs of `quality`, `pii` and `dedup` for the rules."""
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


class Report:
  """Counts per rule and a few examples per rule; `to_dict()` is the report.json payload."""

  def __init__(self, cfg: CurationConfig):
    self.cfg = cfg
    self.input_docs = self.kept_docs = self.docs_with_pii = 0
    rules = (*(quality.RULES if cfg.quality else ()), *DUPLICATE_RULES)
    self.dropped: collections.Counter[str] = collections.Counter({r: 0 for r in rules})
    self.pii: collections.Counter[str] = collections.Counter()
    self.examples: dict[str, list[dict]] = collections.defaultdict(list)
    self.index_bytes_fn: Callable[[], dict[str, int]] | None = None  # set by the Curator that fills this report
    self.extra: dict[str, Any] = {}

  @property
  def index_bytes(self) -> dict[str, int]:
    """Bytes held by the dedup indexes now."""
    return self.index_bytes_fn() if self.index_bytes_fn else {}

  def excerpt(self, text: str) -> str:
    """The start of `text`, PII scrubbed (examples of dropped documents must not leak it), truncated."""
    n = self.cfg.example_chars
    if self.cfg.pii:
      text = pii.scrub(text[:n + 300])[0]  # scrub before cutting, so a PII item is not cut out of recognition
    return text if len(text) <= n else text[:n] + "..."

  def example(self, rule: str, doc_id: str, text: str | None = None, **info: Any) -> None:
    """Keeps an example for `rule` if it has fewer than `max_examples`."""
    if len(self.examples[rule]) < self.cfg.max_examples:
      self.examples[rule].append({"id": doc_id, **info, **({} if text is None else {"text": self.excerpt(text)})})

  def drop(self, rule: str, doc_id: str, text: str | None = None, **info: Any) -> None:
    """Counts a document dropped by `rule` and keeps it as an example if there is room."""
    self.dropped[rule] += 1
    self.example(rule, doc_id, text, **info)

  def bad_record(self, where: str, error: str) -> None:
    """Counts a record skipped by the reader (`on_error="skip"`): an input doc dropped by rule `bad_record`."""
    self.input_docs += 1
    self.dropped["bad_record"] += 1
    self.example("bad_record", where, error=error)

  def to_dict(self) -> dict[str, Any]:
    """The report as JSON-ready data: counts, PII replacements per type, examples, index bytes, config."""
    return {
        "input_docs": self.input_docs,
        "kept_docs": self.kept_docs,
        "dropped_docs": sum(self.dropped.values()),
        "dropped": dict(self.dropped),
        "pii_replacements": {k: self.pii.get(k, 0) for k in pii.PLACEHOLDERS} if self.cfg.pii else {},
        "docs_with_pii": self.docs_with_pii,
        "examples": dict(self.examples),
        "index_bytes": self.index_bytes,
        **self.extra,
        "config": dataclasses.asdict(self.cfg),
    }


class Curator:
  """Applies the rules to one record at a time; `process` returns the (scrubbed) record to keep, or None."""

  def __init__(self, cfg: CurationConfig | None = None, report: Report | None = None):
    self.cfg = cfg = cfg or CurationConfig()
    self.report = report or Report(cfg)
    self.exact = dedup.ExactDeduper() if cfg.exact_dedup else None
    self.near = dedup.NearDeduper(cfg.near_dedup_threshold, cfg.num_perm, cfg.shingle_size,
                                  cfg.seed) if cfg.near_dedup else None
    self._ngram_rule = cfg.quality is not None and cfg.quality.max_repeated_ngram_ratio < 1.0
    self.report.index_bytes_fn = self.index_bytes

  def process(self, record: dict, doc_id: str) -> dict | None:
    """The record to write (text scrubbed) or None if a rule drops it; counts and examples go to the report."""
    cfg, report = self.cfg, self.report
    report.input_docs += 1
    text = record.get(cfg.field)
    if not isinstance(text, str):
      raise CurationError(f"{doc_id}: field {cfg.field!r} is {'missing' if text is None else type(text).__name__}, "
                          f"not a string; set the text field (CurationConfig.field, --field) or drop such records.")
    norm = dedup.normalize(text)
    # word hashes serve the repeated n-gram rule and near dedup; computed once unless PII scrubbing changes the text
    words = dedup.word_hashes(norm) if self.near is not None or self._ngram_rule else None
    if cfg.quality is not None:
      rule = quality.check(text, cfg.quality, norm, words)
      if rule is not None:
        report.drop(rule, doc_id, text)
        return None
    if cfg.pii:
      scrubbed, counts = pii.scrub(text)
      if counts:
        report.pii.update(counts)
        report.docs_with_pii += 1
        report.example("pii", doc_id, scrubbed, replacements=counts)
        record, text = {**record, cfg.field: scrubbed}, scrubbed
        norm = dedup.normalize(text)
        words = None
    kept_index = report.kept_docs
    if self.exact is not None:
      digest = self.exact.digest(norm)
      original = self.exact.get(digest)
      if original is not None:
        report.drop("exact_duplicate", doc_id, text, kept_index=original)
        return None
    if self.near is not None:
      original, jaccard = self.near.query_or_add(self.near.signature(norm, words))
      if original is not None:
        report.drop("near_duplicate", doc_id, text, kept_index=original, jaccard=round(jaccard, 3))
        if self.exact is not None:
          self.exact.add(digest, original)
        return None
    if self.exact is not None:
      self.exact.add(digest, kept_index)
    report.kept_docs += 1
    return record

  def index_bytes(self) -> dict[str, int]:
    """Bytes held by the exact and near dedup indexes."""
    return {"exact": self.exact.nbytes if self.exact else 0, "near": self.near.nbytes if self.near else 0}


def curate(records: Iterable[dict], cfg: CurationConfig | None = None, report: Report | None = None
           ) -> Iterator[dict]:
  """Yields the kept records (text field scrubbed, `_where` removed) of a stream of dict records, in order.

  A record's id in the report is its `_where` (as set by `read_records`), else its `id` field, else `#<position>`.
  Pass `report` to read the counts after (or while) iterating; `kept_index` in duplicate examples is the 0-based
  position of the kept original among the yielded records.
  """
  curator = Curator(cfg, report)
  for i, record in enumerate(records):
    doc_id = record.get(WHERE, record.get("id"))
    kept = curator.process(record, f"#{i}" if doc_id is None else str(doc_id))
    if kept is not None:
      if WHERE in kept:
        kept = {k: v for k, v in kept.items() if k != WHERE}
      yield kept


def input_files(pattern: str) -> list[str]:
  """Sorted files matching a glob (`**` recursive) of .jsonl / .txt files, or an error naming the glob and the fix."""
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
  if not paths:
    raise CurationError(f"--input={pattern!r} matches no files; check the path, and quote the glob so the shell "
                        f"passes it unexpanded (e.g. --input='data/**/*.jsonl').")
  bad = [p for p in paths if not p.endswith((".jsonl", ".txt"))]
  if bad:
    raise CurationError(f"--input={pattern!r} matches {len(bad)} file(s) that are neither .jsonl nor .txt, e.g. "
                        f"{bad[0]!r}; narrow the glob (e.g. '*.jsonl').")
  return paths


def read_records(paths: Iterable[str], field: str = "text", on_error: str = "raise",
                 report: Report | None = None) -> Iterator[dict]:
  """Streams records: a .jsonl file gives one JSON object per non-blank line, a .txt file one record {field: text}.

  Each record carries `_where` (`path:line` or `path`). A line that is not a JSON object, or lacks a string `field`,
  raises CurationError naming file:line and the field, or with on_error="skip" is counted in `report` and skipped.
  """
  if on_error not in ("raise", "skip"):
    raise UserError(f"on_error={on_error!r} is unknown; use 'raise' or 'skip'.")

  def bad(where: str, error: str) -> None:
    if on_error == "raise":
      raise CurationError(f"{where}: {error}; fix or remove it, or pass --on_error=skip to count and skip such "
                          "records.")
    if report is not None:
      report.bad_record(where, error)

  for path in paths:
    if path.endswith(".txt"):
      try:
        with open(path, encoding="utf-8") as f:
          yield {field: f.read(), WHERE: path}
      except UnicodeDecodeError as e:
        bad(path, f"not UTF-8 text ({e})")
      continue
    with open(path, "rb") as f:
      for line_no, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"{path}:{line_no}"
        try:
          record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          bad(where, f"not valid JSON ({e})")
          continue
        if not isinstance(record, dict):
          bad(where, f"expected a JSON object, got {type(record).__name__}")
          continue
        if not isinstance(record.get(field), str):
          bad(where, f"the record has no string field {field!r} (keys: {sorted(record)[:8]}); set --field")
          continue
        record[WHERE] = where
        yield record
