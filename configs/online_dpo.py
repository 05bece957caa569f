"""Online DPO in the one loop (objective `online_dpo`, TRL's OnlineDPOTrainer): each step samples two completions of
each prompt with the current params, a judge (reward functions and/or a reward model) picks the better as chosen,
and the pair trains with the DPO (sigmoid) or IPO loss against the starting policy.

  python -m fmjax.main --config=configs/online_dpo.py:init_from=/tmp/sft-sort --workdir=/tmp/odpo      # sort digits
  python -m fmjax.main --config=configs/online_dpo.py:init_from=/tmp/sft-sort,loss=ipo --workdir=/tmp/oipo
  python -m fmjax.main --config=configs/online_dpo.py:rlhf,init_from=/tmp/sft,reward_model=/tmp/rm --workdir=/tmp/r
  python -m fmjax.main --config=configs/online_dpo.py:smoke --workdir=/tmp/odpo-smoke  # standalone: pre-train, SFT, RL

Tasks: `sort` (embedded:sort, judged by Python: sort_digits; the base is an SFT run on the same records,
`configs/sft.py:data=embedded:sort`), `rlhf` (the prompts of embedded:preference, judged by the reward model of
`reward_model=DIR`, configs/reward.py). train.batch_size rows = prompts × 2 per rollout.

Variants (`:k=v,flag`): smoke, rlhf, init_from=<workdir>, reward_model=<workdir>, rewards=<spec>, loss=sigmoid|ipo,
beta=F, rank=N (LoRA), temperature=F, completion=N (max tokens), prompts=N (per step), steps=N, lr=F,
model=<preset>.
"""

from fmjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, rlhf=False, init_from="", reward_model="", rewards="", loss="sigmoid",
                           beta=0.1, rank=0, temperature=0.9, completion=0, prompts=16, steps=200, lr=5e-6,
                           model="small")
  c, o = config_lib.rollout_task(a, "online_dpo", __file__, "sft.py")
  c.lora.rank = a.rank
  o.loss_type, o.beta, o.temperature = a.loss, a.beta, a.temperature
  c.train.batch_size = 2 * a.prompts
  c.checkpoint.every_steps = max(1, a.steps // 4)
  if a.smoke:
    c.train.steps, c.optimizer.lr, c.optimizer.warmup_steps = 20, 1e-3, 0
    c.checkpoint.every_steps = 10
  return c
