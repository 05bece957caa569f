"""A config file outside configs/ for the heads of tests/plugin_heads.py (registered by importing it):

  python -m fmjax.main --config=tests/plugin_config.py:head=smoothed_lm --workdir=/tmp/s --config.objective.smoothing=0.2
  python -m fmjax.main --config=tests/plugin_config.py:head=reinforce_value --workdir=/tmp/r

A tiny model trained from its initialisation: pre-training text for `smoothed_lm`, the embedded sort task's prompts
for `reinforce_value`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import plugin_heads  # noqa: E402,F401  (registers the heads)

from fmjax import config_lib  # noqa: E402


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, head="smoothed_lm", steps=6)
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "pretrain.py:smoke"))
  config_lib.use_head(c, a.head)
  c.train.steps, c.optimizer.warmup_steps, c.optimizer.lr = a.steps, 0, 1e-3
  c.eval.every_steps, c.checkpoint.every_steps, c.checkpoint.async_save = 0, 3, False
  if c.objective.name == "reinforce_value":
    c.data.source, c.data.tokenizer_source = "embedded:sort", "embedded:prose"
    c.train.batch_size, c.train.seq_len = 16, 48  # 4 prompts x 4 completions, of up to 8 tokens each
  return c
