"""Pre-training (next-token prediction) on the embedded prose corpus.

  python -m fmjax.main --config=configs/pretrain.py --workdir=/tmp/pt          # `small` (~34M) on a CPU
  python -m fmjax.main --config=configs/pretrain.py:smoke --workdir=/tmp/smoke  # tiny, ~30 s, every step logged
  python -m fmjax.main --config=configs/pretrain.py:model=1b --workdir=...      # any preset by name
  python -m fmjax.main --config=configs/pretrain.py:data=embedded:code --workdir=...   # any data source

Variants (`:k=v,flag`): smoke, model=<preset>, data=<source spec>, steps=N, batch=N, seq=N.
"""

from fmjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, model="small", data="", steps=0, batch=0, seq=0)
  c = config_lib.base()
  c.model.name = a.model
  if a.smoke:
    c.model.name = "smoke" if a.model == "small" else a.model
    c.data.vocab_size = 512
    c.model.vocab_size = 512  # the smoke tokenizer's, whichever preset (e.g. --config.model.name=small_moe)
    c.train.steps = 40
    c.train.batch_size = 8
    c.train.seq_len = 128
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 5
    c.log.every_steps = 1
    c.checkpoint.every_steps = 20
    c.eval.every_steps = 10
  if a.data:
    c.data.source = a.data
  if a.steps:
    c.train.steps = a.steps
  if a.batch:
    c.train.batch_size = a.batch
  if a.seq:
    c.train.seq_len = a.seq
  return c
