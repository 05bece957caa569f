"""Continuous pre-training: move a pre-trained model into a new domain (code) while replaying the old one (prose).

  python -m fmjax.main --config=configs/pretrain.py --workdir=/tmp/pt                      # the base
  python -m fmjax.main --config=configs/cpt.py:init_from=/tmp/pt --workdir=/tmp/cpt         # 25% prose replay
  python -m fmjax.main --config=configs/cpt.py:init_from=/tmp/pt,replay=0 --workdir=/tmp/cpt0
  python -m fmjax.main --config=configs/cpt.py:smoke --workdir=/tmp/cpt-smoke   # pre-trains a tiny base first
  python -m fmjax.main --config=configs/cpt.py:smoke,extend --workdir=/tmp/cptx  # context extension, 128 -> 512

The params come from `init_from` (its newest checkpoint); the optimizer starts fresh with the learning rate re-warmed
to a new peak and decayed again. Every eval step logs `eval_loss/code` and `eval_loss/prose`, so forgetting shows.
The tokenizer is the base run's: trained on `embedded:prose` (data.tokenizer_source), whatever the mixture.

Context extension (`extend`, docs/cpt.md): train.seq_len = the base's length × `factor` (the base's: `base_len=`,
else init_from's config.json, else this config's); RoPE adapted to the longer context by `rope=`: `scale` (Llama-3
frequency scaling by `factor` over rope_original_max_len = the base's length; a base already scaled is scaled by
`factor` more), `theta` (a larger base period, θ·factor^(d/(d−2)): NTK-aware) or `none`; the documents joined into
one stream per row (data.text_packing=stream); the held-out NLL logged in `factor` position buckets
(eval.position_buckets), the first of which is the base's own context, from step 0 on.

Variants (`:k=v,flag`): smoke, init_from=<workdir>, replay=<fraction of prose rows>, steps=N, model=<preset>, lr=F,
extend, factor=N, rope=scale|theta|none, base_len=N.
"""

import dataclasses
import json
import os

import ml_collections

from fmjax import config_lib

ROPE = ("scale", "theta", "none")
_ROPE_KEYS = ("rope_theta", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
              "rope_original_max_len")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, smoke=False, init_from="", replay=0.25, steps=1000, model="small", lr=3e-4,
                           extend=False, factor=4, rope="scale", base_len=0)
  if not 0 <= a.replay < 1:
    raise ValueError(f"config variant replay={a.replay} must be in [0, 1): the fraction of prose rows.")
  c = config_lib.base()
  c.model.name = a.model
  c.init_from.workdir = a.init_from
  c.data.mixture = {"code": {"source": "embedded:code", "weight": str(1 - a.replay)},
                    "prose": {"source": "embedded:prose", "weight": str(a.replay)}}
  c.data.tokenizer_source = "embedded:prose"  # the base's tokenizer
  c.train.steps = a.steps
  c.optimizer.lr = a.lr  # the re-warmed peak
  c.optimizer.warmup_steps = max(1, a.steps // 20)
  c.optimizer.schedule = "cosine"
  c.eval.every_steps = max(1, a.steps // 10)
  c.eval.at_start = True  # step 0: the base on both domains, before any CPT
  c.checkpoint.every_steps = max(1, a.steps // 4)
  if a.smoke:
    c.model.name = "smoke" if a.model == "small" else a.model
    c.data.vocab_size = 512
    c.train.steps, c.train.batch_size, c.train.seq_len = 30, 8, 128
    c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 3
    c.log.every_steps, c.eval.every_steps, c.checkpoint.every_steps = 1, 10, 30
    if not a.init_from:
      c.init_from.bootstrap = config_lib.sibling(__file__, "pretrain.py:smoke")
  if a.extend:
    extend(c, a.factor, a.rope, a.base_len, a.init_from)
  elif (a.factor, a.rope, a.base_len) != (4, "scale", 0):
    raise ValueError("config variants factor=, rope= and base_len= belong to `extend`; add it: :extend,factor=...")
  return c


def extend(c: ml_collections.ConfigDict, factor: int, rope: str, base_len: int = 0, init_from: str = "") -> None:
  """Turns CPT config `c` into context extension by `factor` (see the module docstring)."""
  if factor < 2:
    raise ValueError(f"config variant factor={factor} must be >= 2: the new context length over the base's.")
  if rope not in ROPE:
    raise ValueError(f"config variant rope={rope!r} must be one of {ROPE}.")
  base = {}
  if init_from and os.path.isfile(os.path.join(init_from, "config.json")):
    with open(os.path.join(init_from, "config.json")) as f:
      base = json.load(f)
  base_len = base_len or base.get("train", {}).get("seq_len") or c.train.seq_len
  model = {**dataclasses.asdict(config_lib.resolved_model(c)), **base.get("model", {})}
  for key in _ROPE_KEYS:  # continue from the base's RoPE, not the preset's
    c.model[key] = model[key]
  c.train.seq_len = base_len * factor
  if rope == "scale":
    scaled = model["rope_scaling_factor"] > 0  # a base extended before (Llama 3.1): stretch its scaling further
    c.model.rope_scaling_factor = float((model["rope_scaling_factor"] if scaled else 1.0) * factor)
    c.model.rope_original_max_len = int(model["rope_original_max_len"] if scaled else base_len)
  elif rope == "theta":
    d = model["head_dim"]
    c.model.rope_theta = float(model["rope_theta"] * factor ** (d / (d - 2)))
  c.data.text_packing = "stream"  # long documents: one segment across every row
  c.eval.position_buckets = factor  # bucket 0: the positions the base was trained on
