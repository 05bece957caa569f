"""Hugging Face checkpoints ↔ fmjax run directories (Llama, Mistral, Qwen2, Qwen3, and the mixtures of experts
Mixtral and Qwen3-MoE), tensor by tensor.

An imported run directory is an ordinary fmjax run at step 0: `config.json` (the model's shape as `model.*`, its
tokenizer, its chat template), `checkpoints/0/state` (the params), `tokenizer.json` + `tokenizer_config.json`, and
`hf/` with the source's own config and tokenizer files (the template an export writes back). So `init_from`,
`fmjax.load`, the tools and an export treat it like any other run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from fmjax import config_lib
from fmjax.data import hf_tokenizer
from fmjax.interop import hf_config, hf_weights, safetensors_io
from fmjax.model.config import ModelConfig
from fmjax.errors import UserError
from fmjax.governance import card

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja")


def is_hf_dir(path: str) -> bool:
  """Whether `path` is a Hugging Face checkpoint directory (an HF config.json beside safetensors weights)."""
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config) or os.path.isdir(os.path.join(path, "checkpoints")):
    return False
  return "model_type" in hf_config.read(config)


def read_config(hf_dir: str) -> tuple[dict, ModelConfig]:
  """(HF config.json, the fmjax model of it)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist; --hf_dir must be a Hugging Face model directory.")
  hf = hf_config.read(path)
  cfg = hf_config.to_model_config(hf)
  window = hf.get("sliding_window") if hf.get("model_type") in ("mistral", "mixtral") else None
  if window:
    logging.warning("%s: %s sliding_window=%d; fmjax attends to the whole context, which is the same for "
                    "sequences up to %d tokens.", hf_dir, hf["model_type"], window, window)
  return hf, cfg


def convert_params(reader: safetensors_io.Reader, cfg: ModelConfig, dtype: str,
                   allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray] = np.empty) -> dict:
  """The fmjax params (scanned layout, NumPy, `dtype`) of the HF tensors in `reader`, filled one HF tensor at a
  time into arrays from `allocate(shape, dtype)` (e.g. memory-mapped files)."""
  params = hf_weights.check_names(reader.keys(), cfg)
  for _, _, name, shape in tensor_specs(cfg, params):  # e.g. a score.weight of another label count than config.json's
    found = tuple(reader.entries[name][2]["shape"])
    if found != shape:
      raise UserError(f"tensor {name} has shape {list(found)} but config.json implies {list(shape)}; the checkpoint "
                      "and its config.json (e.g. num_labels / id2label) must describe the same model.")
  out, dt = {}, np.dtype(jax.numpy.dtype(dtype))
  for p in params:
    indices = p.indices(cfg)
    first = p.to_fmjax(reader.get(p.name(indices[0])))
    array = allocate((*_leading(p, cfg), *first.shape), dt)
    for index in indices:
      array[index] = p.to_fmjax(reader.get(p.name(index))).astype(dt)
    out[p.path] = array
  return traverse_util.unflatten_dict(out)


def _leading(p: hf_weights.Param, cfg: ModelConfig) -> tuple[int, ...]:
  """The leading axes of fmjax parameter `p` that its HF tensors index: (layers, experts), (layers,) or ()."""
  return (cfg.num_layers, cfg.num_experts) if p.experts else (cfg.num_layers,) if p.layered else ()


def chat_template(tokenizer: hf_tokenizer.HFTokenizer | None) -> str:
  """fmjax's chat template preset matching an HF vocabulary's special tokens (ChatML, Llama 3), else `plain`."""
  if tokenizer is not None:
    if tokenizer.tok.token_to_id("<|im_start|>") is not None:
      return "chatml"
    if tokenizer.tok.token_to_id("<|start_header_id|>") is not None:
      return "llama3"
  return "plain"


def _tokenizer(hf_dir: str) -> hf_tokenizer.HFTokenizer | None:
  path = os.path.join(hf_dir, "tokenizer.json")
  return hf_tokenizer.HFTokenizer(path) if os.path.isfile(path) else None


def load(hf_dir: str, dtype: str = "float32") -> tuple[ModelConfig, dict, Any, str]:
  """(model config, params, tokenizer or None, chat template) of HF directory `hf_dir`, converted in memory."""
  _, cfg = read_config(hf_dir)
  params = convert_params(safetensors_io.Reader(hf_dir), cfg, dtype)
  tokenizer = _tokenizer(hf_dir)
  return hf_config.with_dtypes(cfg, dtype), params, tokenizer, chat_template(tokenizer)


def run_config(cfg: ModelConfig, tokenizer_path: str, template: str) -> ml_collections.ConfigDict:
  """The fmjax config of an imported model: every `model.*` field explicit, its tokenizer and chat template."""
  config = config_lib.base()
  config.model.name = "custom"
  for key, value in dataclasses.asdict(cfg).items():
    config.model[key] = value
  config.data.tokenizer = "hf" if tokenizer_path else "bytes"
  config.data.tokenizer_path = tokenizer_path
  config.data.chat_template = template
  return config


def import_dir(hf_dir: str, workdir: str, dtype: str = "float32") -> str:
  """Converts HF checkpoint `hf_dir` into the fmjax run directory `workdir` (checkpoint step 0); returns the
  checkpoint path. Parameters are assembled in memory-mapped scratch files under `workdir`, so resident memory
  stays near one tensor whatever the model's size."""
  from fmjax.train import weights

  _, cfg = read_config(hf_dir)
  cfg = hf_config.with_dtypes(cfg, dtype)
  reader = safetensors_io.Reader(hf_dir)
  os.makedirs(workdir, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=".import-", dir=workdir)
  try:
    counter = iter(range(1 << 30))
    memmap = lambda shape, dt: np.lib.format.open_memmap(  # noqa: E731
        os.path.join(scratch, f"{next(counter)}.npy"), mode="w+", dtype=dt, shape=shape)
    params = convert_params(reader, cfg, dtype, memmap)
    tokenizer = _tokenizer(hf_dir)
    config = run_config(cfg, os.path.join(os.path.abspath(workdir), "tokenizer.json") if tokenizer else "",
                        chat_template(tokenizer))
    target = weights.write_run(workdir, params, config, 0, tokenizer.path if tokenizer else "")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  os.makedirs(os.path.join(workdir, "hf"), exist_ok=True)
  for name in HF_FILES:
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(workdir, "hf", name))
  return target


def export_params(params_of: Callable[[tuple[str, ...]], np.ndarray], cfg: ModelConfig, hf_dir: str,
                  dtype: str, template: dict | None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes config.json and safetensors shards of the fmjax params (`params_of(path)` → one parameter, scanned
  layout) into `hf_dir`, one HF tensor at a time."""
  dt = np.dtype(jax.numpy.dtype(dtype))
  entries, specs = {}, []
  for p, index, name, shape in tensor_specs(cfg):
    specs.append((name, dt, shape))
    entries[name] = (p, index)
  cache: dict[tuple[str, ...], np.ndarray] = {}

  def produce(name: str) -> np.ndarray:
    p, index = entries[name]
    if p.path not in cache:
      cache.clear()  # one fmjax parameter in memory at a time (tensors come grouped by parameter)
      cache[p.path] = np.asarray(params_of(p.path))
    return np.asarray(p.to_hf(cache[p.path][index])).astype(dt)

  names = safetensors_io.write(hf_dir, specs, produce, max_shard_bytes)
  config = hf_config.from_model_config(cfg, template, dtype)
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return names


def tensor_specs(cfg: ModelConfig, params: list[hf_weights.Param] | None = None
                 ) -> list[tuple[hf_weights.Param, tuple[int, ...], str, tuple[int, ...]]]:
  """(fmjax parameter, index, HF name, HF shape) of every HF tensor of `cfg` (scanned layout; of layout `params`,
  default the exported one), in writing order; index: the leading axes of the fmjax array it fills."""
  shapes = _param_shapes(cfg)
  out = []
  for p, index, name in hf_weights.hf_tensors(cfg, params):
    if p.shape is not None:
      shape = p.shape
    else:
      fmjax_shape = shapes[p.path][len(_leading(p, cfg)):]
      shape = jax.eval_shape(p.to_hf, jax.ShapeDtypeStruct(fmjax_shape, np.float32)).shape
    out.append((p, index, name, tuple(shape)))
  return out


@functools.lru_cache(maxsize=8)
def _param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  from fmjax.model import init_params

  tree = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  return {k: v.shape for k, v in traverse_util.flatten_dict(tree).items()}


def _template_dir(workdir: str, hops: int = 8) -> str | None:
  """The `hf/` directory of the import this run descends from (itself, or along its init_from chain)."""
  from fmjax.train import weights

  for _ in range(hops):
    if os.path.isfile(os.path.join(workdir, "hf", "config.json")):
      return os.path.join(workdir, "hf")
    config = weights.run_config(workdir)
    workdir = config.init_from.workdir
    if not workdir:
      return None
  return None


def export_dir(workdir: str, hf_dir: str, step: int = -1, dtype: str | None = None, adapter_mode: str = "merge",
               max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes run `workdir` (checkpoint `step`) as a Hugging Face directory `hf_dir` that `from_pretrained` loads:
  config.json, safetensors shards and the tokenizer files. A parameterised run is merged into full weights
  (`adapter_mode` 'merge') or, where PEFT has its kind of adapter, written as a PEFT adapter directory ('peft'). `dtype` defaults to the run's parameter dtype.
  Returns a one-line summary."""
  from fmjax.adapters import peft, split
  from fmjax.train import weights

  config = weights.run_config(workdir)
  cfg = config_lib.resolved_model(config)
  adapter = config_lib.adapter(config)
  template_dir = _template_dir(workdir)
  template = None
  if template_dir:
    with open(os.path.join(template_dir, "config.json")) as f:
      template = json.load(f)
  if adapter_mode not in ("merge", "peft"):
    raise UserError(f"adapter_mode={adapter_mode!r}: use 'merge' (full weights) or 'peft' (an adapter directory).")
  if adapter is not None and adapter_mode == "peft":
    peft.check_exportable(adapter, workdir)
    if cfg.num_labels:  # the adapter files would lack the trained score head (PEFT's modules_to_save)
      raise UserError(f"{workdir} is a score model (model.num_labels={cfg.num_labels}); PEFT adapter export is for "
                      "language models, export it with adapter_mode='merge'.")
    run = weights.load(workdir, step)
    base = template.get("_name_or_path") if template else None
    peft.save(hf_dir, split(adapter, run.params)[0], adapter, cfg.num_layers,
              base_model=base or config.init_from.workdir or None)
    card.write(workdir, hf_dir, run.step)
    return f"wrote the PEFT adapter of {workdir} (step {run.step}) and its model card to {hf_dir}"
  if adapter is not None:
    run = weights.load(workdir, step)
    merged = traverse_util.flatten_dict(adapter.merge(run.params))
    read, step = merged.__getitem__, run.step
  else:
    step = int(os.path.basename(os.path.dirname(weights.init_from.state_dir(workdir, step))))  # verified once
    read = lambda path: weights.read_param(workdir, step, path)  # noqa: E731
  layers = cfg.num_layers

  def params_of(path: tuple[str, ...]) -> np.ndarray:  # the stacked layout, whatever the run's scan_layers
    if cfg.scan_layers or path[0] != "layers":
      return read(path)
    return np.stack([read((f"layers_{i}", *path[1:])) for i in range(layers)])

  scanned = dataclasses.replace(cfg, scan_layers=True)
  dtype = dtype or cfg.param_dtype
  names = export_params(params_of, scanned, hf_dir, dtype, template, max_shard_bytes)
  _write_tokenizer_files(workdir, template_dir, hf_dir, score_model=cfg.num_labels > 0)
  card.write(workdir, hf_dir, step)
  return f"wrote {workdir} (step {step}) as {len(names)} safetensors file(s) and a model card (README.md) in {hf_dir}"


def _write_tokenizer_files(workdir: str, template_dir: str | None, hf_dir: str, score_model: bool = False) -> None:
  """The run's tokenizer (and an import's generation/tokenizer configs) beside the exported weights; the special
  ids go into config.json and generation_config.json (a score model, which does not generate, gets no
  generation_config.json, and always a pad_token_id)."""
  from fmjax import data
  from fmjax.train import weights

  if template_dir:
    for name in HF_FILES[1:]:
      if score_model and name == "generation_config.json":
        continue
      if os.path.isfile(os.path.join(template_dir, name)):
        shutil.copyfile(os.path.join(template_dir, name), os.path.join(hf_dir, name))
  tokenizer_file = data.run_tokenizer_file(workdir)
  if tokenizer_file:
    data.tokenizer_from_file(tokenizer_file).save(hf_dir)
  tokenizer = weights.RunWeights(weights.run_config(workdir), None, None, {}, 0, tokenizer_file).tokenizer()
  ids = {"bos_token_id": int(tokenizer.bos_id), "eos_token_id": int(tokenizer.eos_id),
         "pad_token_id": int(tokenizer.pad_id)}
  for name in ("config.json",) if score_model else ("config.json", "generation_config.json"):
    path = os.path.join(hf_dir, name)
    current = {}
    if os.path.isfile(path):
      with open(path) as f:
        current = json.load(f)
    for key, value in ids.items():
      current.setdefault(key, value)
    if score_model and current.get("pad_token_id") is None:
      # transformers' sequence classifiers read the last token that is not pad_token_id and refuse batches > 1
      # without one; transformers writes `"pad_token_id": null`, hence the explicit fill. A tokenizer without a pad
      # token gives its EOS id (HFTokenizer.pad_id), as Llama reward models commonly set: fmjax's sequences are
      # scored before their EOS, so an EOS pad never hides a scored token.
      current["pad_token_id"] = ids["pad_token_id"]
    with open(path, "w") as f:
      json.dump(current, f, indent=2)
