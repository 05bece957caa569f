"""Benchmarks curation on Apache Beam's direct runner: a synthetic corpus with 1 and with N worker processes.

  python tools/bench_curate.py                        # 100k docs of ~1.9 KB in 8 .jsonl files; 1 and 2 workers
  python tools/bench_curate.py --docs=20000 --workers=1,2,4 --files=16

Documents are sentences of words drawn from a Zipf distribution over the vocabulary of Python's own documentation
(`pydoc_data.topics`); 3% are exact copies of a recent document (some with case / whitespace changes), 3% near
copies (3 words replaced, Jaccard of 5-word shingles about 0.9), 2% carry a PII item and 2% are junk. Each worker
count runs in a fresh process (`tools/curate.py`'s pipeline on the same files), timed end to end (pipeline start-up,
reading and writing included); peak RSS is the highest of the driver and of any worker process. The outputs of all
worker counts must be identical (their sha256 in manifest.json), or the benchmark fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import numpy as np

from fmjax import errors, startup

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


def render(words: list[str]) -> str:
  """Sentences of 12 words, capitalised, 5 sentences per paragraph."""
  sentences = [" ".join(words[k:k + 12]) + "." for k in range(0, len(words), 12)]
  sentences = [t[0].upper() + t[1:] for t in sentences]
  return "\n".join(" ".join(sentences[k:k + 5]) for k in range(0, len(sentences), 5))


def one(files: str, output: str, workers: int) -> dict:
  """Curates `files` into `output` with `workers` processes; wall time, rate and memory as a dict."""
  t0 = time.perf_counter()
  report = curation.run([files], output, num_workers=workers, license_id="CC0-1.0")
  seconds = time.perf_counter() - t0
  with open(os.path.join(output, "manifest.json")) as f:
    outputs = json.load(f)["outputs"]
  peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  return {"workers": workers, "seconds": round(seconds, 2), "docs": report["input_docs"],
          "docs_per_second": round(report["input_docs"] / seconds, 1), "kept": report["kept_docs"],
          "dropped": {k: v for k, v in report["dropped"].items() if v}, "peak_rss_mib": round(peak_self, 1),
          "peak_worker_rss_mib": round(peak_child, 1) if workers > 1 else None,
          "outputs": [o["sha256"] for o in outputs]}


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--docs", type=int, default=100_000)
  p.add_argument("--doc_words", type=int, default=240, help="words per generated document (~8 characters each)")
  p.add_argument("--files", type=int, default=8, help="input .jsonl files")
  p.add_argument("--workers", default="1,2", help="worker counts to run, each in a fresh process")
  p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # internal: one run, JSON on stdout
  p.add_argument("--dir", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.one:
    print(json.dumps(one(os.path.join(args.dir, "in", "*.jsonl"), os.path.join(args.dir, f"out{args.one}"),
                         args.one)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    os.makedirs(os.path.join(tmp, "in"))
    outs = [open(os.path.join(tmp, "in", f"part-{k:03d}.jsonl"), "w") for k in range(args.files)]
    chars = 0
    for i, r in enumerate(synthetic_docs(args.docs, args.doc_words)):
      outs[i * args.files // args.docs].write(json.dumps(r) + "\n")  # contiguous runs, so copies span files
      chars += len(r["text"])
    for f in outs:
      f.close()
    size = sum(os.path.getsize(os.path.join(tmp, "in", n)) for n in os.listdir(os.path.join(tmp, "in")))
    print(f"{args.docs:,} synthetic documents, {chars / args.docs:,.0f} characters on average, in {args.files} files "
          f"({size / 2**20:,.0f} MiB); {os.cpu_count()} CPU cores")
    results = []
    for workers in (int(w) for w in args.workers.split(",")):
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={workers}", f"--dir={tmp}"],
                            capture_output=True, text=True)
      if proc.returncode:
        raise errors.UserError(f"the run with {workers} worker(s) failed: {proc.stderr.strip().splitlines()[-1]}")
      r = json.loads(proc.stdout.strip().splitlines()[-1])
      results.append(r)
      worker_rss = f", each worker at most {r['peak_worker_rss_mib']:,.0f} MiB" if r["peak_worker_rss_mib"] else ""
      print(f"  {workers} worker(s): {r['seconds']:7.1f} s  {r['docs_per_second']:7,.0f} docs/s  peak RSS driver "
            f"{r['peak_rss_mib']:,.0f} MiB{worker_rss}; kept {r['kept']:,}, dropped {json.dumps(r['dropped'])}",
            flush=True)
    if any(r["outputs"] != results[0]["outputs"] for r in results):
      raise errors.UserError("the outputs differ between worker counts; curation must not depend on them.")
    counts = ", ".join(str(r["workers"]) for r in results)
    print(f"identical output (sha256 {results[0]['outputs'][0][:16]}…) for {counts} worker(s)")


if __name__ == "__main__":
  startup.run(main)
