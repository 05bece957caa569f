"""Evaluate a model (an fmjax run directory or a Hugging Face checkpoint directory) on texts, preference pairs, or
lm-evaluation-harness tasks.

  python tools/evaluate.py perplexity --model=/tmp/pt --data=embedded:prose
  python tools/evaluate.py perplexity --model=/tmp/pt --data='notes/*.jsonl' --split=all --seq_len=512 --stride=256
  python tools/evaluate.py preference --model=/tmp/dpo --data=embedded:preference --reference=/tmp/sft
  python tools/evaluate.py lm_eval --model=/tmp/sft --tasks=my_task --include_path=my_tasks/ --limit=100
  python tools/evaluate.py rewards --model=/tmp/grpo --data=embedded:sort --rewards=sort_exact,sort_digits
  python tools/evaluate.py rewards --model=/tmp/rlhf --data=embedded:preference --rewards=model --reward_model=/tmp/rm

perplexity: token-weighted NLL, perplexity and bits per byte of each text as BOS + text + EOS, in windows of
--seq_len tokens (--stride < --seq_len: overlapping windows, more context per token). preference: how often the
model gives the chosen response a higher log-probability than the rejected one; with --reference, DPO's implicit
reward accuracy and mean log-ratio margin. --data is a source spec (embedded:NAME, or a glob of .txt / .jsonl /
.parquet files, or tfds:NAME) and --split a side of its held-out split (train | validation | all).

lm_eval needs `pip install -e '.[eval]'` and runs offline (HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 unless set):
tasks read local files or datasets already in the Hugging Face cache. --output=FILE.json writes the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from fmjax import errors, startup


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = p.add_subparsers(dest="command", required=True)
  ppl = commands.add_parser("perplexity", help="NLL, perplexity and bits per byte over the texts of a source")
  pref = commands.add_parser("preference", help="preference accuracy over {prompt?, chosen, rejected} pairs")
  harness = commands.add_parser("lm_eval", help="lm-evaluation-harness tasks")
  rew = commands.add_parser("rewards", help="mean rewards of the model's completions of {prompt, ...} records")
  for sub in (ppl, pref, harness, rew):
    sub.add_argument("--model", required=True, help="fmjax run directory or Hugging Face checkpoint directory")
    sub.add_argument("--batch_size", type=int, default=8, help="rows per forward pass")
    sub.add_argument("--output", default="", help="write the results to this JSON file")
  for sub in (ppl, pref, rew):
    sub.add_argument("--data", required=True, help="source spec: embedded:prose, 'docs/*.jsonl', ...")
    sub.add_argument("--split", default="validation", choices=("train", "validation", "all"))
    sub.add_argument("--max_docs", type=int, default=0, help="score at most this many texts or pairs (0 = all)")
  ppl.add_argument("--field", default="text", help="the text field of .jsonl / .parquet records")
  ppl.add_argument("--seq_len", type=int, default=1024, help="inputs per window")
  ppl.add_argument("--stride", type=int, default=0, help="tokens between window starts (0 = seq_len)")
  pref.add_argument("--reference", default="", help="reference model for DPO implicit rewards")
  rew.add_argument("--rewards", required=True, help="'name[:weight],...' as objective.rewards ('model' included)")
  rew.add_argument("--reward_model", default="", help="a reward-model run directory, for the reward 'model'")
  rew.add_argument("--max_new_tokens", type=int, default=32)
  rew.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  rew.add_argument("--seed", type=int, default=0)
  harness.add_argument("--tasks", required=True, help="comma-separated task names")
  harness.add_argument("--include_path", default="", help="directory of extra task YAMLs")
  harness.add_argument("--num_fewshot", type=int, default=None)
  harness.add_argument("--limit", type=float, default=None, help="documents per task (< 1: a fraction)")
  harness.add_argument("--max_length", type=int, default=2048, help="context window in tokens")
  args = p.parse_args()

  results = {"perplexity": run_perplexity, "preference": run_preference, "lm_eval": run_lm_eval,
             "rewards": run_rewards}[args.command](args)
  if args.output:
    with open(args.output, "w") as f:
      json.dump(results, f, indent=2, default=str)
    print(f"wrote {args.output}")


def run_perplexity(args: argparse.Namespace) -> dict[str, Any]:
  import fmjax
  from fmjax import data
  from fmjax.evaluation import perplexity

  texts = data.documents(args.data, args.split, args.field)[:args.max_docs or None]
  if not any(texts) and not any(data.documents(args.data, "all", args.field, max_chars=1)):
    raise data.no_text_error(args.data, args.field, "--field")
  if not any(texts):
    raise data.DataError(f"--data={args.data!r} holds no text on split {args.split!r} (field {args.field!r}); "
                         f"check --field{other_split(args)}.")
  result = dataclasses.asdict(perplexity(fmjax.load(args.model), texts, args.seq_len, args.stride, args.batch_size))
  table(result)
  return {"model": args.model, "data": args.data, "split": args.split, **result}


def _records(args: argparse.Namespace) -> list[dict]:
  """The first --max_docs records of --data's --split."""
  from fmjax import data

  records = data.open_source(args.data, args.split)
  records = [records[i] for i in range(min(len(records), args.max_docs or len(records)))]
  if not records:
    raise data.DataError(f"--data={args.data!r} holds no records on split {args.split!r}{other_split(args)}.")
  return records


def run_preference(args: argparse.Namespace) -> dict[str, Any]:
  import fmjax
  from fmjax.evaluation import preference_accuracy

  records = _records(args)
  reference = fmjax.load(args.reference, key="--reference") if args.reference else None
  result = dataclasses.asdict(preference_accuracy(fmjax.load(args.model), records, reference, args.batch_size))
  table({k: v for k, v in result.items() if v is not None})
  return {"model": args.model, "reference": args.reference, "data": args.data, "split": args.split, **result}


def run_rewards(args: argparse.Namespace) -> dict[str, Any]:
  import fmjax
  from fmjax.evaluation import rewards

  records = _records(args)
  reward_model = fmjax.load(args.reward_model, key="--reward_model") if args.reward_model else None
  result = rewards.evaluate(fmjax.load(args.model), records, args.rewards, reward_model, args.max_new_tokens,
                            args.temperature, args.seed, args.batch_size)
  table({"prompts": result.prompts, **{f"reward/{k}": v for k, v in result.means.items()}, "reward": result.total,
         "completion length": result.mean_length, "terminated": result.terminated})
  for prompt, completion, value in result.examples:
    print(f">>> {prompt!r} -> {completion!r}  ({value:.3f})")
  return {"model": args.model, "data": args.data, "split": args.split, **dataclasses.asdict(result)}


def run_lm_eval(args: argparse.Namespace) -> dict[str, Any]:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before `datasets` is imported: it reads these once
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  try:
    import lm_eval
  except ImportError as e:
    if e.name != "lm_eval":
      raise
    raise errors.UserError("tools/evaluate.py lm_eval needs lm-evaluation-harness, which is not installed; install it "
                           "with `pip install -e '.[eval]'`.") from e
  from lm_eval.tasks import TaskManager
  from lm_eval.utils import make_table

  from fmjax.evaluation.harness import FmjaxLM

  model = FmjaxLM(pretrained=args.model, batch_size=args.batch_size, max_length=args.max_length)
  tasks = TaskManager(include_path=args.include_path or None)
  names = args.tasks.split(",")
  unknown = [n for n in names if n not in tasks.all_tasks]
  if unknown:
    raise errors.UserError(f"unknown lm_eval tasks {unknown} (not among the {len(tasks.all_tasks)} indexed); check the "
                     "names, or add the directory of their YAML files with --include_path.")
  limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
  results = lm_eval.simple_evaluate(model, tasks=names, num_fewshot=args.num_fewshot, limit=limit,
                                    task_manager=tasks, log_samples=False)
  print(make_table(results))
  return results


def other_split(args: argparse.Namespace) -> str:
  return ", or try --split=all" if args.split != "all" else ""


def table(values: dict[str, Any]) -> None:
  width = max(len(k) for k in values)
  for k, v in values.items():
    print(f"{k:<{width}}  {v:,.4f}" if isinstance(v, float) else f"{k:<{width}}  {v:,}")


if __name__ == "__main__":
  startup.run(main)
