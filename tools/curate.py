"""Curates a text corpus on Apache Beam: quality filters, PII scrubbing, exact and near deduplication.

  python tools/curate.py --input='corpus/*.jsonl' --output=/data/curated --license=CC-BY-4.0
  python tools/curate.py --input='corpus/*.jsonl' --output=/data/curated --runner=direct --num_workers=2
  python tools/curate.py --input='docs/**/*.txt' --output=/tmp/cur --no_near_dedup --min_chars=50
  python tools/curate.py --input='gs://bucket/raw/*.jsonl' --output=gs://bucket/curated --num_shards=1024 \
      --runner=dataflow --project=P --region=us-central1 --temp_location=gs://bucket/tmp

Input: .jsonl (one JSON object per line, text in --field, other fields kept), .txt (one document each), .parquet,
.array_record, or tfds:NAME[/CONFIG][:SPLIT]; --input may be given several times. Output: DIR/curated-*-of-N.jsonl
(kept records, text scrubbed, input order within a shard), DIR/report.json (counts per rule, PII replacements per
type, the first 5 examples per rule) and DIR/manifest.json (inputs with sha256 and license, rules, counts, versions).
Options this tool does not know go to Beam unchanged. See fmjax/curation/ for the rules.
"""

from __future__ import annotations

import argparse

from fmjax import errors, startup


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
  from fmjax.curation import QualityConfig, runner

  q = QualityConfig()
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, action="append",
                 help="glob of .jsonl / .txt / .parquet / .array_record files (quote it; ** recurses), or tfds:NAME")
  p.add_argument("--output", required=True, help="directory (or URI) for the shards, report.json and manifest.json")
  p.add_argument("--num_shards", type=int, default=1, help="output files (a shard is written by one worker)")
  p.add_argument("--license", default="", help="license id of every input (SPDX, e.g. CC-BY-4.0)")
  p.add_argument("--license_map", default="", help='JSON file {"glob": "license id"}; the first match wins')
  p.add_argument("--tfds_data_dir", default="", help="where tfds:NAME inputs are prepared")
  runner.add_flags(p)
  p.add_argument("--field", default="text", help="text field of .jsonl records (and the field .txt text goes to)")
  p.add_argument("--on_error", default="raise", choices=("raise", "skip"),
                 help="a corrupt line or a record without --field: stop with file:line (raise) or count and skip")
  p.add_argument("--overwrite", action="store_true", help="replace the shards of an existing DIR")
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
  return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict:
  """Runs the CLI; returns the report (also written to DIR/report.json)."""
  args, beam_args = parse_args(argv)
  from fmjax import curation
  from fmjax.governance import manifest

  cfg = curation.CurationConfig(
      field=args.field,
      quality=None if args.no_quality else curation.QualityConfig(
          min_chars=args.min_chars, max_chars=args.max_chars, min_words=args.min_words, max_words=args.max_words,
          min_alpha_ratio=args.min_alpha_ratio, max_dup_line_ratio=args.max_dup_line_ratio,
          max_repeated_ngram_ratio=args.max_repeated_ngram_ratio, repeated_ngram_n=args.repeated_ngram_n),
      pii=not args.no_pii, exact_dedup=not args.no_exact_dedup, near_dedup=not args.no_near_dedup,
      near_dedup_threshold=args.near_dedup_threshold, num_perm=args.num_perm, shingle_size=args.shingle_size)
  result = curation.run(args.input, args.output, cfg, runner_name=args.runner, num_workers=args.num_workers,
                        beam_args=beam_args, num_shards=args.num_shards, on_error=args.on_error,
                        license_id=args.license, license_map=manifest.load_license_map(args.license_map),
                        overwrite=args.overwrite, tfds_data_dir=args.tfds_data_dir)
  d = result["dropped"]
  quality_drops = sum(v for k, v in d.items() if k in curation.RULES)
  print(f"{args.output}: kept {result['kept_docs']:,} of {result['input_docs']:,} docs from {result['input_files']} "
        f"input(s) in {args.num_shards} shard(s); dropped {quality_drops:,} by quality rules, "
        f"{d.get('exact_duplicate', 0):,} exact and {d.get('near_duplicate', 0):,} near duplicates{_bad(d)}; "
        f"{sum(result['pii_replacements'].values()):,} PII replacements; {result['seconds']:.1f} s "
        f"({result['docs_per_second']:,.0f} docs/s on {args.runner}, {args.num_workers} worker(s)); report.json and "
        f"manifest.json in {args.output}")
  if "://" not in args.output:
    warning = manifest.unknown_warning(manifest.read(args.output)[0])
    if warning:
      print(warning)
  return result


def _bad(dropped: dict) -> str:
  return f", {dropped['bad_record']:,} bad records" if dropped.get("bad_record") else ""


if __name__ == "__main__":
  startup.run(main)
