"""Scores records with a reward model or a classifier (a run or Hugging Face directory with a score head): one
JSON line out per line in, the record plus `score` (a reward model) or `scores` and `label` (the argmax class).

  python tools/score.py --workdir=/tmp/rm --input=pairs.jsonl --output=scored.jsonl
  python tools/score.py --workdir=/tmp/rm --prompt='What does `len` do?' --completion='Return the length.'

Records are {"prompt", "completion"} (strings or chat messages, tokenized as the reward model was trained) or
{"text"}; a {"prompt", "chosen", "rejected"} record is scored on both sides (`score_chosen`, `score_rejected`).
"""

from __future__ import annotations

import argparse
import json
import sys

from fmjax import errors, startup


def _flatten(records: list[dict]) -> tuple[list[dict], list[tuple[int, str]]]:
  """(records to score, (input index, output key) of each)."""
  flat, where = [], []
  for i, r in enumerate(records):
    if "chosen" in r and "rejected" in r:
      for side in ("chosen", "rejected"):
        flat.append({"prompt": r.get("prompt", ""), "completion": r[side]})
        where.append((i, f"_{side}"))
    else:
      flat.append(r)
      where.append((i, ""))
  return flat, where


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a reward-model or classifier run (or Hugging Face) directory")
  p.add_argument("--input", default="", help="a .jsonl file of records")
  p.add_argument("--prompt", default="", help="score one prompt ... ")
  p.add_argument("--completion", default=None, help="... and completion instead of --input")
  p.add_argument("--output", default="", help="where the scored .jsonl goes (default: stdout)")
  p.add_argument("--step", type=int, default=-1, help="checkpoint step of a run directory (-1 = newest)")
  p.add_argument("--batch_size", type=int, default=16)
  args = p.parse_args()
  if bool(args.input) == (args.completion is not None):
    p.error("give --input=FILE.jsonl, or --prompt and --completion")

  import fmjax
  from fmjax.data.sources import json_record

  if args.input:
    with open(args.input, "rb") as f:
      records = [json_record(line, f"{args.input}:{n}", "each line must be one JSON object")
                 for n, line in enumerate(f, 1) if line.strip()]
    for r in records:
      r.pop("_where", None)
  else:
    records = [{"prompt": args.prompt, "completion": args.completion}]
  model = fmjax.load(args.workdir, args.step, key="--workdir")
  flat, where = _flatten(records)
  scores = model.score(flat, args.batch_size)
  for (i, suffix), s in zip(where, scores):
    if len(s) == 1:
      records[i][f"score{suffix}"] = float(s[0])
    else:
      records[i][f"scores{suffix}"], records[i][f"label{suffix}"] = [float(x) for x in s], int(s.argmax())
  out = open(args.output, "w") if args.output else sys.stdout
  for r in records:
    out.write(json.dumps(r) + "\n")
  if args.output:
    out.close()
    print(f"scored {len(records)} records with {args.workdir}: {args.output}", file=sys.stderr)


if __name__ == "__main__":
  startup.run(main)
