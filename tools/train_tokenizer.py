"""Trains a SentencePiece BPE tokenizer (byte fallback, PAD/UNK/BOS/EOS = 0/1/2/3, chat markers reserved).

  python tools/train_tokenizer.py --input=embedded:prose --vocab_size=8192 --output=/tmp/prose8k.model
  python tools/train_tokenizer.py --input='corpus/*.txt' --vocab_size=32000 --output=tok.model
  python tools/train_tokenizer.py --input='data/*.jsonl' --field=body --vocab_size=32000 --output=tok.model

--input is any data source (see fmjax/data/sources.py); its train split is used, as for auto-trained tokenizers
(--holdout: the fraction a run holds out, its data.holdout; 0 reads every record, e.g. of a single .txt file).

Use it with --config.data.tokenizer_path=/tmp/prose8k.model (and model.vocab_size = its size padded to 128).
"""

from __future__ import annotations

import argparse
import time

from fmjax import errors, startup


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help="a data source: embedded:NAME, tfds:NAME, or a file glob")
  p.add_argument("--field", default="text", help="text field of .jsonl / .parquet / tfds records")
  p.add_argument("--max_chars", type=int, default=0, help="read at most this many characters (0 = all)")
  p.add_argument("--holdout", type=float, default=0.1,
                 help="fraction of records held out, as the run's data.holdout (0 = train on every record)")
  p.add_argument("--vocab_size", type=int, default=8192)
  p.add_argument("--output", required=True, help="path of the .model file to write")
  args = p.parse_args()

  from fmjax import data
  from fmjax.data import sp_tokenizer

  texts = data.documents(args.input, "train", args.field, args.max_chars, args.holdout, "--holdout")
  if not any(texts):
    raise data.no_text_error(args.input, args.field, "--field")
  t0 = time.perf_counter()
  sp_tokenizer.train(texts, args.vocab_size, args.output)
  tok = sp_tokenizer.SentencePieceTokenizer(args.output)
  chars = sum(len(t) for t in texts)
  tokens = sum(len(tok.encode(t)) for t in texts)
  print(f"{args.output}: {tok.vocab_size} pieces from {len(texts)} documents ({chars:,} characters) in "
        f"{time.perf_counter() - t0:.1f} s; {chars / tokens:.2f} characters per token")


if __name__ == "__main__":
  startup.run(main)
