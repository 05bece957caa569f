"""A LoRA run's adapters: merge them into full weights, or export them in Hugging Face PEFT format.

  python tools/lora.py merge --workdir=/tmp/lora --output=/tmp/merged    # a run directory init_from accepts
  python tools/lora.py export --workdir=/tmp/lora --output=/tmp/adapter  # PEFT adapter_model.safetensors + config

merge writes W + s·A·B for every adapted kernel (in the base's dtype) as a new run directory with the LoRA run's
config (LoRA off) and tokenizer. export writes the adapters under `transformers` module names (`q_proj`, ...,
`down_proj`, `lm_head`), loadable with `peft.PeftModel.from_pretrained(model, DIR)` over the same base weights.
--step picks a checkpoint (default: the newest).
"""

from __future__ import annotations

import argparse

from fmjax import errors, startup


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("command", choices=("merge", "export"))
  p.add_argument("--workdir", required=True, help="the LoRA run directory")
  p.add_argument("--output", required=True, help="merge: a new run directory; export: the adapter directory")
  p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1 = newest)")
  p.add_argument("--base_model", default=None, help="export: base_model_name_or_path to record (e.g. an HF id)")
  args = p.parse_args()

  from fmjax.adapters import lora, peft
  from fmjax.train import weights

  run = weights.load(args.workdir, args.step)
  if not isinstance(run.adapter, lora.LoraConfig):
    raise errors.UserError(f"--workdir={args.workdir} is not a LoRA run (its lora.rank is 0); nothing to "
                           f"{args.command}.")
  if args.command == "merge":
    config = run.config
    config.lora.rank = 0
    target = weights.write_run(args.output, lora.merge(run.params, run.adapter), config, run.step,
                               run.tokenizer_path)
    print(f"merged the adapters of {args.workdir} (step {run.step}) into {target}; start from it with "
          f"--config.init_from.workdir={args.output}")
  else:
    adapters, _ = lora.split(run.params)
    config = peft.save(args.output, adapters, run.adapter, run.model_cfg.num_layers, args.base_model)
    print(f"wrote {args.output}/adapter_model.safetensors and adapter_config.json (r={config['r']}, "
          f"modules {config['target_modules']}) from {args.workdir} step {run.step}")


if __name__ == "__main__":
  startup.run(main)
