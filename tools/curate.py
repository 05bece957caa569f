"""Curates a text corpus: quality filters, PII scrubbing, exact and near deduplication, in one streaming pass.

  python tools/curate.py --input='corpus/*.jsonl' --output=/data/curated
  python tools/curate.py --input='docs/**/*.txt' --output=/tmp/cur --no_near_dedup --min_chars=50
  python tools/curate.py --input='sft/*.jsonl' --field=completion --output=/tmp/sft --on_error=skip

Input: .jsonl files (one JSON object per line, text in --field, other fields kept) and .txt files (one document
each), read in sorted path order. Output: DIR/curated.jsonl (kept records, text scrubbed) and DIR/report.json
(counts per rule, PII replacements per type, up to 5 examples per rule). See fmjax/curation/ for the rules.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from fmjax import errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  from fmjax.curation import QualityConfig

  q = QualityConfig()
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help="glob of .jsonl / .txt files (quote it; ** recurses)")
  p.add_argument("--output", required=True, help="directory for curated.jsonl and report.json")
  p.add_argument("--field", default="text", help="text field of .jsonl records (and the field .txt text goes to)")
  p.add_argument("--on_error", default="raise", choices=("raise", "skip"),
                 help="a corrupt line or a record without --field: stop with file:line (raise) or count and skip")
  p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/curated.jsonl")
  p.add_argument("--no_exact_dedup", action="store_true")
  p.add_argument("--no_near_dedup", action="store_true")
  p.add_argument("--no_pii", action="store_true")
  p.add_argument("--no_quality", action="store_true", help="skip all quality filters")
  p.add_argument("--near_dedup_threshold", type=float, default=0.8, help="estimated Jaccard of word shingles")
  p.add_argument("--shingle_size", type=int, default=5, help="words per shingle")
  p.add_argument("--num_perm", type=int, default=128, help="MinHash permutations")
  p.add_argument("--min_chars", type=int, default=q.min_chars, help="0 = off")
  p.add_argument("--max_chars", type=int, default=q.max_chars, help="0 = off")
  p.add_argument("--min_words", type=int, default=q.min_words, help="0 = off")
  p.add_argument("--max_words", type=int, default=q.max_words, help="0 = off")
  p.add_argument("--min_alpha_ratio", type=float, default=q.min_alpha_ratio, help="letters / non-space chars; 0 = off")
  p.add_argument("--max_dup_line_ratio", type=float, default=q.max_dup_line_ratio, help="1 = off")
  p.add_argument("--max_repeated_ngram_ratio", type=float, default=q.max_repeated_ngram_ratio, help="1 = off")
  p.add_argument("--repeated_ngram_n", type=int, default=q.repeated_ngram_n, help="n of the repeated n-gram rule")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  """Runs the CLI; returns the report (also written to DIR/report.json)."""
  args = parse_args(argv)
  from fmjax import curation

  cfg = curation.CurationConfig(
      field=args.field,
      quality=None if args.no_quality else curation.QualityConfig(
          min_chars=args.min_chars, max_chars=args.max_chars, min_words=args.min_words, max_words=args.max_words,
          min_alpha_ratio=args.min_alpha_ratio, max_dup_line_ratio=args.max_dup_line_ratio,
          max_repeated_ngram_ratio=args.max_repeated_ngram_ratio, repeated_ngram_n=args.repeated_ngram_n),
      pii=not args.no_pii, exact_dedup=not args.no_exact_dedup, near_dedup=not args.no_near_dedup,
      near_dedup_threshold=args.near_dedup_threshold, num_perm=args.num_perm, shingle_size=args.shingle_size)
  paths = curation.input_files(args.input)

  os.makedirs(args.output, exist_ok=True)
  out_path, report_path = os.path.join(args.output, "curated.jsonl"), os.path.join(args.output, "report.json")
  if os.path.exists(out_path) and not args.overwrite:
    raise errors.UserError(f"{out_path} exists; choose another --output or pass --overwrite.")
  report = curation.Report(cfg)
  t0 = time.perf_counter()
  tmp_path = out_path + ".partial"
  try:
    with open(tmp_path, "w", encoding="utf-8") as f:
      records = curation.read_records(paths, args.field, args.on_error, report)
      for record in curation.curate(records, cfg, report):
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
  except curation.CurationError:
    os.remove(tmp_path)  # no partial output
    raise
  os.replace(tmp_path, out_path)
  seconds = time.perf_counter() - t0
  report.extra.update(input_files=len(paths), seconds=round(seconds, 3),
                      docs_per_second=round(report.input_docs / max(seconds, 1e-9), 1))
  result = report.to_dict()
  with open(report_path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, ensure_ascii=False)
  d = result["dropped"]
  quality_drops = sum(v for k, v in d.items() if k in curation.RULES)
  print(f"{out_path}: kept {result['kept_docs']:,} of {result['input_docs']:,} docs from {len(paths)} file(s); "
        f"dropped {quality_drops:,} by quality rules, {d.get('exact_duplicate', 0):,} exact and "
        f"{d.get('near_duplicate', 0):,} near duplicates{_bad(d)}; {sum(result['pii_replacements'].values()):,} PII "
        f"replacements; {seconds:.1f} s ({result['docs_per_second']:,.0f} docs/s); report {report_path}")
  return result


def _bad(dropped: dict) -> str:
  return f", {dropped['bad_record']:,} bad records" if dropped.get("bad_record") else ""


if __name__ == "__main__":
  errors.run(main)
