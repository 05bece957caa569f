"""`embedded:sort`, a zero-download verifiable task for RL: sort a few digits. Rewards are computed by Python from
the prompt alone, so a policy can be scored on any completion.

Records {"prompt": "Sort: 3 9 1 4\\n", "completion": "1 3 4 9"} (the completion is the answer, for a supervised warm
start; RL reads only the prompt): 3 to 6 digits drawn by a fixed seed, keyed `sort:DIGITS`. The held-out split
holds the digit strings whose hash falls in the last tenth, so no sequence is on both sides.

`embedded:sort_pairs` holds preference pairs on the same prompts (`preference_records`), so a reward model learned
from preferences can be checked against the exact rewards.

Reward functions (objective.rewards; registered in fmjax/rl/rewards.py):
  sort_exact   1.0 when the completion's digits are exactly the sorted digits, else 0.0
  sort_digits  the fraction of the answer's positions that hold the right digit (dense partial credit), minus 0.1
               per extra digit emitted
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from fmjax.errors import UserError

COUNT, LENGTHS, SEED = 6000, (3, 6), 1234


def _digits(text: str) -> list[str]:
  return re.findall(r"\d", text)


def _question(prompt) -> list[str]:
  text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
  line = text.split("Sort:", 1)[-1].split("\n", 1)[0]
  return _digits(line)


def load_records(split: str = "train") -> list[tuple[str, dict]]:
  """(key, record) of side `split` (`train`, `validation`, `all`), in key order."""
  if split not in ("train", "validation", "all"):
    raise UserError(f"split {split!r} is not one of ('train', 'validation', 'all').")
  rng = np.random.default_rng(SEED)
  out = {}
  for _ in range(COUNT):
    digits = [str(d) for d in rng.integers(0, 10, rng.integers(LENGTHS[0], LENGTHS[1] + 1))]
    key = "".join(digits)
    held = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10 == 9
    if split == "all" or (split == "validation") == held:
      out[f"sort:{key}"] = {"prompt": f"Sort: {' '.join(digits)}\n", "completion": " ".join(sorted(digits))}
  return sorted(out.items())


def preference_records(split: str = "train") -> list[tuple[str, dict]]:
  """`embedded:sort_pairs`, preference pairs on the same prompts (for a reward model whose judgement can be checked):
  chosen = the sorted digits, rejected = the same answer with one fault chosen by the key's hash: two unequal
  neighbours swapped, one digit replaced (by the next digit mod 10), or one digit left out."""
  out = []
  for key, record in load_records(split):
    answer = record["completion"].split()
    h = int(hashlib.sha256(key.encode()).hexdigest(), 16)
    wrong = list(answer)
    swaps = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    if h % 3 == 0 and swaps:
      i = swaps[h // 3 % len(swaps)]
      wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    elif h % 3 == 1:
      i = h // 3 % len(answer)
      wrong[i] = str((int(answer[i]) + 1) % 10)
    else:
      del wrong[h // 3 % len(answer)]
    out.append((key, {"prompt": record["prompt"], "chosen": record["completion"], "rejected": " ".join(wrong)}))
  return out


def sort_exact(prompts, completions, **fields) -> list[float]:
  """1.0 where a completion's digits are the prompt's digits sorted."""
  return [float(_digits(c) == sorted(_question(p))) for p, c in zip(prompts, completions)]


def sort_digits(prompts, completions, **fields) -> list[float]:
  """The fraction of right digits at the answer's positions, minus 0.1 per digit beyond its length."""
  out = []
  for p, c in zip(prompts, completions):
    want, got = sorted(_question(p)), _digits(c)
    hits = sum(a == b for a, b in zip(want, got))
    out.append(hits / max(len(want), 1) - 0.1 * max(len(got) - len(want), 0))
  return out

