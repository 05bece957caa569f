"""fmjax parameters ↔ Hugging Face tensors, one tensor at a time.

fmjax keeps one array per weight kind with a leading layers axis (`layers/attn/q_kernel` [L, D, N, H]); HF keeps
one `nn.Linear` weight [out, in] per layer (`model.layers.{i}.self_attn.q_proj.weight` [N·H, D]). Heads flatten
head-major (index = head·head_dim + d) in both, so a kernel maps by a transpose and a reshape, exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from fmjax.model.config import ModelConfig
from fmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Param:
  path: tuple[str, ...]  # fmjax path, scanned layout (`layers/...` carries a leading layers axis)
  hf: str  # HF tensor name; `{i}` = layer index
  to_fmjax: Callable[[np.ndarray], np.ndarray]  # one HF tensor → one layer's fmjax array
  to_hf: Callable[[np.ndarray], np.ndarray]

  @property
  def layered(self) -> bool:
    return "{i}" in self.hf


def _same(x: np.ndarray) -> np.ndarray:
  return x


def layout(cfg: ModelConfig) -> list[Param]:
  """Every parameter of `cfg` with its HF name and conversions."""
  D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  kernel = lambda n_in, *out: (  # noqa: E731  (fmjax [in…, out…] ↔ HF [prod(out), prod(in)])
      lambda w: w.T.reshape(*n_in, *out), lambda k: k.reshape(int(np.prod(n_in)), -1).T)
  flat = lambda *shape: (lambda b: b.reshape(shape), lambda b: b.reshape(-1))  # noqa: E731
  attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
  params = [Param(("embedding",), "model.embed_tokens.weight", _same, _same)]
  if cfg.num_labels:  # a sequence classifier (`*ForSequenceClassification`): a score head [D, K], no lm_head
    params.append(Param(("score",), "score.weight", lambda w: w.T, lambda w: w.T))
  elif not cfg.tie_embeddings:
    params.append(Param(("unembed",), "lm_head.weight", lambda w: w.T, lambda w: w.T))
  params.append(Param(("final_norm", "scale"), "model.norm.weight", _same, _same))
  params += [Param(("layers", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight", _same, _same),
             Param(("layers", "mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight", _same, _same),
             Param(("layers", "attn", "q_kernel"), attn + "q_proj.weight", *kernel((D,), N, H)),
             Param(("layers", "attn", "k_kernel"), attn + "k_proj.weight", *kernel((D,), K, H)),
             Param(("layers", "attn", "v_kernel"), attn + "v_proj.weight", *kernel((D,), K, H)),
             Param(("layers", "attn", "o_kernel"), attn + "o_proj.weight", *kernel((N, H), D))]
  if cfg.qkv_bias:
    params += [Param(("layers", "attn", f"{x}_bias"), attn + f"{x}_proj.bias", *flat(n, H))
               for x, n in (("q", N), ("k", K), ("v", K))]
  if cfg.qk_norm:
    params += [Param(("layers", "attn", f"{x}_norm", "scale"), attn + f"{x}_norm.weight", _same, _same)
               for x in ("q", "k")]
  params += [Param(("layers", "mlp", f"{x}_kernel"), mlp + f"{x}_proj.weight", *kernel((D,), F)) for x in ("gate", "up")]
  params.append(Param(("layers", "mlp", "down_kernel"), mlp + "down_proj.weight", *kernel((F,), D)))
  return params


IGNORED = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; recomputed from the config


def check_names(names: list[str], cfg: ModelConfig) -> None:
  """Every tensor of the checkpoint must map to an fmjax parameter (a tied language model may carry a copy of
  lm_head; a sequence classifier has score.weight and no lm_head)."""
  expected = {p.hf.format(i=i) for p in layout(cfg) for i in (range(cfg.num_layers) if p.layered else [0])}
  extra = sorted(n for n in names if n not in expected and not n.endswith(IGNORED)
                 and not (cfg.tie_embeddings and not cfg.num_labels and n == "lm_head.weight"))
  missing = sorted(expected - set(names))
  if cfg.num_labels and "score.weight" in missing and "lm_head.weight" in extra:
    raise UserError("config.json's architectures name a sequence classifier but the checkpoint holds a causal LM's "
                    "lm_head.weight, not score.weight; set architectures to [\"<Family>ForCausalLM\"].")
  if not cfg.num_labels and "score.weight" in extra:
    raise UserError("the checkpoint holds score.weight (a sequence classifier) but config.json's architectures "
                    "name a causal LM; set architectures to [\"<Family>ForSequenceClassification\"].")
  if extra or missing:
    raise UserError(f"the checkpoint's tensors do not match its config.json: missing {missing[:4]}, unexpected "
                    f"{extra[:4]} (biases, a vision tower or another architecture are not converted).")


def hf_tensors(cfg: ModelConfig) -> Iterator[tuple[Param, int, str]]:
  """(param, layer, HF name) for every HF tensor of `cfg`, grouped by fmjax parameter (layer -1: not layered)."""
  for p in layout(cfg):
    for i in (range(cfg.num_layers) if p.layered else [-1]):
      yield p, i, p.hf.format(i=i)
