"""PPO with a critic (objective `ppo`): each rollout samples completions of each prompt with the current params,
scores them with reward functions and/or a reward model, and trains policy and critic on GAE advantages, with a
per-token KL penalty to the starting policy in the reward (InstructGPT, TRL's PPOTrainer).

  python -m fmjax.main --config=configs/ppo.py:init_from=/tmp/sft-sort --workdir=/tmp/ppo          # sort digits
  python -m fmjax.main --config=configs/ppo.py:rlhf,init_from=/tmp/sft,reward_model=/tmp/rm --workdir=/tmp/ppo-rlhf
  python -m fmjax.main --config=configs/ppo.py:smoke --workdir=/tmp/ppo-smoke  # standalone: pre-train, SFT, PPO

Tasks as configs/grpo.py: `sort` (embedded:sort, rewarded by Python) and `rlhf` (embedded:preference prompts, the
reward model of `reward_model=DIR`). The critic is a value head over the policy's trunk, or with `critic=separate` a
network of its own, started from `critic_init=DIR` (with `rlhf,reward_model=DIR` and no critic_init: that reward
model's run).

Variants (`:k=v,flag`): smoke, rlhf, init_from=<workdir>, reward_model=<workdir>, rewards=<spec>, critic=trunk|separate,
critic_init=<workdir>, G=N (completions per prompt), epochs=N, minibatches=N, beta=F (KL), gamma=F, lam=F, vf=F
(value loss weight), rank=N (LoRA), temperature=F, completion=N (max tokens), steps=N, lr=F, model=<preset>.
"""

from fmjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, smoke=False, rlhf=False, init_from="", reward_model="", rewards="", critic="trunk",
                           critic_init="", G=1, epochs=4, minibatches=1, beta=0.05, gamma=1.0, lam=0.95, vf=0.1,
                           rank=0, temperature=1.0, completion=0, steps=200, lr=1e-5, model="small")
  c, o = config_lib.rollout_task(a, "ppo", __file__, "sft.py")
  c.lora.rank = a.rank
  o.num_generations, o.num_ppo_epochs, o.num_mini_batches = a.G, a.epochs, a.minibatches
  o.kl_coef, o.gamma, o.lam, o.vf_coef, o.temperature = a.beta, a.gamma, a.lam, a.vf, a.temperature
  o.critic = a.critic
  o.critic_init = a.critic_init or (a.reward_model if a.rlhf and a.critic == "separate" else "")
  c.train.batch_size = 32
  per_rollout = a.epochs * a.minibatches
  c.checkpoint.every_steps = max(per_rollout, a.steps // 4 // per_rollout * per_rollout)
  if a.smoke:
    c.train.steps, c.optimizer.lr, c.optimizer.warmup_steps = 40, 1e-4, 0
    c.checkpoint.every_steps = 20 // per_rollout * per_rollout or per_rollout
  return c
