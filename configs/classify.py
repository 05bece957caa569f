"""Sequence classification with labels: a pre-trained run with a score head of model.num_labels classes trained
with cross-entropy on {text | prompt, label} records (objective `classify`).

  python -m fmjax.main --config=configs/classify.py:init_from=/tmp/pt --workdir=/tmp/cls
  python -m fmjax.main --config=configs/classify.py:init_from=/tmp/pt,data=mine.jsonl,labels=3 --workdir=/tmp/cls3
  python -m fmjax.main --config=configs/classify.py:smoke --workdir=/tmp/cls-smoke  # standalone: pre-trains a base

Default data: `embedded:topics`, which of 8 standard-library packages a docstring comes from (fmjax/data/topics.py;
the majority class is about a third of the held-out records). Labels are integer class ids in [0, labels).
`eval_accuracy` is the held-out accuracy. Export with `tools/convert_hf.py export` as a
LlamaForSequenceClassification.

Variants (`:k=v,flag`): smoke, init_from=<workdir>, data=<source>, labels=N, rank=N (LoRA), steps=N, lr=F,
model=<preset>.
"""

from fmjax import config_lib
from fmjax.data import topics


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, init_from="", data="embedded:topics", labels=len(topics.LABELS),
                           rank=0, steps=300, lr=1e-4, model="small")
  c = config_lib.finetune(a.init_from, a.smoke, a.model, a.steps, a.lr, a.data, __file__)
  c.model.num_labels = a.labels
  config_lib.use_head(c, "classify")
  c.lora.rank = a.rank
  c.train.batch_size = 16
  return c
