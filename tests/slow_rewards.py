"""Reward functions that misbehave, for tests/test_rollout_guards.py (named as 'tests.slow_rewards:NAME')."""

from __future__ import annotations

import os
import time


def sleep(prompts: list, completions: list[str], **fields) -> list[float]:
  """Never returns; touches the file $SLOW_REWARD_STARTED first (when set), so a test knows it is blocking."""
  if os.environ.get("SLOW_REWARD_STARTED"):
    open(os.environ["SLOW_REWARD_STARTED"], "w").close()
  while True:
    time.sleep(60)


def missing_file(prompts: list, completions: list[str], **fields) -> list[float]:
  """Reads a file that does not exist, as a user's function with a wrong path would."""
  with open("/nonexistent/fmjax-reward-table.json") as f:
    return [float(len(f.read()))] * len(completions)
