"""Greedy generations from a run directory (a pre-trained, fine-tuned or LoRA run), as plain text or chat.

  python tools/generate.py --workdir=/tmp/sft --chat --prompt='What does `json.dumps` do?'
  python tools/generate.py --workdir=/tmp/pt --prompt='The list type' --max_new_tokens=40

--chat wraps each prompt as a user message in the run's chat template and generates the assistant's turn (stopping
at its end marker or EOS). --prompt may be repeated.
"""

from __future__ import annotations

import argparse


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", action="append", required=True)
  p.add_argument("--chat", action="store_true", help="treat prompts as user messages in the chat template")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--step", type=int, default=-1)
  args = p.parse_args()

  for prompt, answer in generate(args.workdir, args.prompt, args.chat, args.max_new_tokens, args.step):
    print(f">>> {prompt}\n{answer}\n")


def generate(workdir: str, prompts: list[str], chat: bool, max_new_tokens: int, step: int = -1):
  """[(prompt, generated text)] for run `workdir`."""
  import numpy as np

  from fmjax import sample
  from fmjax.data.chat import ChatTemplate
  from fmjax.model import Transformer
  from fmjax.train import weights

  run = weights.load(workdir, step)
  tokenizer = run.tokenizer()
  template = ChatTemplate(run.config.data.chat_template)
  texts = [template.prompt([{"role": "user", "content": q}]) if chat else q for q in prompts]
  ids = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(t)]).astype(np.int32) for t in texts]
  stops = [tokenizer.eos_id]
  end = tokenizer.encode(template.footer)
  if chat and len(end) == 1:
    stops.append(int(end[0]))
  model = Transformer(run.model_cfg, run.lora_cfg)
  apply = lambda params, *batch: model.apply({"params": params}, *batch)  # noqa: E731
  outs = sample.greedy(apply, run.params, ids, max_new_tokens, stops)
  return [(q, tokenizer.decode([i for i in o if i not in stops])) for q, o in zip(prompts, outs)]


if __name__ == "__main__":
  main()
