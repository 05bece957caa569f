"""Teacher-student distillation: a small student learns a larger frozen teacher's next-token distributions.

  python -m fmjax.main --config=configs/distill.py:teacher=/tmp/pt --workdir=/tmp/student          # forward KL
  python -m fmjax.main --config=configs/distill.py:teacher=/tmp/pt,divergence=jsd,alpha=0 --workdir=/tmp/jsd
  python -m fmjax.main --config=configs/distill.py:teacher=/tmp/pt,alpha=1 --workdir=/tmp/hard   # hard labels only
  python -m fmjax.main --config=configs/distill.py:smoke --workdir=/tmp/distill-smoke  # pre-trains a tiny teacher

The student (default: `small` narrowed to d_model 256, 4 layers, ~4M non-embedding parameters) trains from scratch
on the teacher's tokenizer; `eval_nll` is its held-out hard-label loss, comparable across alpha. The teacher is any
trained run with the same tokenizer (its architecture comes from its config.json); with no teacher, the default
pre-training config first trains one into WORKDIR/teacher. LoRA students: `--config.lora.rank=8` with init_from.

Variants (`:k=v,flag`): smoke, teacher=<workdir>, divergence=forward_kl|reverse_kl|jsd, alpha=F, temperature=F,
top_k=N, data=<source>, steps=N, lr=F.
"""

import os

from fmjax import config_lib, data


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, teacher="", divergence="forward_kl", alpha=0.5, temperature=1.0, top_k=0,
                           data="embedded:prose", steps=300, lr=1e-3)
  c = config_lib.base()
  config_lib.use_head(c, "distill", teacher=a.teacher, divergence=a.divergence, alpha=a.alpha,
                      temperature=a.temperature, top_k=a.top_k)
  c.model.name = "small"
  c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads, c.model.mlp_dim = 256, 4, 4, 2, 768
  c.data.source = a.data
  if a.teacher:
    c.data.tokenizer_path = data.run_tokenizer_file(a.teacher) or os.path.join(a.teacher, "tokenizer.model")
  else:
    c.objective.teacher_bootstrap = config_lib.sibling(__file__, "pretrain.py:smoke" if a.smoke else "pretrain.py")
    c.data.tokenizer_source = "embedded:prose"  # the tokenizer pre-training trains (and caches)
  c.train.steps, c.optimizer.lr = a.steps, a.lr
  c.optimizer.warmup_steps = max(1, a.steps // 20)
  c.eval.every_steps = max(1, a.steps // 10)
  c.checkpoint.every_steps = max(1, a.steps // 4)
  if a.smoke:
    c.model.name = "smoke"
    c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads, c.model.mlp_dim = 32, 1, 2, 1, 96
    c.data.vocab_size = 512
    c.train.steps, c.train.seq_len, c.optimizer.lr, c.optimizer.warmup_steps = 30, 128, 3e-3, 3
    c.log.every_steps, c.eval.every_steps, c.checkpoint.every_steps = 1, 10, 30
  return c
