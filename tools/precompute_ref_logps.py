"""Reference log-probs of preference pairs, computed once, so DPO-family training needs no reference in memory.

  python tools/precompute_ref_logps.py --workdir=/tmp/sft --source=embedded:preference --output=/tmp/ref
  python -m fmjax.main --config=configs/dpo.py:init_from=/tmp/sft,ref_logps=/tmp/ref --workdir=/tmp/dpo

For each split (--splits, default train,validation) it writes OUTPUT/<split>.jsonl: every pair of the source that
fits in --max_len tokens, with its fields and `ref_chosen_logps` / `ref_rejected_logps` (TRL's column names): the
summed log-probabilities of each response under the model of run --workdir (the reference: usually the run that
DPO starts from), with that run's tokenizer and chat template. A file source's `train` / `validation` are its
data.holdout split (--holdout); `all` reads it whole.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from fmjax import errors, startup


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="run directory of the reference model")
  p.add_argument("--source", required=True, help="preference data: embedded:preference, a .jsonl glob, ...")
  p.add_argument("--output", required=True, help="directory for <split>.jsonl")
  p.add_argument("--splits", default="train,validation")
  p.add_argument("--holdout", type=float, default=0.1)
  p.add_argument("--max_len", type=int, default=256, help="pairs longer than this (tokens) are left out")
  p.add_argument("--batch", type=int, default=16, help="pairs per forward pass")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from fmjax import data
  from fmjax.data import formats
  from fmjax.model import Transformer
  from fmjax.objectives.lm import token_nll
  from fmjax.train import weights

  run = weights.load(args.workdir)
  tokenizer = run.tokenizer()
  encode = formats.Encoder("preference", tokenizer, max_len=args.max_len, overlong="drop",
                           chat_template=run.config.data.chat_template)
  model = Transformer(run.model_cfg, run.adapter)

  @jax.jit
  def logps(params, tokens, targets, mask, columns):
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits = model.apply({"params": params}, tokens, jnp.ones_like(tokens), pos, adapter_inputs=columns or None)
    return jnp.sum(-token_nll(logits, targets)[0] * mask, axis=-1)

  os.makedirs(args.output, exist_ok=True)
  for split in args.splits.split(","):
    records = data.open_source(args.source, split, args.holdout)
    t0, kept, path = time.perf_counter(), 0, os.path.join(args.output, f"{split}.jsonl")
    with open(path + ".tmp", "w") as out:
      for start in range(0, len(records), args.batch):
        chunk = [records[i] for i in range(start, min(start + args.batch, len(records)))]
        pairs = [(r, e) for r in chunk if (e := encode(r)) is not None]
        if not pairs:
          continue
        width = -(-max(len(e[s + "tokens"]) for _, e in pairs for s in ("chosen_", "rejected_")) // 64) * 64
        rows = {k: np.zeros((2 * len(pairs), width), np.float32 if k == "loss_mask" else np.int32)
                for k in ("tokens", "targets", "loss_mask")}
        lengths = np.zeros(2 * len(pairs), np.int32)
        for i, (_, e) in enumerate(pairs):
          for j, side in enumerate(("chosen_", "rejected_")):
            lengths[2 * i + j] = len(e[side + "tokens"])
            for k in rows:
              rows[k][2 * i + j, :len(e[side + k])] = e[side + k]
        columns = {}  # a parameterisation's per-token columns (a REFT reference edits each row's prompt)
        if run.adapter is not None and run.adapter.columns:
          per_row = [run.adapter.batch_columns({"segment_ids": (np.arange(width) < n).astype(np.int32), "loss_mask": m})
                     for n, m in zip(lengths, rows["loss_mask"])]
          columns = {k: np.stack([c[k] for c in per_row]) for k in run.adapter.columns}
        values = np.asarray(logps(run.params, rows["tokens"], rows["targets"], rows["loss_mask"], columns))
        for i, (record, _) in enumerate(pairs):
          fields = {k: v for k, v in record.items() if k != "_where"}
          fields["ref_chosen_logps"], fields["ref_rejected_logps"] = float(values[2 * i]), float(values[2 * i + 1])
          out.write(json.dumps(fields, ensure_ascii=False) + "\n")
        kept += len(pairs)
    os.replace(path + ".tmp", path)
    print(f"{path}: {kept:,} of {len(records):,} pairs in {time.perf_counter() - t0:.1f} s (reference: "
          f"{args.workdir} step {run.step})")


if __name__ == "__main__":
  startup.run(main)
