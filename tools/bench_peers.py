"""fmjax's train step side by side with Hugging Face transformers' Llama (torch eager and torch.compile), in one run.

  python tools/bench_peers.py                       # the fixed shape: `small`, batch 8 x 256, float32, AdamW
  python tools/bench_peers.py --systems=fmjax,eager --rounds=1 --steps=2 --preset=smoke --batch=4 --seq=64

The same model (fmjax's config exported as a transformers LlamaConfig), the same random batches and the same
optimizer (AdamW, lr, betas, eps, weight decay, global-norm clipping). Systems take turns for `--rounds` rounds of
`--steps` timed steps, each turn after one untimed re-warm step: on these VMs the first step after another framework
ran is slower. Prints per system the median step time, tokens/s and the ratio to the fastest, minor page faults and
system CPU time per step, and each framework's float32 2048^3 matmul ceiling. Needs the `hf` extra (torch,
transformers).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time

from fmjax import errors, startup

SYSTEMS = ("fmjax", "eager", "compile")


def _fmjax_system(preset: str, batch: int, seq: int, tokens, targets):
  """(step(): one train step to completion, model config, optimizer settings, parameter count) for fmjax on this
  host's devices."""
  import jax
  import numpy as np

  from fmjax import config_lib, sharding, spec
  from fmjax.data.layout import Layout
  from fmjax.train import state as train_state
  from fmjax.train import step as step_lib

  config = config_lib.base()
  config.model.name, config.train.batch_size, config.train.seq_len = preset, batch, seq
  config.optimizer.schedule, config.optimizer.warmup_steps = "constant", 0
  run = spec.resolve(config)
  mesh = sharding.make_mesh(run.mesh)
  plan = step_lib.plan(run, mesh, Layout("text"))
  compiled = plan.lower().compile()
  state, _ = train_state.create(plan.model, plan.tx, mesh, plan.rules, config.train.seed, config.train.spike_window)
  host = {"tokens": tokens, "targets": targets, "loss_mask": np.ones(tokens.shape, np.float32),
          "segment_ids": np.ones(tokens.shape, np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape).copy()}
  batch_arrays = sharding.global_batch(host, mesh)
  box = [state]

  def step():
    box[0], metrics = compiled(box[0], batch_arrays)
    jax.block_until_ready(metrics)

  return step, run.model, run.optimizer, train_state.count_params(state.params)


def _torch_system(model_cfg, opt, tokens, targets, compiled: bool):
  """(step(), parameter count) for transformers' LlamaForCausalLM of the same shape, eager or under torch.compile."""
  import torch
  import transformers

  from fmjax.interop import hf_config

  hf = transformers.LlamaConfig(**{k: v for k, v in hf_config.from_model_config(model_cfg).items()
                                   if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
  hf._attn_implementation = "sdpa"
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf).float().train()
  optim = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps,
                            weight_decay=opt.weight_decay)
  x, y = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)

  def train_step():
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm)
    optim.step()
    optim.zero_grad(set_to_none=True)
    return loss.detach()

  fn = torch.compile(train_step) if compiled else train_step
  return (lambda: float(fn())), sum(p.numel() for p in model.parameters())


def _matmul_ceilings() -> dict[str, float]:
  """GFLOP/s of a float32 2048^3 matmul: jitted in JAX, torch.matmul (best of 5 each)."""
  import jax
  import jax.numpy as jnp
  import torch

  n, out = 2048, {}
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  t = torch.ones((n, n), dtype=torch.float32)
  for name, run in (("jax", lambda: f(a, a).block_until_ready()), ("torch", lambda: torch.matmul(t, t))):
    run()
    best = min(_timed(run) for _ in range(5))
    out[name] = 2 * n**3 / best / 1e9
  return out


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main() -> None:
  p = errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {SYSTEMS}")
  p.add_argument("--preset", default="small", help="fmjax model preset (exported to transformers for the peers)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--rounds", type=int, default=2, help="turns each system takes")
  p.add_argument("--steps", type=int, default=4, help="timed steps per turn")
  p.add_argument("--cpu_devices", type=int, default=1, help="virtual CPU devices for fmjax (XLA host device count)")
  args = p.parse_args()
  systems = [s for s in args.systems.split(",") if s]
  unknown = sorted(set(systems) - set(SYSTEMS))
  if unknown or not systems:
    raise errors.UserError(f"--systems={args.systems!r}: unknown {unknown}; choose from {SYSTEMS}.")
  if args.rounds < 1 or args.steps < 1:
    raise errors.UserError("--rounds and --steps must be >= 1.")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
  try:
    import torch
    import transformers
  except ImportError as e:
    raise errors.UserError(f"{e}; the peers need the hf extra: pip install -e '.[hf]'.") from None
  import jax
  import numpy as np

  from fmjax.model import resolve

  vocab = resolve(args.preset).vocab_size
  rng = np.random.default_rng(0)
  seq_ids = rng.integers(0, vocab, (args.batch, args.seq + 1), dtype=np.int32)
  tokens, targets = seq_ids[:, :-1].copy(), seq_ids[:, 1:].copy()

  t0 = time.perf_counter()
  fmjax_step, model_cfg, opt, fmjax_params = _fmjax_system(args.preset, args.batch, args.seq, tokens, targets)
  steps, setup, params = {}, {}, {"fmjax": fmjax_params}
  if "fmjax" in systems:
    steps["fmjax"], setup["fmjax"] = fmjax_step, time.perf_counter() - t0
  for name in ("eager", "compile"):
    if name in systems:
      t0 = time.perf_counter()
      steps[name], params[name] = _torch_system(model_cfg, opt, tokens, targets, compiled=name == "compile")
      steps[name]()  # eager: first step; compile: the compilation
      setup[name] = time.perf_counter() - t0
  if "fmjax" in steps:
    steps["fmjax"]()

  times = {name: [] for name in steps}
  faults = {name: [] for name in steps}
  sys_time = {name: [] for name in steps}
  for _ in range(args.rounds):
    for name, step in steps.items():
      step()  # untimed re-warm after the switch
      for _ in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        times[name].append(_timed(step))
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults[name].append(after.ru_minflt - before.ru_minflt)
        sys_time[name].append(after.ru_stime - before.ru_stime)

  ceilings = _matmul_ceilings()
  tokens_per_step = args.batch * args.seq
  medians = {name: statistics.median(t) for name, t in times.items()}
  fastest = min(medians.values())
  labels = {"fmjax": f"fmjax (jax {jax.__version__}, {jax.device_count()} CPU device(s))",
            "eager": f"transformers {transformers.__version__} Llama, torch {torch.__version__} eager",
            "compile": f"transformers {transformers.__version__} Llama, torch {torch.__version__} torch.compile"}
  print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{args.preset}: {model_cfg.d_model}d x {model_cfg.num_layers} layers, vocab {model_cfg.vocab_size}; "
        f"batch {args.batch} x {args.seq}; float32, AdamW; {args.rounds} rounds x {args.steps} timed steps")
  print("| system | s/step (median) | tokens/s | vs fastest | minor page faults/step | system s/step | setup s |")
  print("|---|---|---|---|---|---|---|")
  for name in steps:
    m = medians[name]
    print(f"| {labels[name]} | {m:.3f} | {tokens_per_step / m:,.0f} | {fastest / m:.2f}x | "
          f"{statistics.median(faults[name]):,.0f} | {statistics.median(sys_time[name]):.3f} | {setup[name]:.1f} |")
  print(f"float32 2048^3 matmul: jax {ceilings['jax']:.0f} GFLOP/s, torch {ceilings['torch']:.0f} GFLOP/s")
  print("parameters: " + ", ".join(f"{name} {n:,}" for name, n in params.items()))


if __name__ == "__main__":
  startup.run(main)
