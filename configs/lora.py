"""LoRA: train rank-r adapters over a frozen pre-trained base (instruction tuning by default; any head).

  python -m fmjax.main --config=configs/lora.py:init_from=/tmp/pt --workdir=/tmp/lora            # r=8, SFT
  python -m fmjax.main --config=configs/lora.py:init_from=/tmp/pt,rank=16,head=lm,data=embedded:code \\
      --workdir=/tmp/lora-cpt                                                   # LoRA continuous pre-training
  python -m fmjax.main --config=configs/lora.py:smoke --workdir=/tmp/lora-smoke  # standalone: pre-trains a tiny base
  python tools/lora.py merge --workdir=/tmp/lora --output=/tmp/merged          # full weights, for init_from
  python tools/lora.py export --workdir=/tmp/lora --output=/tmp/adapter        # PEFT adapter directory

Adapters go on every attention and MLP projection (`lora.targets`, a regex over parameter paths); they start at
B = 0, so step 0 is exactly the base. The base is held once, frozen, and is not written to checkpoints (each start
reads it from init_from again); the optimizer state covers the adapters alone.

Variants (`:k=v,flag`): smoke, init_from=<workdir>, rank=N, alpha=F, dropout=F, head=sft|lm, data=<source spec>,
steps=N, lr=F, model=<preset>.
"""

from fmjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, init_from="", rank=8, alpha=16.0, dropout=0.05, head="sft",
                           data="embedded:instruct", steps=300, lr=1e-3, model="small")
  c = config_lib.finetune(a.init_from, a.smoke, a.model, a.steps, a.lr, a.data, __file__, smoke_lr=1e-2)
  config_lib.use_head(c, a.head)
  c.lora.rank, c.lora.alpha, c.lora.dropout = a.rank, a.alpha, a.dropout
  return c
