"""Compares the RL and preference algorithms on one task from one base, with one sample budget: each trains from
`--base` (an SFT run on embedded:sort), then its policy is scored greedy on the held-out prompts; a table (markdown
and JSON) and a plot of the sampled reward and KL per step come out in --out.

  python tools/compare_rl.py --base=/tmp/rl/sft150 --out=/tmp/rl/compare --rollouts=150
  python tools/compare_rl.py --base=/tmp/rl/sft150 --out=/tmp/rl/compare-rm --rollouts=150 --reward_model=/tmp/rl/rm

Every on-policy algorithm samples --completions per rollout (default 128) for --rollouts rollouts: GRPO, DAPO,
GSPO and RLOO as 16 prompts × 8, PPO as 128 prompts × 1 in 2 minibatches × 2 epochs, online DPO as 64 prompts × 2.
Offline DPO trains as many steps on embedded:sort_pairs (8 pairs a step). With --reward_model the on-policy runs
optimise that reward model alone (`rewards=model,sort_digits:0`: the true reward is logged, not trained on), and the
plot shows the reward model's score against the true reward: over-optimisation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (config and variant, extra flags, per-rollout optimizer steps, the KL metric it logs: a token mean, or
# (ppo, online_dpo: TRL's objective/kl) a sum over the completion, which the table divides by the mean length)
ALGORITHMS = {
    "GRPO": ("grpo.py:smoke,loss=grpo,beta=0.02", {}, 1, "kl"),
    "DAPO": ("grpo.py:smoke,loss=dapo,beta=0.02", {}, 1, "kl"),
    "GSPO": ("grpo.py:smoke,gspo,beta=0.02", {}, 1, "kl"),
    "RLOO": ("grpo.py:smoke,loss=grpo,scale=rloo,beta=0.02", {}, 1, "kl"),
    "PPO": ("ppo.py:smoke,beta=0.02,epochs=2,minibatches=2", {}, 4, "objective/kl"),
    "online DPO": ("online_dpo.py:smoke", {}, 1, "objective/kl"),
    "DPO (offline)": ("dpo.py:smoke,sort", {}, 1, ""),
}
PER_COMPLETION_KL = ("PPO", "online DPO")


def flags(name: str, base: str, rollouts: int, completions: int, reward_model: str) -> list[str]:
  spec, extra, per_rollout, _ = ALGORITHMS[name]
  variant = f"{spec},init_from={base}"
  out = {"train.steps": rollouts * per_rollout, "checkpoint.every_steps": rollouts * per_rollout}
  if name.startswith("DPO"):
    out["eval.every_steps"] = max(1, rollouts // 10)
  elif name == "PPO":
    out["train.batch_size"] = completions // 2
  elif name == "online DPO":
    out["train.batch_size"] = completions
  else:
    out["train.batch_size"] = completions
  if reward_model and not name.startswith("DPO"):
    out.update({"objective.rewards": "model,sort_digits:0", "objective.reward_model": reward_model})
  return [f"--config={REPO}/configs/{variant}"] + [f"--config.{k}={v}" for k, v in {**out, **extra}.items()]


def train(name: str, workdir: str, args: argparse.Namespace) -> float:
  """Trains one algorithm into `workdir` (kept if it finished); its wall seconds."""
  if os.path.isfile(os.path.join(workdir, "done.json")):
    with open(os.path.join(workdir, "done.json")) as f:
      return json.load(f)["seconds"]
  t0 = time.perf_counter()
  cmd = [sys.executable, "-m", "fmjax.main", *flags(name, args.base, args.rollouts, args.completions,
                                                    args.reward_model), f"--workdir={workdir}"]
  print(" ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=REPO)
  seconds = time.perf_counter() - t0
  with open(os.path.join(workdir, "done.json"), "w") as f:
    json.dump({"seconds": seconds, "command": cmd}, f)
  return seconds


def score(model: str, out: str, args: argparse.Namespace) -> dict:
  """Held-out greedy rewards of `model` (tools/evaluate.py rewards)."""
  path = out + ".eval.json"
  if not os.path.isfile(path):
    rewards = "sort_exact,sort_digits" + (",model:0" if args.reward_model else "")
    cmd = [sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "rewards", f"--model={model}",
           "--data=embedded:sort", f"--rewards={rewards}", "--max_new_tokens=16", f"--output={path}"]
    if args.reward_model:
      cmd.append(f"--reward_model={args.reward_model}")
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
  with open(path) as f:
    return json.load(f)["means"]


def curves(name: str, workdir: str) -> dict[str, list[float]]:
  """Per rollout: the sampled reward, the reward functions' means, and the KL per completion token (each
  algorithm's own estimate: grpo's k3, ppo's and online DPO's log-ratio, whose per-completion sums are divided by the
  rollout's mean length)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  key = ALGORITHMS[name][3]
  out: dict[str, list[float]] = {"reward": [], "kl": [], "rewards/model/mean": [], "rewards/sort_digits/mean": []}
  for r in rows:
    if "reward" not in r:
      continue
    for k in ("reward", "rewards/model/mean", "rewards/sort_digits/mean"):
      if k in r:
        out[k].append(r[k])
    if key in r:
      out["kl"].append(r[key] / r["completions/mean_length"] if name in PER_COMPLETION_KL else r[key])
  return out


def summary(values: list[float], n: int = 5) -> str:
  """'first → last': means over the first and the last n values."""
  if not values:
    return "—"
  return f"{sum(values[:n]) / len(values[:n]):.3f} → {sum(values[-n:]) / len(values[-n:]):.3f}"


def _smooth(values: list[float], n: int = 10) -> list[float]:
  return [sum(values[max(0, i - n + 1):i + 1]) / len(values[max(0, i - n + 1):i + 1]) for i in range(len(values))]


def draw(series: dict[str, dict[str, list[float]]], completions: int, reward_model: bool, output: str) -> None:
  """Sampled reward and KL per token against completions sampled; with a reward model, its score and the true reward
  against completions sampled, and the true reward against the reward model's score (over-optimisation)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = ([("rewards/model/mean", "reward-model score (sampled)"), ("rewards/sort_digits/mean", "true reward "
             "(sort_digits, sampled)"), ("over", "true reward vs reward-model score")] if reward_model else
            [("reward", "sampled reward (sort_digits)"), ("kl", "KL to the reference per token")])
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
  for ax, (key, title) in zip(axes[0], panels):
    for name, s in series.items():
      if key == "over":  # each a moving mean over 10 rollouts: the sampled means are noisy
        ax.plot(_smooth(s["rewards/model/mean"]), _smooth(s["rewards/sort_digits/mean"]), label=name, alpha=0.8)
        ax.set_xlabel("reward-model score (mean of 10 rollouts)")
      elif s[key]:
        x = [completions * (i + 1) for i in range(len(s[key]))]
        ax.plot(x, s[key], label=name, alpha=0.8)
        ax.set_xlabel("completions sampled")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(output, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--base", required=True, help="the SFT run every algorithm starts from")
  parser.add_argument("--out", required=True, help="a directory: one run per algorithm, the table and the plot")
  parser.add_argument("--rollouts", type=int, default=150, help="rollouts (optimizer steps for offline DPO)")
  parser.add_argument("--completions", type=int, default=128, help="completions sampled per rollout")
  parser.add_argument("--reward_model", default="", help="optimise this reward model instead of sort_digits")
  parser.add_argument("--only", default="", help="comma-separated algorithm names (default: all)")
  args = parser.parse_args()
  names = [n.strip() for n in args.only.split(",")] if args.only else list(ALGORITHMS)
  if args.reward_model:
    names = [n for n in names if not n.startswith("DPO")]
  os.makedirs(args.out, exist_ok=True)
  dirs = {n: os.path.join(args.out, n.lower().replace(" ", "_").replace("(", "").replace(")", "")) for n in names}
  results = {"base": {"eval": score(args.base, os.path.join(args.out, "base"), args)}}
  series: dict[str, dict[str, list[float]]] = {}
  for name in names:
    seconds = train(name, dirs[name], args)
    results[name] = {"seconds": seconds, "eval": score(dirs[name], dirs[name], args)}
    if name.startswith("DPO"):
      with open(os.path.join(dirs[name], "metrics.jsonl")) as f:
        evals = [r["eval_rewards/accuracy"] for r in map(json.loads, f) if "eval_rewards/accuracy" in r]
      results[name]["eval_accuracy"] = evals[-1]
      continue
    s = series[name] = curves(name, dirs[name])
    results[name].update(reward=summary(s["reward"]), kl=summary(s["kl"]),
                         truth=summary(s["rewards/sort_digits/mean"]), model=summary(s["rewards/model/mean"]))
  head = "| algorithm | held-out `sort_digits` (greedy) | `sort_exact` |" + (
      " reward-model score (greedy) | RM score, sampled, first → last 5 | `sort_digits`, sampled, first → last 5 |"
      if args.reward_model else " sampled reward, first → last 5 rollouts | KL per token, first → last 5 |"
  ) + " wall time |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for name, r in results.items():
    e = r["eval"]
    cells = [name, f"{e['sort_digits']:.3f}", f"{100 * e['sort_exact']:.1f}%"]
    if args.reward_model:
      cells += [f"{e.get('model', float('nan')):.2f}", r.get("model", "—"), r.get("truth", "—")]
    elif name.startswith("DPO"):
      cells += [f"held-out pair accuracy {r['eval_accuracy']:.3f}", "—"]
    else:
      cells += [r.get("reward", "—"), r.get("kl", "—")]
    cells.append(f"{r['seconds']:.0f} s" if "seconds" in r else "—")
    lines.append("| " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "compare.json"), "w") as f:
    json.dump(results, f, indent=2)
  draw(series, args.completions, bool(args.reward_model), os.path.join(args.out, "compare.png"))
  print(f"wrote {args.out}/table.md, compare.json, compare.png")

if __name__ == "__main__":
  main()
