"""An lm-evaluation-harness model (`pip install -e '.[eval]'`): any `fmjax.api.Model` on any lm_eval task.

  lm = FmjaxLM(fmjax.load("/tmp/fmjax/run"))                 # or FmjaxLM(pretrained="/tmp/fmjax/run")
  lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])
  lm_eval.simple_evaluate(model="fmjax", model_args="pretrained=/tmp/fmjax/run,max_length=1024", tasks=[...])

The name "fmjax" is registered when this module is imported. Requests are tokenized as the harness's Hugging Face
adapter tokenizes them (context + continuation encoded whole, split at the context's length, after BOS), sorted
longest first and scored in batches of `batch_size` rows padded to a power of two, so few shapes compile. Whole
documents (`loglikelihood_rolling`) are BOS + text, scored in disjoint windows of `max_length` tokens; generation
goes through `Model.generate`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from fmjax import api
from fmjax.evaluation import scoring
from fmjax.errors import UserError

GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "temperature", "do_sample", "top_k", "top_p")


@register_model("fmjax")
class FmjaxLM(TemplateLM):
  """`model` (an `fmjax.api.Model`), or `pretrained` (a path for `fmjax.load`, in `dtype`)."""

  def __init__(self, model: api.Model | None = None, pretrained: str | None = None, batch_size: int | str = 8,
               max_length: int = 2048, max_gen_toks: int = 256, dtype: str | None = None, seed: int = 0,
               max_batch_size: int | None = None, device: str | None = None):
    super().__init__()
    del max_batch_size, device  # passed by lm_eval's CLI; batches are fixed and JAX places the weights
    if (model is None) == (pretrained is None):
      raise UserError("FmjaxLM takes one of model= (an fmjax.api.Model) or pretrained= (an fmjax run directory or "
                      "Hugging Face checkpoint directory).")
    if not str(batch_size).isdigit() or int(batch_size) < 1:
      raise UserError(f"batch_size={batch_size!r} must be a positive integer (rows per forward pass).")
    self.model = model if model is not None else api.load(pretrained, dtype=dtype)
    self.batch_size, self.max_length, self.max_gen_toks, self.seed = int(batch_size), max_length, max_gen_toks, seed

  @property
  def eot_token_id(self) -> int:
    return int(self.model.tokenizer.eos_id)

  @property
  def prefix_token_id(self) -> int:
    return int(self.model.tokenizer.bos_id)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """Token ids of `string`, after BOS unless `add_special_tokens` is False."""
    ids = [int(i) for i in self.model.tokenizer.encode(string)]
    return ids if add_special_tokens is False else [self.prefix_token_id] + ids

  def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                            disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), whether the continuation is the greedy one) per (key, context ids,
    continuation ids); the context is cut from the left to fit `max_length` inputs."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
    inputs, targets = [], []
    for i in order:
      _, context, continuation = requests[i]
      if not 0 < len(continuation) <= self.max_length:
        raise UserError(f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}.")
      seq = (list(context) + list(continuation))[-(self.max_length + 1):]
      inputs.append(seq[:-1])
      targets.append(seq[1:])
    rows = scoring.logprobs(self.model, inputs, targets, self.batch_size)
    results: list[Any] = [None] * len(requests)
    for i, (logp, greedy) in tqdm(zip(order, rows), total=len(order), disable=disable_tqdm, desc="loglikelihood"):
      n = len(requests[i][2])
      results[i] = (float(np.sum(logp[-n:], dtype=np.float64)), bool(greedy[-n:].all()))
      if requests[i][0] is not None:
        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
    return results

  def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
    """Σ log p(text | BOS) per request, over disjoint windows of `max_length` tokens (each token predicted once)."""
    windows, owners = [], []
    for n, (text,) in enumerate(r.args for r in requests):
      pairs = utils.get_rolling_token_windows(self.tok_encode(text, add_special_tokens=False), self.prefix_token_id,
                                              self.max_length, 1)
      for context, continuation in map(utils.make_disjoint_window, pairs):
        windows.append((None, context, continuation))
        owners.append(n)
    totals = np.zeros(len(requests), np.float64)
    for n, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[n] += logp
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
    return [float(t) for t in totals]

  def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
    """`Model.generate` of each context until any `until` string, EOS or `max_gen_toks` tokens; requests that share
    gen_kwargs go in batches, longest context first."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      groups.setdefault(json.dumps(r.args[1], sort_keys=True), []).append(i)
    results: list[Any] = [None] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
    for members in groups.values():
      until, max_new, sampling = self._sampling(requests[members[0]].args[1])
      members.sort(key=lambda i: -len(self.tok_encode(requests[i].args[0])))
      for start in range(0, len(members), self.batch_size):
        chunk = members[start:start + self.batch_size]
        texts = self.model.generate([requests[i].args[0] for i in chunk], max_new, stop=until, seed=self.seed,
                                    **sampling)
        for i, text in zip(chunk, texts):
          results[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.update(len(chunk))
    bar.close()
    return results

  def _sampling(self, gen_kwargs: dict) -> tuple[list[str], int, dict[str, Any]]:
    """(until strings, max new tokens, Model.generate's sampling arguments) of a request's gen_kwargs."""
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
      raise UserError(f"gen_kwargs {unknown} are not supported by fmjax; supported: {list(GEN_KWARGS)}.")
    until = gen_kwargs.get("until") or []
    max_new = gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", self.max_gen_toks))
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if gen_kwargs.get("do_sample", temperature > 0):
      temperature = temperature or 1.0
    else:
      temperature = 0.0
    sampling = {"temperature": temperature, "top_k": int(gen_kwargs.get("top_k") or 0),
                "top_p": float(gen_kwargs.get("top_p") or 1.0)}
    return [until] if isinstance(until, str) else list(until), int(max_new), sampling
