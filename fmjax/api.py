"""The public Python API: `fmjax.load(path)` → a `Model` with weights, tokenizer, logits and generation.

  model = fmjax.load("/tmp/fmjax/run")              # an fmjax run directory (newest checkpoint)
  model = fmjax.load("/models/Qwen3-0.6B")           # or a Hugging Face directory (config.json + safetensors)
  logits = model.logits(tokens)                      # int [B,T] → float32 [B,T,V]
  texts = model.generate(["def add(a, b):"], max_new_tokens=32, temperature=0.7, top_p=0.9)

Weights live on the default device as one copy (no sharding); this is the API for inspection, evaluation and
sampling, not for training (that is `python -m fmjax.main`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.adapters import Adapter
from fmjax.model import ModelConfig, Transformer
from fmjax.errors import UserError


@dataclasses.dataclass
class Model:
  """A model's architecture (`config`), weights (`params`, a pytree of arrays) and `tokenizer`."""

  config: ModelConfig
  params: Any
  tokenizer: Any
  adapter: Adapter | None = None  # the parameterisation `params` include (fmjax/adapters), if any
  chat_template: str = "fmjax"
  source: str = ""

  @functools.cached_property
  def module(self) -> Transformer:
    return Transformer(self.config, self.adapter)

  @functools.cached_property
  def _logits_fn(self):
    return jax.jit(lambda params, tokens, segments, positions, inputs: self.module.apply(
        {"params": params}, tokens, segments, positions, adapter_inputs=inputs or None))

  def logits(self, tokens: Any, segment_ids: Any = None, positions: Any = None,
             prompt_lengths: Sequence[int] | None = None) -> np.ndarray:
    """Float32 logits [B,T,V] for int tokens [B,T] (one sequence per row from position 0 unless `segment_ids` /
    `positions` say otherwise). Rows over `config.vocab_size` ids are an error. A parameterisation that edits
    prompt positions takes each row's first `prompt_lengths[b]` tokens (default: all) as its prompt."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
      raise UserError(f"tokens must be [batch, length], got shape {tokens.shape}.")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
      raise UserError(f"token ids must lie in [0, {self.config.vocab_size}); got {tokens.min()}..{tokens.max()}.")
    segment_ids = np.ones_like(tokens) if segment_ids is None else np.asarray(segment_ids, np.int32)
    if positions is None:
      positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    inputs = {}
    if self.adapter is not None and self.adapter.columns:
      lengths = np.full(len(tokens), tokens.shape[1]) if prompt_lengths is None else np.asarray(prompt_lengths)
      inputs = self.adapter.prompt_columns(lengths, tokens.shape[1])
    return np.asarray(self._logits_fn(self.params, tokens, segment_ids, np.asarray(positions, np.int32), inputs))

  def encode(self, text: str, bos: bool = True) -> np.ndarray:
    """`text` as int32 ids, after the tokenizer's BOS when `bos`."""
    if self.tokenizer is None:
      raise UserError(f"{self.source} has no tokenizer (no tokenizer.json); pass token ids to .logits instead, or "
                      "put the model's tokenizer.json beside its config.json.")
    ids = self.tokenizer.encode(text)
    return np.concatenate([[self.tokenizer.bos_id], ids]).astype(np.int32) if bos else np.asarray(ids, np.int32)

  def stop_ids(self, chat: bool = False) -> list[int]:
    """EOS, and under `chat` the template's end-of-turn marker when it is one token."""
    from fmjax.data.chat import ChatTemplate

    stops = [int(self.tokenizer.eos_id)]
    if chat:
      end = self.tokenizer.encode(ChatTemplate(self.chat_template).footer.strip())
      if len(end) == 1 and int(end[0]) not in stops:
        stops.append(int(end[0]))
    return stops

  def generate(self, prompts: Sequence[str] | str, max_new_tokens: int = 64, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, stop: Sequence[str | int] = (), seed: int = 0,
               chat: bool = False) -> list[str]:
    """Continuations of `prompts` (texts; under `chat` user messages in the chat template), sampled with a KV
    cache: greedy at temperature 0, else temperature / top-k / top-p sampling. Generation of a row ends at EOS,
    at any of `stop` (token ids, or strings that are cut from the text), or after `max_new_tokens`."""
    from fmjax import sample
    from fmjax.data.chat import ChatTemplate

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if chat:
      template = ChatTemplate(self.chat_template)
      prompts = [template.prompt([{"role": "user", "content": p}]) for p in prompts]
    stop_ids = self.stop_ids(chat) + [int(s) for s in stop if not isinstance(s, str)]
    stop_texts = [s for s in stop if isinstance(s, str)]
    outs = sample.generate(self.config, self.adapter, self.params, [self.encode(p) for p in prompts],
                           max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
                           rng=jax.random.PRNGKey(seed), stop_texts=stop_texts, decode=self.tokenizer.decode)
    texts = []
    for ids in outs:
      text = self.tokenizer.decode([i for i in ids.tolist() if i not in stop_ids])
      cut = min([text.find(s) for s in stop_texts if s in text], default=len(text))
      texts.append(text[:cut])
    return texts


  def score(self, records: Sequence[dict], batch_size: int = 16) -> np.ndarray:
    """A score model's (`config.num_labels > 0`: a reward model, a classifier) scores [N, num_labels] of records
    {"prompt", "completion"} (strings or messages, as training pairs) or {"text"}, each tokenized as in training
    and read at its last token."""
    from fmjax.data import formats
    from fmjax.objectives.score import last_token_scores

    if not self.config.num_labels:
      raise UserError(f"{self.source} is a language model (model.num_labels=0); scores come from a reward model "
                      "or a classifier (a model with model.num_labels > 0).")
    rows = []
    for n, record in enumerate(records):
      fmt = "text" if "completion" not in record else "prompt_completion"
      if fmt == "text" and not isinstance(record.get("text"), str):
        raise UserError(f"record {n}: needs 'prompt' and 'completion', or 'text'; it has {sorted(record)}.")
      encoder = formats.Encoder(fmt, self.tokenizer, chat_template=self.chat_template)
      rows.append(encoder({**record, "_where": f"record {n}"})["tokens"])
    out = []
    for start in range(0, len(rows), batch_size):
      chunk = rows[start:start + batch_size]
      width = max(len(r) for r in chunk)
      tokens, segments = np.zeros((len(chunk), width), np.int32), np.zeros((len(chunk), width), np.int32)
      for i, r in enumerate(chunk):
        tokens[i, :len(r)], segments[i, :len(r)] = r, 1
      scores = self.logits(tokens, segments)
      out.append(np.asarray(last_token_scores(jnp.asarray(scores), jnp.asarray(segments))[0][:, 1]))
    return np.concatenate(out)


def load(path: str, step: int = -1, dtype: str | None = None, key: str = "--model") -> Model:
  """The model in `path`: an fmjax run directory (checkpoint `step`, -1 = newest; a parameterised run's trained
  tree comes over its base) or a Hugging Face checkpoint directory (converted in memory). `dtype` casts the weights
  (e.g. 'bfloat16') and sets the compute dtype. `key`: the flag that named `path`, for errors."""
  from fmjax.interop import hf

  if hf.is_hf_dir(path):
    model_cfg, params, tokenizer, chat_template = hf.load(path)
    adapter = None
  elif os.path.isfile(os.path.join(path, "config.json")):
    from fmjax.train import weights

    run = weights.load(path, step, key)
    model_cfg, params, adapter, tokenizer = run.model_cfg, run.params, run.adapter, run.tokenizer()
    chat_template = run.config.data.chat_template
  else:
    raise FileNotFoundError(f"{path!r} is neither an fmjax run directory (config.json + checkpoints/) nor a Hugging "
                            "Face checkpoint (config.json + *.safetensors).")
  if dtype is not None:
    model_cfg = dataclasses.replace(model_cfg, dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  else:
    params = jax.tree.map(jnp.asarray, params)
  return Model(model_cfg, params, tokenizer, adapter, chat_template, source=os.path.abspath(path))
