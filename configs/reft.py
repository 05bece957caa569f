"""REFT: train low-rank interventions on the residual stream of a frozen pre-trained base (instruction tuning by
default; any head).

  python -m fmjax.main --config=configs/reft.py:init_from=/tmp/pt --workdir=/tmp/reft        # LoReFT r=4, f5+l5
  python -m fmjax.main --config=configs/reft.py:init_from=/tmp/pt,method=direft,positions=l7 \\
      --config.reft.layers=2,4 --workdir=/tmp/direft                       # DiReFT on blocks 2 and 4, last 7
  python -m fmjax.main --config=configs/reft.py:smoke --workdir=/tmp/reft-smoke  # standalone: pre-trains a tiny base

Each chosen block's output is edited at the first and last k tokens of every example's prompt (`reft.positions`,
pyreft's 'f5+l5'); the edit starts at zero (W = R, b = 0), so step 0 is exactly the base. The base is held once,
frozen, and is not written to checkpoints; the optimizer state covers the interventions alone. A DPO run with REFT
uses the base (REFT off) as its reference.

Variants (`:k=v,flag`): smoke, init_from=<workdir>, rank=N, method=loreft|noreft|direft, layers=all|<i>,
positions=f<k>+l<k>, share, dropout=F, head=sft|lm|dpo|..., data=<source spec>, steps=N, lr=F, model=<preset>.
"""

from fmjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, init_from="", rank=4, method="loreft", layers="all", positions="f5+l5",
                           share=False, dropout=0.0, head="sft", data="embedded:instruct", steps=300, lr=4e-3,
                           model="small")
  c = config_lib.finetune(a.init_from, a.smoke, a.model, a.steps, a.lr, a.data, __file__, smoke_lr=1e-2)
  config_lib.use_head(c, a.head)
  c.reft.rank, c.reft.method, c.reft.layers, c.reft.positions = a.rank, a.method, a.layers, a.positions
  c.reft.share_weights, c.reft.dropout = a.share, a.dropout
  return c
