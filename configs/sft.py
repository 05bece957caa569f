"""Supervised / instruction fine-tuning of a pre-trained run on the embedded instruction data (or your own).

  python -m fmjax.main --config=configs/sft.py:init_from=/tmp/pt --workdir=/tmp/sft         # every parameter trains
  python -m fmjax.main --config=configs/sft.py:smoke --workdir=/tmp/sft-smoke   # standalone: pre-trains a tiny base
  python -m fmjax.main --config=configs/sft.py:init_from=/tmp/pt,data=my_chats.jsonl --workdir=/tmp/sft-mine

Loss on the responses only (completions, assistant turns and their end marker, EOS); `eval_loss` is the held-out
response loss. Records are prompt/completion or chat `messages` (detected per source); a multi-task mixture is a
`data.mixture` of such sources with weights. The tokenizer is the base run's (its `tokenizer.model`, or an import's `tokenizer.json`). With no
`init_from`, the default pre-training run trains a base into WORKDIR/base first.

Variants (`:k=v,flag`): smoke, init_from=<workdir>, data=<source spec>, steps=N, lr=F, model=<preset>.
"""

from fmjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, init_from="", data="embedded:instruct", steps=300, lr=1e-4,
                           model="small")
  c = config_lib.finetune(a.init_from, a.smoke, a.model, a.steps, a.lr, a.data, __file__, smoke_lr=3e-3)
  config_lib.use_head(c, "sft")
  return c
