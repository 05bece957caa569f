"""A run directory's weights on the host (NumPy), for tools: read a checkpoint's params, put a LoRA run's adapters
back over their base, write params as a run that `init_from` accepts."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fmjax import config_lib
from fmjax.model import ModelConfig, init_params, lora
from fmjax.train import init_from


@dataclasses.dataclass
class RunWeights:
  config: ml_collections.ConfigDict  # the run's resolved config (config.json)
  model_cfg: ModelConfig
  lora_cfg: lora.LoraConfig | None
  params: dict  # the full tree: base weights, plus the adapters for a LoRA run
  step: int
  tokenizer_path: str  # the run's copy of its tokenizer ('' for the byte tokenizer)

  def tokenizer(self):
    """The run's tokenizer (its own copy of the sentencepiece model, or the byte tokenizer)."""
    from fmjax import data

    self.config.data.tokenizer_path = self.tokenizer_path
    return data.make_tokenizer(self.config.data)


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config; keys added to fmjax since the run was made take their defaults."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist; --workdir must be an fmjax run directory.")
  config = config_lib.base()
  with open(path) as f:
    config.update(json.load(f))
  return config


def read_params(workdir: str, step: int = -1) -> tuple[dict, int]:
  """(params as NumPy arrays, step) of `workdir`'s checkpoint at `step` (-1 = newest)."""
  path = init_from.checkpoint_dir(workdir, step)
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(os.path.join(path, "state")).item_metadata.tree["params"]
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  restored = checkpointer.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
      item={"params": meta}, restore_args={"params": args}, partial_restore=True))
  return restored["params"], int(os.path.basename(path))


def load(workdir: str, step: int = -1) -> RunWeights:
  """The weights of run `workdir`; for a LoRA run, its adapters over the base it trained on (its init_from, its
  bootstrapped WORKDIR/base, or the seed's initialisation)."""
  config = run_config(workdir)
  model_cfg = config_lib.resolved_model(config)
  lora_cfg = config_lib.lora_config(config)
  params, step = read_params(workdir, step)
  if lora_cfg is not None:
    source = config.init_from.workdir or (os.path.join(workdir, "base") if config.init_from.bootstrap else "")
    if source:
      base, _ = read_params(source, config.init_from.step)
    else:
      base = jax.device_get(init_params(model_cfg, jax.random.split(jax.random.PRNGKey(config.train.seed))[0]))
    params = lora.combine(base, params)
  tokenizer = os.path.join(workdir, "tokenizer.model")
  return RunWeights(config, model_cfg, lora_cfg, params, step, tokenizer if os.path.isfile(tokenizer) else "")


def write_run(output: str, params: dict, config: ml_collections.ConfigDict, step: int, tokenizer_path: str) -> str:
  """Writes `params` as checkpoint `step` of a new run directory `output` (with config.json and the tokenizer), so
  `init_from.workdir=output` starts from them. Refuses to overwrite an existing checkpoint."""
  target = os.path.join(os.path.abspath(output), "checkpoints", str(step), "state")
  if os.path.exists(target):
    raise FileExistsError(f"{target} exists; choose another --output.")
  os.makedirs(output, exist_ok=True)
  ocp.PyTreeCheckpointer().save(target, {"params": params})
  with open(os.path.join(output, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  if tokenizer_path:
    shutil.copyfile(tokenizer_path, os.path.join(output, "tokenizer.model"))
  return target
