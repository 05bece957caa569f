"""Trains a SentencePiece BPE tokenizer (byte fallback, PAD/UNK/BOS/EOS = 0/1/2/3, chat markers reserved).

  python tools/train_tokenizer.py --input=embedded:prose --vocab_size=8192 --output=/tmp/prose8k.model
  python tools/train_tokenizer.py --input='corpus/*.txt' --vocab_size=32000 --output=tok.model

Use it with --config.data.tokenizer_path=/tmp/prose8k.model (and model.vocab_size = its size padded to 128).
"""

from __future__ import annotations

import argparse
import glob
import time


def read_texts(spec: str) -> list[str]:
  """`embedded:<corpus>` (its train split) or a glob of UTF-8 text files."""
  from fmjax import data

  if spec.startswith("embedded:"):
    return data.documents(spec, "train")
  paths = sorted(glob.glob(spec))
  if not paths:
    raise SystemExit(f"--input={spec!r} matched no files; give a glob of text files or embedded:<corpus>.")
  return [open(p, encoding="utf-8").read() for p in paths]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help="embedded:<corpus> or a glob of .txt files")
  p.add_argument("--vocab_size", type=int, default=8192)
  p.add_argument("--output", required=True, help="path of the .model file to write")
  args = p.parse_args()

  from fmjax.data import sp_tokenizer

  texts = read_texts(args.input)
  t0 = time.perf_counter()
  sp_tokenizer.train(texts, args.vocab_size, args.output)
  tok = sp_tokenizer.SentencePieceTokenizer(args.output)
  chars = sum(len(t) for t in texts)
  tokens = sum(len(tok.encode(t)) for t in texts)
  print(f"{args.output}: {tok.vocab_size} pieces from {len(texts)} documents ({chars:,} characters) in "
        f"{time.perf_counter() - t0:.1f} s; {chars / tokens:.2f} characters per token")


if __name__ == "__main__":
  main()
