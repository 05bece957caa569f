"""tools/bench_peers.py runs fmjax and transformers' Llama on the same shape (needs the hf extra)."""

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_peers_times_fmjax_and_torch_on_models_of_the_same_size(repo, cpu_env):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  proc = subprocess.run([sys.executable, "tools/bench_peers.py", "--systems=fmjax,eager", "--rounds=1", "--steps=1",
                         "--preset=smoke", "--batch=2", "--seq=32"], cwd=repo, capture_output=True, text=True,
                        timeout=300, env=cpu_env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| fmjax") or line.startswith("| transf")]
  assert len(rows) == 2
  for row in rows:
    tokens_per_sec = float(row.split("|")[3].replace(",", ""))
    assert tokens_per_sec > 0
  counts = dict(re.findall(r"(\w+) (\d[\d,]*\d)", proc.stdout.split("parameters: ")[1]))
  assert counts["fmjax"] == counts["eager"]  # the same architecture on both sides: the comparison is of equal work
