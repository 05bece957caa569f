"""Benchmarks `fmjax.curation` on a synthetic corpus streamed from a generator (or through the CLI's file path).

  python tools/bench_curate.py                          # 100k docs of ~1.5 KB, checkpoints at 10k/25k/50k/100k
  python tools/bench_curate.py --docs=20000 --profile   # where the time goes
  python tools/bench_curate.py --through_files          # write a temp .jsonl, read and write it as tools/curate.py does

Documents are sentences of words drawn from a Zipf distribution over the vocabulary of Python's own documentation
(`pydoc_data.topics`); 3% are exact copies of a recent document (some with case / whitespace changes), 3% near
copies (3 words replaced, Jaccard of 5-word shingles about 0.9), 2% carry a PII item and 2% are junk. At each
checkpoint it prints documents/s so far, the RSS high-water mark (`ru_maxrss`) and the bytes held by the dedup
indexes: RSS should grow by about the index growth, i.e. memory is flat apart from the compact indexes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import tempfile
import time
from typing import Iterator

import numpy as np

from fmjax import errors

from fmjax import curation

PII_ITEMS = ("jane.roe{i}@example.com", "+44 20 7946 {i:04d}", "(555) 201-{i:04d}", "10.{a}.{b}.7",
             "4111 1111 1111 1111", "AKIA{i:016d}", "fe80::{i:x}:1")


def vocabulary() -> list[str]:
  import pydoc_data.topics

  words = re.findall(r"[a-z]{2,}", " ".join(pydoc_data.topics.topics.values()).lower())
  return sorted(set(words))


def synthetic_docs(n: int, doc_words: int, seed: int = 0) -> Iterator[dict]:
  """`n` records {"text", "id"}: Zipf-sampled prose with planted duplicates, near duplicates, PII and junk."""
  rng = np.random.default_rng(seed)
  vocab = vocabulary()
  p = 1.0 / np.arange(1, len(vocab) + 1)
  p /= p.sum()
  recent: list[np.ndarray] = []  # word ids of recent clean documents, the sources of copies
  batch = 512
  for start in range(0, n, batch):
    idx = rng.choice(len(vocab), size=(batch, doc_words), p=p).astype(np.int32)
    kinds = rng.random(batch)
    for j in range(min(batch, n - start)):
      i = start + j
      kind = kinds[j]
      if kind < 0.03 and recent:  # exact copy of a recent document, maybe re-cased / re-spaced
        text = render([vocab[k] for k in recent[rng.integers(len(recent))].tolist()])
        text = text.upper() if i % 3 == 0 else text.replace(". ", ".  ") if i % 3 == 1 else text
      elif kind < 0.06 and recent:  # near copy: 3 words replaced
        words = [vocab[k] for k in recent[rng.integers(len(recent))].tolist()]
        for k in rng.choice(len(words), 3, replace=False):
          words[k] = "zzz" + vocab[rng.integers(len(vocab))]
        text = render(words)
      elif kind < 0.08:  # a PII item
        words = [vocab[k] for k in idx[j].tolist()]
        words.insert(len(words) // 2, PII_ITEMS[i % len(PII_ITEMS)].format(i=i, a=i % 250, b=(i // 250) % 250))
        text = render(words)
      elif kind < 0.10:  # junk: a number table
        text = "\n".join(" ".join(str(x) for x in rng.integers(0, 10**6, 8)) for _ in range(20))
      else:
        text = render([vocab[k] for k in idx[j].tolist()])
        recent.append(idx[j].copy())
        if len(recent) > 1000:
          recent.pop(0)
      yield {"text": text, "id": i}


class Timed:
  """Wraps an iterator and adds up the time spent producing its items (the generator's, not the pipeline's)."""

  def __init__(self, it: Iterator[dict]):
    self.it, self.seconds = it, 0.0

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    t = time.perf_counter()
    try:
      return next(self.it)
    finally:
      self.seconds += time.perf_counter() - t


def render(words: list[str]) -> str:
  """Sentences of 12 words, capitalised, 5 sentences per paragraph."""
  sentences = [" ".join(words[k:k + 12]) + "." for k in range(0, len(words), 12)]
  sentences = [t[0].upper() + t[1:] for t in sentences]
  return "\n".join(" ".join(sentences[k:k + 5]) for k in range(0, len(sentences), 5))


def rss_mib() -> tuple[float, float]:
  """(peak RSS, current RSS) in MiB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  with open("/proc/self/statm") as f:
    current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  return peak, current


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--docs", type=int, default=100_000)
  p.add_argument("--doc_words", type=int, default=240, help="words per generated document (~8 characters each)")
  p.add_argument("--checkpoints", default="10000,25000,50000,100000", help="doc counts at which to print memory")
  p.add_argument("--through_files", action="store_true", help="stream via a temp .jsonl and the CLI's reader/writer")
  p.add_argument("--profile", action="store_true", help="print the top functions by own time (cProfile)")
  args = p.parse_args()

  checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= args.docs} | {args.docs})
  cfg = curation.CurationConfig()
  report = curation.Report(cfg)
  tmp = None
  gen = Timed(synthetic_docs(args.docs, args.doc_words))
  records: Iterator[dict] = gen
  if args.through_files:
    tmp = tempfile.TemporaryDirectory()
    path = os.path.join(tmp.name, "bench.jsonl")
    with open(path, "w") as f:
      for r in gen:
        f.write(json.dumps(r) + "\n")
    print(f"wrote {path}: {os.path.getsize(path) / 2**20:,.0f} MiB")
    gen = None
    records = curation.read_records([path], "text", "raise", report)  # reading is timed as part of the pipeline
  mean_chars = np.mean([len(r["text"]) for r in synthetic_docs(500, args.doc_words, seed=1)])
  print(f"{args.docs:,} synthetic documents of {args.doc_words} words, {mean_chars:,.0f} characters on average; "
        f"peak RSS before: {rss_mib()[0]:.0f} MiB")

  profiler = None
  if args.profile:
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
  out = open(os.path.join(tmp.name, "curated.jsonl"), "w") if tmp else None
  t0 = time.perf_counter()

  def seconds() -> float:  # pipeline time: the generator's own time is left out
    return time.perf_counter() - t0 - (gen.seconds if gen else 0.0)

  def checkpoint() -> None:
    while checkpoints and report.input_docs >= checkpoints[0]:
      checkpoints.pop(0)
      n, dt = report.input_docs, seconds()
      peak, current = rss_mib()
      index = sum(report.index_bytes.values()) / 2**20
      print(f"  {n:>7,} docs  {dt:6.1f} s  {n / dt:6,.0f} docs/s  peak RSS {peak:6.1f} MiB  RSS {current:6.1f} MiB  "
            f"dedup indexes {index:5.1f} MiB  RSS - indexes {current - index:5.1f} MiB  (kept {report.kept_docs:,})",
            flush=True)

  def with_checkpoints(it: Iterator[dict]) -> Iterator[dict]:
    for r in it:
      checkpoint()  # before the next record is pulled, so exactly the checkpoint's count has been processed
      yield r

  for kept in curation.curate(with_checkpoints(records), cfg, report):
    if out is not None:
      out.write(json.dumps(kept, ensure_ascii=False) + "\n")
  checkpoint()
  dt = seconds()
  if profiler is not None:
    import pstats

    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
  r = report.to_dict()
  dropped = {k: v for k, v in r["dropped"].items() if v}
  found_pii = {k: v for k, v in r["pii_replacements"].items() if v}
  print(f"done: {r['input_docs']:,} docs in {dt:.1f} s = {r['input_docs'] / dt:,.0f} docs/s on one core"
        f"{'' if gen is None else f' (the generator, {gen.seconds:.1f} s, not counted)'}; kept {r['kept_docs']:,}, "
        f"dropped {json.dumps(dropped)}, PII {json.dumps(found_pii)}; peak RSS {rss_mib()[0]:.0f} MiB")
  if out is not None:
    out.close()
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  errors.run(main)
