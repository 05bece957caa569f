"""Tokenizes a data source once into ArrayRecord shards on Apache Beam, so large runs skip tokenization
(`data.source=prepared:DIR`).

  python tools/prepare_data.py --source='/data/curated/curated-*.jsonl' --output=/data/prepared --num_workers=8
  python tools/prepare_data.py --source=embedded:code --config=configs/pretrain.py --output=/tmp/code-prepared
  python tools/prepare_data.py --source=sft.jsonl --format=chat --tokenizer_path=tok.model --output=/tmp/sft-prep

The tokenizer is the one the config's run uses (its `data.tokenizer_path`, or the auto-trained one), or
--tokenizer_path. Train with `--config.data.source=prepared:DIR` and the same tokenizer; another tokenizer is an error.
DIR/manifest.json records the inputs (sha256, records, license), the tokenizer and the counts; an input that came
out of tools/curate.py names that manifest as its parent. Options this tool does not know go to Beam unchanged.
"""

from __future__ import annotations

import argparse

from fmjax import errors, startup
from fmjax.curation import runner


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", required=True, help="embedded:NAME, tfds:NAME[/CONFIG][:SPLIT], or a file glob")
  p.add_argument("--output", required=True, help="an empty or new directory")
  p.add_argument("--format", default="auto", help="auto | text | prompt_completion | chat | preference")
  p.add_argument("--field", default="text", help="text field of `text` records")
  p.add_argument("--chat_template", default="", help="chat template of `messages` records (default: the config's)")
  p.add_argument("--config", default="configs/pretrain.py", help="config whose tokenizer to use")
  p.add_argument("--tokenizer_path", default="", help="a sentencepiece .model (overrides the config's tokenizer)")
  p.add_argument("--tfds_data_dir", default="")
  p.add_argument("--records_per_shard", type=int, default=100_000)
  p.add_argument("--license", default="", help="license id of every input (SPDX, e.g. CC-BY-4.0)")
  p.add_argument("--license_map", default="", help='JSON file {"glob": "license id"}; the first match wins')
  runner.add_flags(p)
  args, beam_args = p.parse_known_args()

  from fmjax import config_lib, data
  from fmjax.data import formats, prepared
  from fmjax.governance import manifest

  data_cfg = config_lib.load(args.config).data
  if args.tokenizer_path:
    data_cfg.tokenizer, data_cfg.tokenizer_path = "sentencepiece", args.tokenizer_path
  tokenizer = data.make_tokenizer(data_cfg)
  fmt = args.format
  if fmt == "auto":
    fmt = formats.detect(data.open_source(args.source, "all", tfds_data_dir=args.tfds_data_dir)[0], args.field)
  encode = formats.Encoder(fmt, tokenizer, args.field, chat_template=args.chat_template or data_cfg.chat_template)
  meta = prepared.prepare(args.source, encode, tokenizer, args.output, args.records_per_shard, args.tfds_data_dir,
                          runner_name=args.runner, num_workers=args.num_workers, beam_args=beam_args,
                          license_id=args.license, license_map=manifest.load_license_map(args.license_map))
  print(f"{args.output}: {meta['examples']:,} {fmt} examples, {meta['tokens']:,} tokens in {meta['shards']} shard(s), "
        f"{meta['seconds']:.1f} s ({meta['tokens'] / max(meta['seconds'], 1e-9):,.0f} tokens/s); tokenizer "
        f"{meta['tokenizer']}; manifest.json beside it")
  warning = manifest.unknown_warning(manifest.read(args.output)[0])
  if warning:
    print(warning)


if __name__ == "__main__":
  startup.run(main)
