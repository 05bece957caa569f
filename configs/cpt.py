"""Continuous pre-training: move a pre-trained model into a new domain (code) while replaying the old one (prose).

  python -m fmjax.main --config=configs/pretrain.py --workdir=/tmp/pt                      # the base
  python -m fmjax.main --config=configs/cpt.py:init_from=/tmp/pt --workdir=/tmp/cpt         # 25% prose replay
  python -m fmjax.main --config=configs/cpt.py:init_from=/tmp/pt,replay=0 --workdir=/tmp/cpt0
  python -m fmjax.main --config=configs/cpt.py:smoke --workdir=/tmp/cpt-smoke   # pre-trains a tiny base first

The params come from `init_from` (its newest checkpoint); the optimizer starts fresh with the learning rate re-warmed
to a new peak and decayed again. Every eval step logs `eval_loss/code` and `eval_loss/prose`, so forgetting shows.
The tokenizer is the base run's: trained on `embedded:prose` (data.tokenizer_source), whatever the mixture.

Variants (`:k=v,flag`): smoke, init_from=<workdir>, replay=<fraction of prose rows>, steps=N, model=<preset>, lr=F.
"""

from fmjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, init_from="", replay=0.25, steps=1000, model="small", lr=3e-4)
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
  return c
