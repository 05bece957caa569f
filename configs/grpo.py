"""On-policy RL in the one loop (objective `grpo`): each step samples G completions of each prompt with the current
params, scores them with reward functions and/or a reward model, and trains on their group advantages. Loss types:
grpo, dr_grpo, dapo; `scale=rloo` gives RLOO's leave-one-out baseline.

  python -m fmjax.main --config=configs/grpo.py:init_from=/tmp/sft-sort --workdir=/tmp/grpo         # sort digits
  python -m fmjax.main --config=configs/grpo.py:init_from=/tmp/sft-sort,loss=dr_grpo,scale=none --workdir=/tmp/dr
  python -m fmjax.main --config=configs/grpo.py:rlhf,init_from=/tmp/sft,reward_model=/tmp/rm --workdir=/tmp/rlhf
  python -m fmjax.main --config=configs/grpo.py:smoke --workdir=/tmp/grpo-smoke  # standalone: pre-train, SFT, RL

Tasks: `sort` (embedded:sort, rewarded by Python: sort_digits, sort_exact; the base is an SFT run on the same
records, `configs/sft.py:data=embedded:sort`), `rlhf` (the prompts of embedded:preference, rewarded by the reward
model of `reward_model=DIR`, configs/reward.py). train.batch_size rows = prompts × G per rollout.

GSPO (`gspo`): sequence-level importance ratios, the per-sequence normaliser and GSPO's tight clip (3e-4, 4e-4).

Variants (`:k=v,flag`): smoke, rlhf, gspo, init_from=<workdir>, reward_model=<workdir>, rewards=<spec>, loss=<type>,
scale=group|batch|none|rloo, G=N, mu=N (optimizer steps per rollout), beta=F (KL), rank=N (LoRA), temperature=F,
completion=N (max tokens), steps=N, lr=F, model=<preset>.
"""

from fmjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, rlhf=False, gspo=False, init_from="", reward_model="", rewards="",
                           loss="",
                           scale="group", G=8, mu=1, beta=0.0, rank=0, temperature=1.0, completion=0, steps=200,
                           lr=1e-5, model="small")
  c, o = config_lib.rollout_task(a, "grpo", __file__, "sft.py")
  c.lora.rank = a.rank
  o.loss_type, o.scale_rewards, o.kl_coef = a.loss or ("grpo" if a.gspo else "dapo"), a.scale, a.beta
  if a.gspo:
    o.importance_sampling_level, o.epsilon_low, o.epsilon_high = "sequence", 3e-4, 4e-4
  o.num_generations, o.num_iterations, o.temperature = a.G, a.mu, a.temperature
  c.train.batch_size = 4 * a.G  # 4 prompts per rollout
  c.checkpoint.every_steps = max(a.mu, a.steps // 4 // a.mu * a.mu)
  if a.smoke:
    c.train.steps, c.optimizer.lr, c.optimizer.warmup_steps = 20, 3e-4, 0
    c.checkpoint.every_steps = 10 // a.mu * a.mu or a.mu
  return c
