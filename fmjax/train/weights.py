"""A run directory's weights on the host (NumPy), for tools: read a checkpoint's params, put a parameterisation's trained tree
back over their base, write params as a run that `init_from` accepts."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fmjax import config_lib, data, objectives
from fmjax import adapters, quant
from fmjax import spec as spec_lib
from fmjax.model import ModelConfig, init_params
from fmjax.train import init_from


@dataclasses.dataclass
class RunWeights:
  config: ml_collections.ConfigDict  # the run's resolved config (config.json)
  model_cfg: ModelConfig
  adapter: adapters.Adapter | None  # the parameterisation it trained, if any
  params: dict  # the full tree: base weights, plus the parameterisation's tree
  step: int
  tokenizer_path: str  # the run's copy of its tokenizer ('' for the byte tokenizer)

  def tokenizer(self):
    """The run's tokenizer (its own copy of the sentencepiece model or tokenizer.json, or the byte tokenizer)."""
    self.config.data.tokenizer_path = self.tokenizer_path
    return data.make_tokenizer(self.config.data)


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config; keys added to fmjax since the run was made take their defaults, and the objective
  section holds the options its head reads (a run from before heads owned their options saved every head's)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist; --workdir must be an fmjax run directory.")
  config = config_lib.base()
  with open(path) as f:
    saved = json.load(f)
  objective = saved.pop("objective", {})
  config.update(saved)
  if objective.get("name") in objectives.REGISTRY:
    section = config_lib.use_head(config, objective["name"])
    section.update({k: v for k, v in objective.items() if k in section})
  return config


def read_params(workdir: str, step: int = -1, key: str = "init_from") -> tuple[dict, int]:
  """(params as NumPy arrays, step) of `workdir`'s checkpoint at `step` (-1 = newest), verified; `key`: the setting
  that named `workdir`, for errors."""
  path = init_from.state_dir(workdir, step, key)
  checkpointer = ocp.PyTreeCheckpointer()
  with init_from.reading(path, key):
    meta = checkpointer.metadata(path).item_metadata.tree["params"]
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item={"params": meta}, restore_args={"params": args}, partial_restore=True))
  return restored["params"], int(os.path.basename(os.path.dirname(path)))


def read_param(workdir: str, step: int, path: tuple[str, ...]) -> np.ndarray:
  """One parameter (`path` in the params tree) of `workdir`'s checkpoint at `step`, read alone; verify the checkpoint
  once first (`init_from.state_dir`)."""
  ckpt = os.path.join(init_from.checkpoint_dir(workdir, step), "state")  # verified once by the caller (state_dir)
  checkpointer = ocp.PyTreeCheckpointer()
  with init_from.reading(ckpt):
    meta = checkpointer.metadata(ckpt).item_metadata.tree["params"]
  for key in path:
    meta = meta[key]
  item: Any = meta
  restore: Any = ocp.RestoreArgs(restore_type=np.ndarray)
  for key in reversed(path):
    item, restore = {key: item}, {key: restore}
  with init_from.reading(ckpt):
    restored = checkpointer.restore(ckpt, args=ocp.args.PyTreeRestore(
        item={"params": item}, restore_args={"params": restore}, partial_restore=True))["params"]
  for key in path:
    restored = restored[key]
  return restored


def load(workdir: str, step: int = -1, key: str = "--workdir") -> RunWeights:
  """The weights of run `workdir`; under a parameterisation (fmjax/adapters), its trained tree over the base it trained
  on (its init_from, its bootstrapped WORKDIR/base, or the seed's initialisation). `key`: the flag or setting that
  named `workdir`, for errors."""
  config = run_config(workdir)
  model_cfg = config_lib.resolved_model(config)
  adapter = config_lib.adapter(config)
  params, step = read_params(workdir, step, key)
  if adapter is not None:
    source = config.init_from.workdir or (os.path.join(workdir, init_from.BOOTSTRAPPED)
                                          if config.init_from.bootstrap else "")
    if source:
      base, _ = read_params(source, config.init_from.step)
    else:
      base = jax.device_get(init_params(model_cfg, jax.random.split(jax.random.PRNGKey(config.train.seed))[0]))
    params = adapters.combine(as_trained(base, spec_lib.Quant(**config.quant.to_dict())), params)
  return RunWeights(config, model_cfg, adapter, params, step, data.run_tokenizer_file(workdir))


def as_trained(base: dict, q: spec_lib.Quant) -> dict:
  """The base weights as a run computed with them: under quant.base, quantized and dequantized back to their dtype
  (the values each projection multiplied by, so a merge or an export of the run is exact)."""
  scheme = q.scheme(q.base)
  if not scheme.on:
    return base
  return jax.device_get(jax.jit(lambda t: quant.dequantize_tree(quant.quantize_tree(t, scheme)))(base))


def write_run(output: str, params: dict, run_config: ml_collections.ConfigDict, step: int,
              tokenizer_path: str) -> str:
  """Writes `params` as checkpoint `step` of a new run directory `output` (with config.json and the tokenizer), so
  `init_from.workdir=output` starts from them. Refuses to overwrite an existing checkpoint."""
  target = os.path.join(os.path.abspath(output), "checkpoints", str(step), "state")
  if os.path.exists(target):
    raise FileExistsError(f"{target} exists; choose another --output.")
  os.makedirs(output, exist_ok=True)
  # Host arrays are written as they are (no defensive copy) and at most 1 GB at a time, so a converted checkpoint
  # held in memory-mapped files is never copied whole into memory.
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.ArrayHandler()))
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, save_concurrent_gb=1)
  ocp.Checkpointer(handler).save(target, args=ocp.args.PyTreeSave({"params": jax.tree.map(np.asarray, params)}))
  with open(os.path.join(output, "config.json"), "w") as f:
    f.write(run_config.to_json_best_effort(indent=2))
  if tokenizer_path:
    data.tokenizer_from_file(tokenizer_path).save(output)
  return target
