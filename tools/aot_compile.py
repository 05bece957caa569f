"""Compiles a config's real train step for a Cloud TPU slice on this (CPU) machine: fits or not, HBM per chip by
category, and the compiler's step-time estimate as a projected MFU. No TPU, data, tokenizer or checkpoint is needed.

  python tools/aot_compile.py --config=configs/pretrain.py:smoke --topology=v5p-8
  python tools/aot_compile.py --config=configs/pretrain.py:model=llama3_8b --topology=v5p-8 \\
      --config.train.batch_size=32 --config.train.seq_len=8192 --config.model.dtype=bfloat16 --search
  python tools/aot_compile.py --config=configs/pretrain.py:model=llama3_70b --topology=v5p-128 --num_slices=2
  python tools/aot_compile.py --config=configs/distill.py:teacher=/runs/pt --topology=v6e-8  # its config.json
  python tools/aot_compile.py --config=configs/pretrain.py:model=mixtral_8x7b --topology=v5p-64 \
      --config.train.batch_size=128 --config.train.seq_len=4096 --config.model.dtype=bfloat16 --config.model.remat=full

Topologies: v4-N and v5p-N count TensorCores (v5p-8 = 4 chips, 2x2x1); v5e-N (v5litepod-N) and v6e-N count chips;
any chip grid as v5p:4x4x12 or v6e:8x16. `--num_slices` > 1 compiles a multi-slice mesh (mesh.dcn_* sizes).
The frozen trees a stage holds are included: the LoRA base, DPO's reference copy, the distillation teacher (its
architecture from objective.teacher's config.json, the config objective.teacher_bootstrap would train, or
--teacher_model); any head's frozen models likewise (--frozen_model=ROLE=PRESET). `--search` tries stronger remat and smaller micro-batches (same global batch) until one fits.
MoE models: the mesh line shows the expert axis (--config.mesh.expert=N); megablox's grouped matmuls are counted by
libtpu 0.0.52's cost model (checked per run, added at roofline otherwise); the search does not vary the expert split:
FSDP over the slice is the documented choice (docs/performance.md, "Mixture of experts ahead of time").
Needs libtpu: pip install -e '.[tpu]'.
"""

from __future__ import annotations

import json
import os
import textwrap

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices come from libtpu; never start a backend

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fmjax import startup  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and variant, e.g. configs/pretrain.py:smoke.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Cloud TPU slice: v5p-8, v4-32, v5e-16, v6e-256, or v5p:4x4x12.")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice).")
_FROZEN = flags.DEFINE_multi_string("frozen_model", [], "ROLE=PRESET: the architecture of a frozen model the head "
                                    "reads from another run (default: that run's config.json, or its bootstrap "
                                    "config), e.g. teacher=llama3_70b.")
_TEACHER = flags.DEFINE_string("teacher_model", "", "Distillation: the teacher's preset (= --frozen_model=teacher=...).")
_SEARCH = flags.DEFINE_bool("search", False, "If it does not fit, try remat dots/full and smaller micro-batches.")
_COST = flags.DEFINE_bool("cost", True, "Also compile the cost probes for the step-time estimate and MFU.")
_JSON = flags.DEFINE_string("json", "", "Also write the report to this JSON file.")
flags.mark_flags_as_required(["config", "topology"])


def _size(n: float | None) -> str:
  if n is None:
    return "       -"
  return f"{n / 2**30:8.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:8.2f} MiB"


def _seconds(s: float) -> str:
  return f"{s:.3f} s" if s >= 1 else f"{1e3 * s:.3f} ms"


def render(report, spec: str) -> str:
  """The report as the console shows it."""
  c, topo, m = report.spec, report.topology, report.memory
  cfg = c.model
  slices = f" x {topo.num_slices} slices" if topo.num_slices > 1 else ""
  lines = [f"{spec} on {topo.name}{slices}: {topo.chips} chips ({report.device_kind}, libtpu {topo.libtpu_name})",
           "mesh " + " ".join(f"{k}={v}" for k, v in report.mesh.items())
           + f"; global batch {c.train.batch_size} x {c.train.seq_len} tokens, grad_accum {c.train.grad_accum}, "
           f"remat {cfg.remat}, dtype {cfg.dtype}, param_dtype {cfg.param_dtype}"]
  if len(report.tried) > 1:
    lines.append("search:")
    lines += [f"  {label:<46} {'fits' if mem.fits else 'does not fit'} ({_size(mem.total).strip()})"
              for label, mem in report.tried]
  lines += ["", "HBM per chip"]
  lines += [f"  {k:<32}{_size(v)}" for k, v in m.arguments.items()]
  cap = m.capacity
  of = (f"   of {_size(cap).strip()} usable ({100 * m.total / cap:.0f}%; spec {topo.hbm_spec})" if cap else "")
  if m.compiled:
    pad = m.compiled["arguments"] - sum(m.arguments.values())
    lines.append(f"  {'arguments (compiler)':<32}{_size(m.compiled['arguments'])}"
                 + (f"   incl. {_size(pad).strip()} layout padding" if pad > 2**20 else ""))
    lines += [f"  {k:<32}{_size(v)}" for k, v in m.compiled.items() if k != "arguments"]
    lines.append(f"  {'peak in use (compiler)':<32}{_size(m.total)}{of}")
    if m.total < sum(m.compiled.values()):
      lines.append("  (buffers that are never live together share memory: the peak is below the sum)")
  else:
    lines.append(f"  {'required (compiler)':<32}{_size(m.total)}{of}")
  head = f"verdict: {report.verdict}"
  if m.fits and cap:
    head += f" ({(cap - m.total) / 2**30:.2f} GiB headroom per chip)"
  elif not m.fits:
    head += f": {m.message}"
  lines += ["", head, f"compile: {m.seconds:.1f} s"]
  if report.suggestions:
    lines.append("to lower HBM per chip:" if m.fits else "suggestions:")
    lines += [textwrap.fill(s, 118, initial_indent="  - ", subsequent_indent="    ") for s in report.suggestions]
  cost = report.cost
  if cost is not None:
    lines += ["", f"model FLOPs per step {cost.model_flops:.3e} (fmjax.model.flops x tokens); peak "
                  f"{cost.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip x {cost.chips}"]
    if cost.compiler_flops:
      ratio = cost.compiler_flops * cost.chips / cost.model_flops
      lines += textwrap.wrap(f"compiler-counted FLOPs per step {cost.compiler_flops * cost.chips:.3e}: {ratio:.2f}x "
                             "the model FLOPs, which leave out remat recompute, attention's masked half and frozen "
                             "models' forward passes", 118)
    if cost.bytes_per_layer:
      lines.append(f"HBM bytes moved per layer per chip {cost.bytes_per_layer:.3e} (the cost model's count)")
    for name, (flops, moved, seconds) in cost.kernels.items():
      how = ("counted by the cost model, not added" if name in cost.counted else "added")
      lines += textwrap.wrap(f"{name} kernels (analytic, per chip): {flops:.3e} FLOPs, {moved:.3e} bytes, "
                             f"{_seconds(seconds)} at roofline; {how}", 118)
    if cost.seconds:
      parts = (f" = cost model {_seconds(cost.compiler_seconds)} + kernels {_seconds(cost.kernel_seconds)}"
               if cost.kernel_seconds else "")
      lines.append(f"estimated step time {_seconds(cost.seconds)}{parts} -> projected MFU {100 * cost.mfu:.1f}%")
    lines += textwrap.wrap(f"({cost.note})", 118)
  return "\n".join(lines)


def as_json(report) -> dict:
  m, cost = report.memory, report.cost
  c = report.spec
  return {"topology": report.topology.name, "num_slices": report.topology.num_slices, "chips": report.topology.chips,
          "device_kind": report.device_kind, "mesh": report.mesh, "verdict": report.verdict,
          "global_batch": c.train.batch_size, "seq_len": c.train.seq_len, "grad_accum": c.train.grad_accum,
          "model": c.record["model"],
          "hbm_per_chip": {"by_category": m.arguments, **m.compiled, "peak": m.total, "usable": m.capacity},
          "message": m.message, "compile_seconds": m.seconds, "suggestions": report.suggestions,
          "tried": [[label, mem.fits, mem.total] for label, mem in report.tried],
          "cost": None if cost is None else {"model_flops": cost.model_flops, "compiler_flops_per_chip":
                                             cost.compiler_flops, "seconds": cost.seconds, "mfu": cost.mfu,
                                             "compiler_seconds": cost.compiler_seconds,
                                             "bytes_per_layer_per_chip": cost.bytes_per_layer,
                                             "kernel_flops_per_chip": cost.kernel_flops,
                                             "kernel_bytes_per_chip": cost.kernel_bytes,
                                             "kernel_seconds": cost.kernel_seconds,
                                             "kernels": {k: dict(zip(("flops", "bytes", "seconds"), v))
                                                         for k, v in cost.kernels.items()},
                                             "kernels_counted_by_cost_model": list(cost.counted),
                                             "peak_flops_per_chip": cost.peak_flops, "note": cost.note}}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from fmjax import topology
  from fmjax.train import aot

  topo = topology.parse(_TOPOLOGY.value, _SLICES.value)
  presets = dict(item.partition("=")[::2] for item in _FROZEN.value)
  if _TEACHER.value:
    presets["teacher"] = _TEACHER.value
  report = aot.analyse(_CONFIG.value, topo, presets, cost=_COST.value, search=_SEARCH.value)
  print(render(report, flags.FLAGS["config"].serialize().split("=", 1)[-1]))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(as_json(report), f, indent=1)


if __name__ == "__main__":
  startup.run(main)
