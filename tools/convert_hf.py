"""Hugging Face checkpoints ↔ fmjax run directories: Llama (incl. Llama-3 RoPE scaling), Mistral, Qwen2, Qwen3, and
the mixtures of experts Mixtral and Qwen3-MoE.

  python tools/convert_hf.py import --hf_dir=/models/Qwen3-0.6B --workdir=/tmp/qwen3   # → a run at step 0
  python tools/convert_hf.py export --workdir=/tmp/sft --hf_dir=/tmp/sft-hf            # → from_pretrained(DIR)
  python tools/convert_hf.py export --workdir=/tmp/lora --hf_dir=/tmp/adapter --lora=peft

import reads config.json, the safetensors weights (sharded or not) and tokenizer.json of a local HF directory
(download it first, e.g. `huggingface-cli download Qwen/Qwen3-0.6B --local-dir DIR`) and writes an fmjax run
directory that `--config.init_from.workdir`, `fmjax.load` and the tools accept; the run trains on the model's own
tokenizer (`data.tokenizer_path=WORKDIR/tokenizer.json`). export writes config.json, safetensors shards (5 GB
each; --max_shard_gb) and the tokenizer files; a LoRA run is merged into full weights, or with --lora=peft written
as a PEFT adapter. Both convert one tensor at a time, so memory stays near the largest tensor.
"""

from __future__ import annotations

import argparse

from fmjax import errors, startup


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("command", choices=("import", "export"))
  p.add_argument("--hf_dir", required=True, help="the Hugging Face directory (import: read; export: written)")
  p.add_argument("--workdir", required=True, help="the fmjax run directory (import: written; export: read)")
  p.add_argument("--dtype", default=None,
                 help="parameter dtype: import default float32 (training keeps float32 master weights); export "
                      "default the run's (e.g. bfloat16 halves the files)")
  p.add_argument("--step", type=int, default=-1, help="export: checkpoint step (-1 = newest)")
  p.add_argument("--lora", choices=("merge", "peft"), default="merge", help="export of a LoRA run")
  p.add_argument("--max_shard_gb", type=float, default=5.0, help="export: safetensors shard size")
  args = p.parse_args()

  import os

  if args.command == "import" and os.path.isdir(os.path.join(args.workdir, "checkpoints")):
    raise errors.UserError(f"--workdir={args.workdir} already holds checkpoints; import into a new directory.")
  if args.command == "export" and os.path.exists(os.path.join(args.hf_dir, "config.json")):
    raise errors.UserError(f"--hf_dir={args.hf_dir} already holds a model; export into a new directory.")
  from fmjax.interop import hf

  if args.command == "import":
    target = hf.import_dir(args.hf_dir, args.workdir, args.dtype or "float32")
    print(f"imported {args.hf_dir} into {target}; train from it with --config.init_from.workdir={args.workdir}")
  else:
    print(hf.export_dir(args.workdir, args.hf_dir, args.step, args.dtype, args.lora,
                        int(args.max_shard_gb * 2**30)))


if __name__ == "__main__":
  startup.run(main)
