"""Prints the lineage of a run: every stage from the first run to RUN, with its data, licenses and manifests.

  python tools/audit.py /tmp/dpo                # pretrain -> SFT -> DPO: steps, tokens, data, licenses, evals
  python tools/audit.py /tmp/dpo --json         # the same as JSON (fmjax.governance.lineage.chain)

Each stage names the data it read: its source, its licenses, and the manifests found for it (curate / prepare
outputs), with their parents back to the raw inputs. A manifest whose file changed since the run recorded it, and
data of unknown license, are flagged.
"""

from __future__ import annotations

import argparse
import json
import os

from fmjax import errors, startup


def manifest_lines(path: str, sha256: str, indent: str, depth: int = 0) -> list[str]:
  """A manifest and its parents, one line each, flagged when missing or changed since recorded."""
  from fmjax.governance import manifest

  if not os.path.isfile(path):
    return [f"{indent}manifest {path}: MISSING (recorded sha256 {sha256[:16]}…)"]
  data, now = manifest.read(path)
  flag = "" if now == sha256 else f"  CHANGED since recorded ({sha256[:16]}… → {now[:16]}…)"
  inputs = data.get("inputs", [])
  counts = data.get("counts", {})
  removed = {k: v for k, v in counts.get("removed", {}).items() if v}
  lines = [f"{indent}{data.get('tool', '?')} manifest {path} (sha256 {now[:16]}…, {data.get('created', '?')}){flag}",
           f"{indent}  {len(inputs)} input(s), licenses {data.get('licenses', {})}"
           + (f", removed {removed}" if removed else "")
           + (f", PII found {pii}" if (pii := {k: v for k, v in counts.get("pii_found", {}).items() if v}) else "")]
  if data.get("unknown_license_inputs"):
    lines.append(f"{indent}  WARNING: {data['unknown_license_inputs']} input(s) of unknown license")
  if depth < 8:
    for parent in data.get("parents", []):
      lines += manifest_lines(parent["path"], parent["sha256"], indent + "  ", depth + 1)
  return lines


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("run", help="a run directory")
  p.add_argument("--step", type=int, default=-1, help="the run's checkpoint step (-1 = newest)")
  p.add_argument("--json", action="store_true", help="print the chain as JSON")
  args = p.parse_args()
  if not os.path.isfile(os.path.join(args.run, "config.json")):
    raise errors.UserError(f"{args.run} is not a run directory (no config.json); name a --workdir of fmjax.main.")
  from fmjax.governance import lineage, manifest

  runs = lineage.chain(args.run, args.step)
  if args.json:
    print(json.dumps(runs, indent=2))
    return
  for n, run in enumerate(runs, start=1):
    where = run.get("hf_model") or run["workdir"]
    print(f"{n}. {run['stage']}: {where} — {run['steps']:,} steps, {run['tokens']:,} tokens")
    for d in run.get("data", []):
      print(f"   {d['use']}: {d['source']} (license {' AND '.join(d['licenses'])})")
      for m in d["manifests"]:
        print("\n".join(manifest_lines(m["path"], m["sha256"], "     ")))
    for f in run.get("frozen", []):
      print(f"   frozen {f['role']}: {f['workdir']}")
    if run["eval"]:
      print("   eval: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(run["eval"].items()) if isinstance(v, float)))
  licenses = lineage.licenses(runs)
  print(f"data licenses: {', '.join(licenses) or 'none recorded'}")
  if manifest.UNKNOWN in licenses:
    print("WARNING: some training data has license 'unknown'; confirm the rights to use it (curate or prepare it "
          "with --license / --license_map).")


if __name__ == "__main__":
  startup.run(main)
