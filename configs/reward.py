"""A reward model: a pre-trained or fine-tuned run with a score head (model.num_labels = 1) trained on preference
pairs with the Bradley–Terry loss (objective `reward`), the first half of RLHF; configs/grpo.py maximises its score.

  python -m fmjax.main --config=configs/reward.py:init_from=/tmp/sft --workdir=/tmp/rm          # every parameter
  python -m fmjax.main --config=configs/reward.py:init_from=/tmp/sft,rank=8 --workdir=/tmp/rm-lora  # LoRA + score
  python -m fmjax.main --config=configs/reward.py:smoke --workdir=/tmp/rm-smoke   # standalone: pre-trains a tiny base

The score head is new (initialised like the other weights); the run's language-model head is not read. Under LoRA
the score head trains with the adapters (PEFT's modules_to_save). `eval_accuracy` is the held-out pairs' accuracy
(chosen scored strictly higher; chance = 0.5). Score a file with tools/score.py; export it with
`tools/convert_hf.py export` as a LlamaForSequenceClassification. Data: `embedded:preference` or your
{"prompt", "chosen", "rejected"} records.

Variants (`:k=v,flag`): smoke, init_from=<workdir>, rank=N (LoRA; 0 = full), data=<source>, margin=F, center=F
(objective.center_rewards_coefficient), steps=N, lr=F, model=<preset>.
"""

from fmjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, init_from="", rank=0, data="embedded:preference", margin=0.0,
                           center=0.0, steps=300, lr=5e-5, model="small")
  c = config_lib.finetune(a.init_from, a.smoke, a.model, a.steps, a.lr, a.data, __file__)
  c.model.num_labels = 1
  config_lib.use_head(c, "reward", reward_margin=a.margin, center_rewards_coefficient=a.center)
  c.lora.rank = a.rank
  c.train.batch_size = 8
  return c
