"""Draws loss curves from the `metrics.jsonl` of one or more runs into a PNG.

  python tools/plot.py /tmp/pt --output=pt.png                                   # loss and every eval_loss*
  python tools/plot.py /tmp/cpt0 /tmp/cpt25 --keys=eval_loss/code,eval_loss/prose --output=cpt.png

One panel per metric key; one line per run, labelled by its directory name (or --labels).
"""

from __future__ import annotations

import argparse
import json
import os

from fmjax import errors, startup


def read(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise errors.UserError(f"{path} does not exist; pass run directories (the --workdir of fmjax.main).")
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, start=1):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise errors.UserError(f"{path}:{n}: not JSON ({e}); fix or remove that line.") from e
  return rows


def plot(workdirs: list[str], keys: list[str], output: str, labels: list[str] | None = None) -> list[str]:
  """Writes the figure; returns the keys drawn (those found in at least one run)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = {label: read(w) for label, w in zip(labels or [os.path.basename(os.path.normpath(w)) for w in workdirs],
                                               workdirs, strict=True)}
  if not keys:
    found = {k for rows in runs.values() for r in rows for k in r}
    keys = ["loss"] + sorted(k for k in found if k.startswith("eval_loss"))
  found = sorted({k for rows in runs.values() for r in rows for k in r})
  if not any(k in found for k in keys):
    raise errors.UserError(f"none of the keys {keys} is in the runs' metrics.jsonl; pick --keys among {found}.")
  keys = [k for k in keys if k in found]
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for label, rows in runs.items():
      points = [(r["step"], r[key]) for r in rows if key in r]
      if points:
        ax.plot(*zip(*points), label=label, marker="o" if len(points) < 30 else None, markersize=3)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(output, dpi=110)
  plt.close(fig)
  return keys


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdirs", nargs="+", help="run directories holding metrics.jsonl")
  p.add_argument("--keys", default="", help="comma-separated metric keys (default: loss and every eval_loss*)")
  p.add_argument("--labels", default="", help="comma-separated legend labels, one per run")
  p.add_argument("--output", default="loss.png")
  args = p.parse_args()
  labels = args.labels.split(",") if args.labels else None
  if labels and len(labels) != len(args.workdirs):
    raise errors.UserError(f"--labels has {len(labels)} names for {len(args.workdirs)} runs.")
  keys = plot(args.workdirs, [k for k in args.keys.split(",") if k], args.output, labels)
  print(f"{args.output}: {', '.join(keys)} for {len(args.workdirs)} run(s)")


if __name__ == "__main__":
  startup.run(main)
