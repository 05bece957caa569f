"""On-policy reinforcement learning in the one train loop: rollouts from the current params, rewards (functions and
a reward model), group advantages; the loss is a head's (fmjax/objectives/)."""
