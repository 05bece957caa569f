"""Ahead-of-time compilation of the real train step for a Cloud TPU topology that is not attached.

libtpu describes any TPU slice as compile-only devices; fmjax builds its mesh over them, the abstract train state
(`jax.eval_shape`: nothing is allocated) and the same jitted step `experiment.build` runs, then asks the TPU compiler
for per-chip HBM (`memory_analysis`) and its cost model (`cost_analysis`). tools/aot_compile.py is the command line.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from fmjax import adapters, sharding, topology
from fmjax import spec as spec_lib
from fmjax.data import layout
from fmjax.data.layout import Layout
from fmjax.model import ModelConfig, context, moe, splash
from fmjax.spec import Spec
from fmjax.train import checks, frozen, peak
from fmjax.train import step as step_lib

GiB = topology.GiB


def batch_layout(spec: Spec) -> Layout:
  """The batch layout the run's data would yield, from the head's declaration (the data itself is not opened)."""
  head = spec.head
  return layout.with_adapter(layout.for_head(head.layouts, head.columns, spec.data.format), spec.adapter)


@dataclasses.dataclass
class Memory:
  """Per-chip HBM of one compiled step, in bytes."""
  fits: bool  # the TPU compiler accepted the program (it refuses one that needs more HBM than a chip has)
  capacity: int | None  # HBM a program may use on one chip, as the compiler states it
  arguments: dict[str, int]  # by category, from the sharded abstract shapes: params, optimizer state, frozen, batch
  compiled: dict[str, int]  # memory_analysis(): arguments, temporaries, outputs not aliased, generated code
  total: int  # the compiler's peak in use (arguments included); when refused, its "required"
  message: str = ""  # the compiler's refusal
  seconds: float = 0.0  # compile time


@dataclasses.dataclass
class Cost:
  """The TPU compiler's cost model of one step, against the model FLOPs fmjax's MFU counts."""
  model_flops: float  # per step, all chips: fmjax.model.flops per token x tokens per step
  peak_flops: float  # per chip (bf16, fmjax.train.peak's table)
  chips: int
  compiler_flops: float | None = None  # per chip per step, as the cost model counts them (remat included)
  compiler_seconds: float | None = None  # the cost model's step time ("optimal_seconds")
  bytes_per_layer: float | None = None  # HBM bytes one more layer moves per chip, as the cost model counts them
  kernel_flops: float = 0.0  # per chip per step: Pallas kernels' analytic FLOPs, which the cost model leaves out
  kernel_bytes: float = 0.0  # and their HBM bytes
  kernel_seconds: float = 0.0  # their roofline time: per call the slower of FLOPs at peak and bytes at HBM bandwidth
  # per kernel ('splash', 'grouped matmul'): analytic (FLOPs, bytes, roofline seconds) per chip per step, and whether
  # the cost model already counts it (then it is not in kernel_*: megablox states its work to the compiler)
  kernels: dict[str, tuple[float, float, float]] = dataclasses.field(default_factory=dict)
  counted: tuple[str, ...] = ()
  note: str = ""

  @property
  def seconds(self) -> float | None:
    """The projected step: the cost model's time plus the kernels' roofline time."""
    return None if not self.compiler_seconds else self.compiler_seconds + self.kernel_seconds

  @property
  def mfu(self) -> float | None:
    return None if not self.seconds else self.model_flops / (self.seconds * self.chips * self.peak_flops)


def plan(spec: Spec, devices: list, archs: dict[str, ModelConfig] | None) -> step_lib.Plan:
  """The run's jitted step and abstract arguments on a mesh of `devices`: nothing allocated, no data read."""
  checks.check_spec(spec)
  mesh = sharding.make_mesh(spec.mesh, devices)
  checks.check_mesh(spec, mesh)
  return step_lib.plan(spec, mesh, batch_layout(spec), archs)


def compile_for_tpu(lowered: jax.stages.Lowered) -> Any:
  """`lowered.compile()` writing nothing to a persistent compilation cache: libtpu's compile-only executables cannot
  be loaded back from it, so an entry would only cost disk and a warning when read."""
  key = "jax_persistent_cache_min_compile_time_secs"  # the one switch jax reads at every write
  before = getattr(jax.config, key)
  jax.config.update(key, float("inf"))
  try:
    return lowered.compile()
  finally:
    jax.config.update(key, before)


def _per_chip(tree: Any) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def argument_bytes(step: step_lib.Plan) -> dict[str, int]:
  """Per-chip bytes of the step's arguments by category (one device per chip on every TPU generation here)."""
  s = step.state
  out = {"params (trained)": _per_chip(s.params), "optimizer state": _per_chip(s.opt_state)}
  if s.base is not None:
    out[f"frozen {step.model.adapter.title} base"] = _per_chip(s.base)
  out.update({f"frozen {k}": _per_chip(v) for k, v in s.frozen.items()})
  out["batch"] = _per_chip(step.batch)
  out["step, rng"] = _per_chip((s.step, s.rng, s.recent_losses))
  return out


def compile_memory(spec: Spec, devices: list, archs: dict[str, ModelConfig],
                   capacity: int | None = None) -> tuple[Memory, step_lib.Plan, Any]:
  """(per-chip HBM of the step, the step, the compiled step: None when the compiler refuses it for lack of HBM)."""
  step = plan(spec, devices, archs)
  args = argument_bytes(step)
  t0 = time.perf_counter()
  try:
    compiled = compile_for_tpu(step.lower())
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    needed = topology.refusal(str(e))
    return Memory(False, needed[1] if needed else capacity, args, {}, needed[0] if needed else 0,
                  str(e).strip().splitlines()[0], time.perf_counter() - t0), step, None
  m = compiled.memory_analysis()
  figures = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
             "outputs not aliased": m.output_size_in_bytes - m.alias_size_in_bytes,
             "generated code": m.generated_code_size_in_bytes}
  # The peak, not the sum: the compiler admits a program by its peak in use (a v6e-8 step with 34 GiB of arguments
  # + temporaries but a 25.8 GiB peak compiles for 31.25 GiB); older runtimes without the field get the sum.
  peak = getattr(m, "peak_memory_in_bytes", 0) or sum(figures.values())
  return Memory(True, capacity, args, figures, peak, "", time.perf_counter() - t0), step, compiled


def _costs(compiled: Any) -> dict[str, float]:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return {"flops": float(ca.get("flops", 0.0)), "seconds": float(ca.get("optimal_seconds", 0.0)),
          "bytes": float(ca.get("bytes accessed", 0.0))}


def grouped_matmul_work(cfg: ModelConfig, tokens: int, mesh_shape: dict[str, int]) -> dict[str, tuple[float, float]]:
  """Megablox's work for one MoE layer of `cfg` over `tokens` (the global micro-batch), per chip: {'forward' |
  'backward': (FLOPs, bytes)} of its three grouped matmuls (gate, up, down); {} where the model has no dropless
  megablox layer. Rows: the tokens x k a dropless layer must compute, spread evenly over the chips (with expert
  parallelism, the rows routed to a device's experts, balanced), padded to whole row tiles; groups: the experts a
  device holds. A lower bound of what a kernel is given, which is what the cost-model check below needs."""
  if not cfg.num_experts or cfg.moe_capacity_factor > 0 or cfg.moe_matmul not in ("auto", "megablox"):
    return {}
  ep, tp = mesh_shape.get("expert", 1), mesh_shape.get("tensor", 1)
  shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1) * mesh_shape.get("context", 1) * ep
  rows = tokens // shards * cfg.num_experts_per_tok
  return moe.layer_kernel_cost(cfg, rows, max(1, cfg.num_experts // ep), cfg.mlp_dim // tp)


def add_kernel_costs(cost: Cost, spec: Spec, archs: dict[str, ModelConfig], device_kind: str,
                     mesh_shape: dict[str, int] | None = None, layer_flops: float | None = None) -> None:
  """Adds the Pallas kernels' analytic work of one step to `cost`, per chip, at roofline: the trained model's forward,
  its recomputed forward under remat, its backward; the forward of each frozen model the head reads (a reference
  copy, or another run's network from `archs`). Splash (fmjax.model.splash.kernel_cost) is always added: the cost
  model counts its calls as almost free. Megablox's grouped matmuls (`grouped_matmul_work`, MoE layers on
  `mesh_shape`) state their work to the compiler, and libtpu 0.0.52 counts it: they are added only when
  `layer_flops` (the cost model's FLOPs of one more layer of the trained model, per chip) is below half their
  FLOPs, i.e. the cost model left them out. The batch, sequence and heads split evenly over the chips (data, fsdp,
  expert, context and tensor axes all divide one or the other)."""
  bandwidth = peak.hbm_bandwidth(device_kind)
  seq = spec.train.seq_len
  sequences = spec.train.batch_size * batch_layout(spec).rows_per_example
  trained = spec.model
  models = [(trained, ("forward", "backward") + (("forward",) if trained.remat != "none" else ()))]
  models += [(archs.get(f.role, trained), ("forward",)) for f in spec.head.frozen]
  mesh_shape = mesh_shape or {"fsdp": cost.chips}
  k = spec.train.grad_accum
  found: dict[str, list[float]] = {}

  def add(name: str, calls: float, flops: float, moved: float) -> None:
    total = found.setdefault(name, [0.0, 0.0, 0.0])
    total[0] += calls * flops
    total[1] += calls * moved
    total[2] += calls * max(flops / cost.peak_flops, moved / bandwidth if bandwidth else 0.0)  # roofline

  for i, (cfg, passes) in enumerate(models):
    split = context.plan(seq, cfg.context_load_balance, mesh_shape.get("context", 1))
    if splash.applies(cfg.attention_impl, seq, cfg.num_kv_heads, "tpu", split):
      work = splash.kernel_cost(seq, cfg.head_dim, np.dtype(cfg.dtype).itemsize, split)
      calls = sequences * cfg.num_heads * cfg.num_layers * (split.shards if split else 1) / cost.chips
      for p in passes:
        add("splash", calls, *work[p])
    gmm = grouped_matmul_work(cfg, sequences * seq // k, mesh_shape)
    if gmm:
      calls = cfg.num_layers * k
      if i == 0 and layer_flops is not None:
        layer = sum(gmm[p][0] for p in passes)
        if layer_flops >= layer / 2:  # a layer the kernels dominate: counted, or the cost model's FLOPs fall far short
          cost.counted += ("grouped matmul",)
      for p in passes:
        add("grouped matmul", calls, *gmm[p])
  for name, (flops, moved, seconds) in found.items():
    cost.kernels[name] = (flops, moved, seconds)
    if name not in cost.counted:
      cost.kernel_flops += flops
      cost.kernel_bytes += moved
      cost.kernel_seconds += seconds


def model_flops(spec: Spec) -> float:
  """Model FLOPs of one step (fmjax.model.flops, the convention of every MFU fmjax prints) x tokens per step."""
  t = spec.train
  rows = batch_layout(spec).rows_per_example  # a preference pair's chosen and rejected rows both train
  per_token = adapters.train_flops_per_token(spec.model, t.seq_len, spec.adapter)
  return per_token * t.batch_size * t.seq_len * rows


def estimate_cost(spec: Spec, devices: list, archs: dict[str, ModelConfig],
                  step: step_lib.Plan | None = None) -> Cost:
  """The cost model's FLOPs and step time. XLA's cost analysis counts a loop body once, so a step whose layers are
  scanned is measured on 1- and 2-layer copies compiled unrolled (one micro-batch) and extrapolated linearly to the
  full depth (and each frozen 'run' model, e.g. a teacher, to its depth); with gradient accumulation, k micro-batches
  and one optimizer update (compiled apart) make the step. The chunked loss (`model.loss_chunk`: a `lax.map` over n
  chunks of positions) is a loop too: one more 1-layer copy with chunks twice as long gives one chunk's cost, and the
  n - 1 chunks the cost model left out are added (the unembedding matrix a chunk reads again is not)."""
  cost = Cost(model_flops(spec), peak.total_peak_flops(devices[:1])[0], len(devices))
  k = spec.train.grad_accum
  layers = spec.model.num_layers
  chunk = spec.model.loss_chunk
  chunks = -(-spec.train.seq_len // chunk) if chunk else 1

  def probe(n: int, deeper_role: str = "", loss_chunk: int = chunk) -> dict[str, float]:
    c = spec_lib.replace(spec, **{"model.scan_layers": False, "model.num_layers": n, "train.grad_accum": 1,
                                  "train.batch_size": spec.train.batch_size // k, "model.loss_chunk": loss_chunk})
    shallow = {r: dataclasses.replace(a, scan_layers=False, num_layers=2 if r == deeper_role else 1)
               for r, a in archs.items()}
    return _costs(compile_for_tpu(plan(c, devices, shallow).lower()))

  try:
    runs = {"base": probe(1), "deeper": probe(2)}
    runs.update({f"frozen {r}": probe(1, r) for r in archs})
    if chunks > 1:
      runs["longer chunks"] = probe(1, loss_chunk=2 * chunk)
    if k > 1:
      runs["update"] = _update_costs(step or plan(spec, devices, archs))
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    cost.note = f"no estimate: a cost probe does not fit either ({str(e).strip().splitlines()[0][:200]})"
    return cost

  def extrapolate(key: str) -> float:
    base = runs["base"][key]
    value = base + (layers - 1) * (runs["deeper"][key] - base)
    for r, a in archs.items():
      value += (a.num_layers - 1) * (runs[f"frozen {r}"][key] - base)
    if chunks > 1:  # the cost model counted one chunk of the loss: one chunk's cost is about 2c's minus c's
      value += (chunks - 1) * max(runs["longer chunks"][key] - base, 0.0)
    if k > 1:  # k micro-batches, one optimizer update
      value = k * (value - runs["update"][key]) + runs["update"][key]
    return value

  cost.compiler_flops = extrapolate("flops") or None
  untimed = [r["seconds"] for r in runs.values() if r["seconds"] <= 0]
  # seen for multi-slice programs, on v5e/v6e for attention over 3072 tokens or more, and with libtpu 0.0.42 for any
  # Pallas call that states a cost estimate (megablox's grouped matmul: about -6 s each; libtpu 0.0.52 times it)
  if untimed:
    cost.note = (f"the compiler's cost model gives no step time for this program ('optimal_seconds' = {untimed[0]:g} "
                 "< 0: some of its ops went untimed), so there is no projected MFU"
                 + ("; libtpu 0.0.42 does this for megablox's grouped matmul, 0.0.52 times it."
                    if grouped_matmul_work(spec.model, spec.train.seq_len, {}) else "."))
    return cost
  cost.compiler_seconds = extrapolate("seconds")
  cost.bytes_per_layer = runs["deeper"]["bytes"] - runs["base"]["bytes"] or None
  mesh_shape = dict(sharding.make_mesh(spec.mesh, devices).shape)
  add_kernel_costs(cost, spec, archs, devices[0].device_kind, mesh_shape,
                   layer_flops=runs["deeper"]["flops"] - runs["base"]["flops"])
  cost.note = ("libtpu's cost model, 'optimal_seconds': per op about the slower of its compute and its HBM traffic; "
               "collectives count as HBM traffic, not ICI/DCN time, and overlap is perfect, so the projected MFU is "
               "an upper bound. Scanned layers extrapolated from 1- and 2-layer unrolled compiles"
               + (f"; {k} micro-batches and one optimizer update" if k > 1 else "")
               + (f"; the loss's {chunks} chunks from a 1-layer compile with chunks twice as long"
                  if chunks > 1 else "")
               + ("; the splash kernels' analytic FLOPs and bytes added at roofline, as the cost model counts a "
                  "Pallas call without a cost estimate as almost free" if "splash" in cost.kernels else "")
               + ("; megablox's grouped matmuls are counted by the cost model (the kernel states its FLOPs and bytes; "
                  "one layer's FLOPs include them), so they are not added" if "grouped matmul" in cost.counted else
                  "; megablox's grouped matmuls added at roofline: the cost model's FLOPs of one layer fall short of "
                  "theirs" if "grouped matmul" in cost.kernels else "") + ".")
  return cost


def _update_costs(step: step_lib.Plan) -> dict[str, float]:
  """Cost of one optimizer update alone (clipping, AdamW, apply) on the step's sharded params."""
  tx, sh = step.tx, step.shardings

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  jitted = jax.jit(update, in_shardings=(sh.params, sh.opt_state, sh.params), out_shardings=(sh.params, sh.opt_state),
                   donate_argnums=(0, 1))
  return _costs(compile_for_tpu(jitted.lower(step.state.params, step.state.opt_state, step.state.params)))


_REMAT_STRENGTH = {"none": 0, "dots": 1, "projections": 1, "dots_no_batch": 2, "qkv_proj": 2, "full": 3}


def suggestions(spec: Spec, memory: Memory, topo: topology.Topology, mesh_shape: dict) -> list[str]:
  """Concrete changes that lower the per-chip HBM of this run, the state's first, then the activations'."""
  out, cfg, t = [], spec.model, spec.train
  state = sum(v for k, v in memory.arguments.items() if k not in ("batch", "step, rng"))
  if mesh_shape["data"] > 1:
    out.append(f"shard the state over all chips: --config.mesh.data=1 --config.mesh.fsdp=-1 (with data="
               f"{mesh_shape['data']} the params, optimizer state and frozen trees, {state / GiB:.1f} GiB per chip, "
               "are held that many times)")
  if memory.capacity and state > memory.capacity / 2:
    ways = mesh_shape["fsdp"] * mesh_shape["tensor"]
    chips = 2 ** math.ceil(math.log2(max(topo.chips + 1, state * ways / (memory.capacity / 2))))
    out.append(f"use more chips: the state alone takes {state / GiB:.1f} GiB per chip; over {chips} chips (e.g. "
               f"--topology={topo.cloud_name(chips)}, or --num_slices) it takes at most half of each chip")
  if cfg.remat == "none":
    out.append("--config.model.remat=dots (keep matmul outputs, recompute the rest) or --config.model.remat=full "
               "(recompute each block in the backward pass: ~1/3 more FLOPs, the least activation memory)")
  elif cfg.remat != "full":
    out.append("--config.model.remat=full (recompute each block in the backward pass: the least activation memory)")
  micro = t.batch_size // t.grad_accum
  shards = mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape.get("expert", 1)
  if micro // shards > 1 and (micro // 2) % shards == 0:
    out.append(f"--config.train.grad_accum={2 * t.grad_accum}: micro-batches of {micro // 2} sequences "
               f"({micro // 2 // shards} per chip) with the global batch {t.batch_size} kept")
  if cfg.dtype == "float32":
    out.append("--config.model.dtype=bfloat16: activations and matmuls in bfloat16, the MXU's type (about half the "
               "activation memory; logits and softmax stay float32)")
  if cfg.param_dtype == "float32":
    saved = (memory.arguments.get("params (trained)", 0) + memory.arguments.get("optimizer state", 0)) / 2
    out.append(f"--config.model.param_dtype=bfloat16: params and AdamW moments in bfloat16 save ~{saved / GiB:.1f} "
               "GiB per chip (coarser updates: keep float32 where the run allows)")
  return out


def ladder(spec: Spec, batch_shards: int):
  """(label, spec) settings to try, cheapest first: as given, stronger remat, then each with micro-batches halved
  (gradient accumulation doubled: the global batch is kept) while they still split over the batch shards."""
  remat = spec.model.remat
  remats = [remat] + [r for r in ("dots", "full") if _REMAT_STRENGTH[r] > _REMAT_STRENGTH[remat]]
  batch, k = spec.train.batch_size, spec.train.grad_accum
  while batch % k == 0 and (batch // k) % batch_shards == 0:
    for r in remats:
      yield (f"remat={r}, grad_accum={k} (micro-batch {batch // k})",
             spec_lib.replace(spec, **{"model.remat": r, "train.grad_accum": k}))
    k *= 2


@dataclasses.dataclass
class Report:
  spec: Spec  # the settings compiled (with --search: the first that fits)
  topology: topology.Topology
  device_kind: str
  mesh: dict[str, int]
  memory: Memory
  cost: Cost | None
  suggestions: list[str]
  tried: list[tuple[str, Memory]] = dataclasses.field(default_factory=list)  # --search: each rung's result

  @property
  def verdict(self) -> str:
    return "fits" if self.memory.fits else "does not fit"


def analyse(config: ml_collections.ConfigDict, topo: topology.Topology, frozen_presets: dict[str, str] | None = None,
            cost: bool = True, search: bool = False, devices: list | None = None) -> Report:
  """Compiles the run's step for `topo` and reports HBM per chip, the verdict, suggestions and (if `cost` and it
  fits) the cost model's step time and projected MFU. With `search`, tries `ladder`'s settings until one fits.
  `frozen_presets`: role -> preset for frozen 'run' models (e.g. {'teacher': 'llama3_70b'})."""
  spec = spec_lib.resolve(config)
  devices = devices or topology.devices(topo)
  archs = frozen.architectures(spec, frozen_presets)
  capacity = topology.usable_hbm(devices[0])
  memory, step, _ = compile_memory(spec, devices, archs, capacity)
  tried = [("as given", memory)]
  if search and not memory.fits:
    shards = sharding.batch_shards(step.mesh)
    for label, spec in list(ladder(spec, shards))[1:]:  # if none fits, the report is of the last one tried
      memory, step, _ = compile_memory(spec, devices, archs, capacity)
      tried.append((label, memory))
      if memory.fits:
        break
  mesh = dict(step.mesh.shape)
  tight = memory.capacity and memory.total > 0.9 * memory.capacity
  advice = suggestions(spec, memory, topo, mesh) if not memory.fits or tight else []
  estimate = estimate_cost(spec, devices, archs, step) if cost and memory.fits else None
  return Report(spec, topo, devices[0].device_kind, mesh, memory, estimate, advice, tried)
