"""Trainable parameters and optimizer memory: full fine-tuning vs LoRA, from shapes alone (jax.eval_shape).

  python tools/lora_memory.py                                  # 1b and llama3_8b; full, r=8, r=16
  python tools/lora_memory.py --models=llama3_70b --ranks=8,64 --targets='attn/(q|v)_kernel$'

Counts come from the model's real parameter tree (with adapters for LoRA, which are float32); the AdamW state is
optax's (two moments per trained parameter, in its dtype). Base weights are in --param_dtype. The total adds one
gradient per trained parameter to weights and optimizer state; activations come on top and depend on batch and remat.
"""

from __future__ import annotations

import argparse

from fmjax import errors, startup


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="1b,llama3_8b")
  p.add_argument("--ranks", default="8,16")
  p.add_argument("--targets", default="", help="lora.targets regex (default: every attention and MLP projection)")
  p.add_argument("--param_dtype", default="bfloat16", help="dtype of the base weights")
  args = p.parse_args()

  from fmjax.adapters import lora
  from fmjax.train import memory

  targets = args.targets or lora.DEFAULT_TARGETS
  print("| model | method | trainable params | % of model | trained weights | AdamW state | frozen weights | "
        "weights + grads + AdamW |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    for rank in [0] + [int(r) for r in args.ranks.split(",")]:
      adapter = lora.LoraConfig(rank=rank, targets=targets).validate() if rank else None
      m = memory.footprint(name, adapter, args.param_dtype)
      method = "full fine-tuning" if not rank else f"LoRA r={rank}"
      print(f"| {name} | {method} | {m.trainable:,} | {100 * m.trainable / m.total:.3f}% | "
            f"{memory.gib(m.trainable_bytes)} | {memory.gib(m.optimizer_bytes)} | {memory.gib(m.frozen_bytes)} | "
            f"{memory.gib(2 * m.trainable_bytes + m.optimizer_bytes + m.frozen_bytes)} |")


if __name__ == "__main__":
  startup.run(main)
