"""Trainable parameters and optimizer memory: full fine-tuning vs LoRA, from shapes alone (jax.eval_shape); with
--topology, HBM per chip of the compiled train steps of LoRA stages for TPU slices (libtpu's AOT compiler).

  python tools/lora_memory.py                                  # 1b and llama3_8b; full, r=8, r=16
  python tools/lora_memory.py --models=llama3_70b --ranks=8,64 --targets='attn/(q|v)_kernel$'
  python tools/lora_memory.py --models=llama3_8b --ranks=16 --quant=none,nf4,nf4+double,int8   # QLoRA bases
  python tools/lora_memory.py --models=llama3_8b --ranks=16 --quant=none,nf4,int8 --topology=v5p-8,v5e-8 \
      --stages=sft,dpo,grpo --batch=16 --seq=2048                                 # compiled: HBM per chip

Counts come from the model's real parameter tree (with adapters for LoRA, which are float32); the AdamW state is
optax's (two moments per trained parameter, in its dtype). Base weights are in --param_dtype, or stored as --quant
says (quant.base: nf4 with a float32 scale per 64 weights, or 8-bit scales with +double; int8 with a float32 scale per
output channel; embeddings included). The total adds one gradient per trained parameter to weights and optimizer
state; activations come on top and depend on batch and remat.
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
  p.add_argument("--quant", default="none", help="comma list of base storage: none | nf4 | nf4+double | int8")
  p.add_argument("--topology", default="", help="comma list of TPU slices (v5p-8, v5e-8, ...): compile the stages")
  p.add_argument("--stages", default="sft,dpo,grpo", help="with --topology: LoRA stages (sft, dpo, grpo)")
  p.add_argument("--batch", type=int, default=16, help="with --topology: global batch (sequences; DPO: pairs)")
  p.add_argument("--seq", type=int, default=2048, help="with --topology: tokens per sequence")
  args = p.parse_args()

  from fmjax import quant
  from fmjax.adapters import lora
  from fmjax.train import memory

  schemes = {}
  for name in args.quant.split(","):
    kind = name.split("+")[0]
    if kind not in quant.SCHEMES or name not in (kind, "nf4+double"):
      raise errors.UserError(f"--quant={args.quant!r}: {name!r} is not one of none, nf4, nf4+double, int8.")
    schemes[name] = quant.Scheme(kind, double=name.endswith("+double"))

  targets = args.targets or lora.DEFAULT_TARGETS
  if args.topology:
    compiled(args, schemes, targets)
    return
  print("| model | method | trainable params | % of model | trained weights | AdamW state | frozen weights | "
        "weights + grads + AdamW |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    for rank in [0] + [int(r) for r in args.ranks.split(",")]:
      for q, scheme in schemes.items() if rank else [("none", quant.Scheme())]:
        adapter = lora.LoraConfig(rank=rank, targets=targets).validate() if rank else None
        m = memory.footprint(name, adapter, args.param_dtype, scheme)
        method = "full fine-tuning" if not rank else f"LoRA r={rank}" + ("" if q == "none" else f", {q} base")
        print(f"| {name} | {method} | {m.trainable:,} | {100 * m.trainable / m.total:.3f}% | "
              f"{memory.gib(m.trainable_bytes)} | {memory.gib(m.optimizer_bytes)} | {memory.gib(m.frozen_bytes)} | "
              f"{memory.gib(2 * m.trainable_bytes + m.optimizer_bytes + m.frozen_bytes)} |")


STAGES = {"sft": "configs/lora.py:model={model}", "dpo": "configs/dpo.py:model={model}",
          "grpo": "configs/grpo.py:model={model},beta=0.04"}


def compiled(args, schemes: dict, targets: str) -> None:
  """One row per model, rank, stage, slice and base storage: the frozen base and the peak HBM per chip of the
  compiled train step (bf16 weights and compute, remat full; a GRPO rollout's generation is not in the step)."""
  from fmjax import config_lib, topology
  from fmjax.train import aot, memory

  print("| model | stage | slice | base | frozen base per chip | trained + AdamW per chip | peak HBM per chip | fits |")
  print("|---|---|---|---|---|---|---|---|")
  for model in args.models.split(","):
    for rank in [int(r) for r in args.ranks.split(",")]:
      for stage in args.stages.split(","):
        if stage not in STAGES:
          raise errors.UserError(f"--stages={args.stages!r}: {stage!r} is not one of {sorted(STAGES)}.")
        for name in args.topology.split(","):
          topo = topology.parse(name)
          for q, scheme in schemes.items():
            c = config_lib.load(STAGES[stage].format(model=model))
            c.lora.rank, c.lora.alpha, c.lora.targets = rank, 2.0 * rank, targets
            c.train.batch_size, c.train.seq_len, c.train.grad_accum = args.batch, args.seq, 1
            c.model.update(dtype="bfloat16", param_dtype="bfloat16", remat="full")
            c.quant.update(base=scheme.kind, double=scheme.double)
            r = aot.analyse(c, topo, cost=False)
            m = r.memory.arguments
            base = m.get("frozen LoRA base", 0)
            trained = m.get("params (trained)", 0) + m.get("optimizer state", 0)
            print(f"| {model} r={rank} | {stage} | {name} | {q if q != 'none' else 'bf16'} | {memory.gib(base)} | "
                  f"{memory.gib(trained)} | {memory.gib(r.memory.total)} | {'yes' if r.memory.fits else 'no'} |",
                  flush=True)


if __name__ == "__main__":
  startup.run(main)
