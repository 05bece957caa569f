"""Preference optimization (DPO and its family) of a pre-trained or fine-tuned run on preference pairs.

  python -m fmjax.main --config=configs/dpo.py:init_from=/tmp/sft --workdir=/tmp/dpo            # DPO, β = 0.1
  python -m fmjax.main --config=configs/dpo.py:init_from=/tmp/sft,head=simpo,beta=2.0 --workdir=/tmp/simpo
  python -m fmjax.main --config=configs/dpo.py:init_from=/tmp/sft,rank=8 --workdir=/tmp/dpo-lora   # LoRA DPO
  python -m fmjax.main --config=configs/dpo.py:sort,init_from=/tmp/sft-sort --workdir=/tmp/dpo-sort  # checkable pairs
  python -m fmjax.main --config=configs/dpo.py:smoke,sort --workdir=/tmp/dpo-sort   # standalone: pre-train, SFT, DPO
  python -m fmjax.main --config=configs/dpo.py:smoke --workdir=/tmp/dpo-smoke   # standalone: pre-trains a tiny base

Heads: dpo (sigmoid), cdpo (label-smoothed, objective.label_smoothing), ipo, simpo (reference-free, length-
normalised, objective.simpo_gamma), orpo (odds ratio + NLL, reference-free), kto (desirable = chosen, undesirable =
rejected). The reference policy is the starting point: a frozen copy of the init_from params, or under LoRA the
base itself with the adapters off (no second copy), or, with `ref_logps=DIR`, log-probs precomputed by
`tools/precompute_ref_logps.py` (DIR/train.jsonl and DIR/validation.jsonl; no reference in memory). Data:
`embedded:preference` (right vs another function's docstring summary, zero download), `sort` = `embedded:sort_pairs`
(sorted digits vs the same answer with one fault; its base is an SFT run on `embedded:sort`, as configs/grpo.py's),
or your {"prompt", "chosen", "rejected"} records.

`smoke,sort` is the smoke that learns: a tiny base cannot tell a function's summary from its neighbour's on held-out
modules (`smoke` stays at chance: held-out accuracy 0.48 → 0.52, eval loss 0.693 → 0.710, and lr 1e-3 knocks it to
loss 2.67 at step 4), but it can learn which answer is sorted. Its base, `sft.py:smoke,data=embedded:sort`, is weak
(held-out response loss 1.69), so β = 1: held-out eval loss 0.693 → 0.488, reward accuracy 0.81 after 30 steps
(docs/preference.md).

Variants (`:k=v,flag`): smoke, sort, init_from=<workdir>, head=<name>, beta=F (0 = 0.1; 1.0 for the sort smoke),
rank=N (LoRA; 0 = full), data=<source>, ref_logps=<dir>, steps=N, lr=F, model=<preset>.
"""

import os

from fmjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, sort=False, init_from="", head="dpo", beta=0.0, rank=0, data="",
                           ref_logps="", steps=200, lr=5e-5, model="small")
  sort = a.sort or a.data == "embedded:sort_pairs"
  data = a.data or ("embedded:sort_pairs" if sort else "embedded:preference")
  c = config_lib.finetune(a.init_from, a.smoke, a.model, a.steps, a.lr, data, __file__)
  if sort and not a.init_from:  # the base: pre-training, then SFT on the sort records (a base that can read digits)
    c.init_from.bootstrap = config_lib.sibling(__file__, "sft.py:smoke,data=embedded:sort" if a.smoke
                                               else "sft.py:data=embedded:sort")
  if a.ref_logps:  # tools/precompute_ref_logps.py output: no reference model in memory
    c.data.source, c.data.holdout = os.path.join(a.ref_logps, "train.jsonl"), 0.0
    c.eval.sources = {"heldout": os.path.join(a.ref_logps, "validation.jsonl")}
  # a weak base's margins need a larger β to move within 30 steps (β 0.1: held-out reward accuracy 0.68, 1.0: 0.81)
  config_lib.use_head(c, a.head, beta=a.beta or (1.0 if sort and a.smoke else 0.1))
  if a.ref_logps:
    c.objective.reference = "precomputed"
  c.lora.rank = a.rank
  c.train.batch_size = 8
  if sort and a.smoke:
    c.eval.batches = 8  # the whole held-out split (516 pairs, ~80 a batch), not 2 batches' noise
  return c
