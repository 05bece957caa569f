"""Generations from a model (an fmjax run directory, pre-trained, fine-tuned or LoRA, or a Hugging Face checkpoint
directory), decoded with a KV cache: greedy by default, sampled with --temperature > 0.

  python tools/generate.py --workdir=/tmp/sft --chat --prompt='What does `json.dumps` do?'
  python tools/generate.py --workdir=/tmp/pt --prompt='The list type' --max_new_tokens=40
  python tools/generate.py --workdir=/tmp/pt --prompt='The list type' --temperature=0.8 --top_p=0.9 --seed=1

--chat wraps each prompt as a user message in the model's chat template and generates the assistant's turn
(stopping at its end marker or EOS). --prompt and --stop may be repeated; all prompts decode as one batch. A --stop
string ends a row and is cut from its text. --step picks a checkpoint of a run directory (default: the newest).
"""

from __future__ import annotations

import argparse

from fmjax import errors, startup


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="fmjax run directory or Hugging Face checkpoint directory")
  p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
  p.add_argument("--chat", action="store_true", help="treat prompts as user messages in the chat template")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens only (0 = all)")
  p.add_argument("--top_p", type=float, default=1.0, help="sample from the smallest set with probability >= p")
  p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
  p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
  p.add_argument("--step", type=int, default=-1, help="checkpoint step of a run directory (-1 = newest)")
  args = p.parse_args()

  import fmjax

  model = fmjax.load(args.workdir, args.step, key="--workdir")
  answers = model.generate(args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, stop=args.stop, seed=args.seed, chat=args.chat)
  for prompt, answer in zip(args.prompt, answers):
    print(f">>> {prompt}\n{answer}\n")


if __name__ == "__main__":
  startup.run(main)
