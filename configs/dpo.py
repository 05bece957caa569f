"""Preference optimization (DPO and its family) of a pre-trained or fine-tuned run on preference pairs.

  python -m fmjax.main --config=configs/dpo.py:init_from=/tmp/sft --workdir=/tmp/dpo            # DPO, β = 0.1
  python -m fmjax.main --config=configs/dpo.py:init_from=/tmp/sft,head=simpo,beta=2.0 --workdir=/tmp/simpo
  python -m fmjax.main --config=configs/dpo.py:init_from=/tmp/sft,rank=8 --workdir=/tmp/dpo-lora   # LoRA DPO
  python -m fmjax.main --config=configs/dpo.py:smoke --workdir=/tmp/dpo-smoke   # standalone: pre-trains a tiny base

Heads: dpo (sigmoid), cdpo (label-smoothed, objective.label_smoothing), ipo, simpo (reference-free, length-
normalised, objective.simpo_gamma), orpo (odds ratio + NLL, reference-free), kto (desirable = chosen, undesirable =
rejected). The reference policy is the starting point: a frozen copy of the init_from params, or under LoRA the
base itself with the adapters off (no second copy), or, with `ref_logps=DIR`, log-probs precomputed by
`tools/precompute_ref_logps.py` (DIR/train.jsonl and DIR/validation.jsonl; no reference in memory). Data:
`embedded:preference` (right vs another function's docstring summary, zero download) or your
{"prompt", "chosen", "rejected"} records.

Variants (`:k=v,flag`): smoke, init_from=<workdir>, head=<name>, beta=F, rank=N (LoRA; 0 = full), data=<source>,
ref_logps=<dir>, steps=N, lr=F, model=<preset>.
"""

import os

from fmjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, init_from="", head="dpo", beta=0.1, rank=0, data="embedded:preference",
                           ref_logps="", steps=200, lr=5e-5, model="small")
  c = config_lib.finetune(a.init_from, a.smoke, a.model, a.steps, a.lr, a.data, __file__)
  if a.ref_logps:  # tools/precompute_ref_logps.py output: no reference model in memory
    c.data.source, c.data.holdout = os.path.join(a.ref_logps, "train.jsonl"), 0.0
    c.eval.sources = {"heldout": os.path.join(a.ref_logps, "validation.jsonl")}
  config_lib.use_head(c, a.head, beta=a.beta)
  if a.ref_logps:
    c.objective.reference = "precomputed"
  c.lora.rank = a.rank
  c.train.batch_size = 8
  return c
