"""fmjax parameters ↔ Hugging Face tensors, one tensor at a time.

fmjax keeps one array per weight kind with a leading layers axis (`layers/attn/q_kernel` [L, D, N, H]); HF keeps
one `nn.Linear` weight [out, in] per layer (`model.layers.{i}.self_attn.q_proj.weight` [N·H, D]). Heads flatten
head-major (index = head·head_dim + d) in both, so a kernel maps by a transpose and a reshape, exactly.

Mixture-of-experts layers (Mixtral, Qwen3-MoE) keep their experts stacked in fmjax (`layers/moe/expert_gate`
[L, E, D, F]); HF checkpoints hold one tensor per layer and expert, as `save_pretrained` writes them
(`model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight` for Mixtral, `model.layers.{i}.mlp.experts.{e}.
gate_proj.weight` for Qwen3-MoE, [F, D]), which is what an export writes. An import also reads the fused layout
transformers 5 keeps in memory (and writes with `save_pretrained(..., save_original_format=False)`):
`model.layers.{i}.mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and `...experts.down_proj` [E, D, F],
with the router at `model.layers.{i}.mlp.gate.weight`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Iterator

import numpy as np

from fmjax.interop import hf_config
from fmjax.model.config import ModelConfig
from fmjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Param:
  path: tuple[str, ...]  # fmjax path, scanned layout (`layers/...` carries a leading layers axis)
  hf: str  # HF tensor name; `{i}` = layer index, `{e}` = expert index
  to_fmjax: Callable[[np.ndarray], np.ndarray]  # one HF tensor → one layer's (one expert's) fmjax array
  to_hf: Callable[[np.ndarray], np.ndarray] | None  # None: read on import only (a fused tensor of several params)
  shape: tuple[int, ...] | None = None  # the HF tensor's shape where to_hf does not give it

  @property
  def layered(self) -> bool:
    return "{i}" in self.hf

  @property
  def experts(self) -> bool:
    return "{e}" in self.hf

  def indices(self, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Every index of the fmjax array's leading axes one HF tensor fills: (layer, expert), (layer,) or ()."""
    if self.experts:
      return list(itertools.product(range(cfg.num_layers), range(cfg.num_experts)))
    return [(i,) for i in range(cfg.num_layers)] if self.layered else [()]

  def name(self, index: tuple[int, ...]) -> str:
    """The HF tensor name of `index` (from `indices`)."""
    return self.hf.format(**dict(zip("ie", index)))


def _same(x: np.ndarray) -> np.ndarray:
  return x


def layout(cfg: ModelConfig, fused: bool = False) -> list[Param]:
  """Every parameter of `cfg` with its HF name and conversions; `fused`: an MoE model's experts as transformers 5
  keeps them in memory (import only)."""
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
  if cfg.num_experts:
    return params + _experts(cfg, fused)
  params += [Param(("layers", "mlp", f"{x}_kernel"), mlp + f"{x}_proj.weight", *kernel((D,), F))
             for x in ("gate", "up")]
  params.append(Param(("layers", "mlp", "down_kernel"), mlp + "down_proj.weight", *kernel((F,), D)))
  return params


def _experts(cfg: ModelConfig, fused: bool) -> list[Param]:
  """The router and experts of an MoE layer: fmjax `layers/moe/router` [L, D, E] ↔ HF `gate.weight` [E, D]; each
  expert's SwiGLU as one HF tensor per expert, or (`fused`) as gate_up_proj [E, 2F, D] and down_proj [E, D, F]."""
  D, E, F = cfg.d_model, cfg.num_experts, cfg.mlp_dim
  kind = hf_config.moe_family(cfg)
  moe = lambda name: ("layers", "moe", name)  # noqa: E731
  t = lambda w: w.T  # noqa: E731  ([out, in] ↔ [in, out])
  if fused:
    block = "model.layers.{i}.mlp."
    swap = lambda w: np.swapaxes(w, 1, 2)  # noqa: E731  (per expert [out, in] → [in, out])
    return [Param(moe("router"), block + "gate.weight", t, None, (E, D)),
            Param(moe("expert_gate"), block + "experts.gate_up_proj", lambda w: swap(w[:, :F]), None, (E, 2 * F, D)),
            Param(moe("expert_up"), block + "experts.gate_up_proj", lambda w: swap(w[:, F:]), None, (E, 2 * F, D)),
            Param(moe("expert_down"), block + "experts.down_proj", swap, None, (E, D, F))]
  block, names = (("model.layers.{i}.block_sparse_moe.", ("w1", "w3", "w2")) if kind == "mixtral" else
                  ("model.layers.{i}.mlp.", ("gate_proj", "up_proj", "down_proj")))
  expert = block + "experts.{e}.%s.weight"
  return [Param(moe("router"), block + "gate.weight", t, t),
          Param(moe("expert_gate"), expert % names[0], t, t),
          Param(moe("expert_up"), expert % names[1], t, t),
          Param(moe("expert_down"), expert % names[2], t, t)]


IGNORED = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; recomputed from the config


def check_names(names: list[str], cfg: ModelConfig) -> list[Param]:
  """Every tensor of the checkpoint must map to an fmjax parameter (a tied language model may carry a copy of
  lm_head; a sequence classifier has score.weight and no lm_head). Returns the layout the checkpoint has (an MoE
  model's experts one tensor each, or fused)."""
  candidates = [layout(cfg)] + ([layout(cfg, fused=True)] if cfg.num_experts else [])
  found = []
  for params in candidates:
    expected = {p.name(index) for p in params for index in p.indices(cfg)}
    extra = sorted(n for n in names if n not in expected and not n.endswith(IGNORED)
                   and not (cfg.tie_embeddings and not cfg.num_labels and n == "lm_head.weight"))
    missing = sorted(expected - set(names))
    if not extra and not missing:
      return params
    found.append((len(extra) + len(missing), extra, missing))
  _, extra, missing = min(found, key=lambda f: f[0])  # the closer layout's differences
  if cfg.num_labels and "score.weight" in missing and "lm_head.weight" in extra:
    raise UserError("config.json's architectures name a sequence classifier but the checkpoint holds a causal LM's "
                    "lm_head.weight, not score.weight; set architectures to [\"<Family>ForCausalLM\"].")
  if not cfg.num_labels and "score.weight" in extra:
    raise UserError("the checkpoint holds score.weight (a sequence classifier) but config.json's architectures "
                    "name a causal LM; set architectures to [\"<Family>ForSequenceClassification\"].")
  raise UserError(f"the checkpoint's tensors do not match its config.json: missing {missing[:4]}, unexpected "
                  f"{extra[:4]} (biases, a vision tower or another architecture are not converted).")


def hf_tensors(cfg: ModelConfig, params: list[Param] | None = None) -> Iterator[tuple[Param, tuple[int, ...], str]]:
  """(param, index, HF name) for every HF tensor of `cfg` (of layout `params`, default the exported one), grouped by
  fmjax parameter; index: the leading axes of the fmjax array it fills, (layer, expert), (layer,) or ()."""
  for p in params or layout(cfg):
    for index in p.indices(cfg):
      yield p, index, p.name(index)
