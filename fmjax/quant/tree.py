"""Quantized projection kernels in a params tree: `Quantized` stands in for a frozen kernel, and the model's
projections dequantize it blockwise where they use it (fmjax/model/projection.py), one layer at a time.

Only the attention and MLP projections are quantized (QLoRA's and bitsandbytes' choice): the embedding, the
unembedding, norms and MoE experts keep their dtype. A kernel [*lead, *in, *out] (lead: the layer axis under layer
scan) is viewed as [*lead, I, O] with I the product of its input dims, the transpose of the torch weight [O, I] of
the same layer, so its blocks are bitsandbytes' blocks of that weight."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax.errors import UserError
from fmjax.quant import blockwise

SCHEMES = ("none", "nf4", "int8")
# kernel name -> (input dims, kernel rank); their modules (attention, dense MLP) hold nothing else of these names
KERNELS = {"q_kernel": (1, 3), "k_kernel": (1, 3), "v_kernel": (1, 3), "o_kernel": (2, 3),
           "gate_kernel": (1, 2), "up_kernel": (1, 2), "down_kernel": (1, 2)}
MODULES = ("attn", "mlp")
# top-level tables with `Scheme.embeddings`: the unembedding [D, V] and the embedding [V, D] (stored as its
# transpose, the kernel of a tied unembedding; its rows are bitsandbytes' Embedding4bit blocks)
TABLES = {"unembed": False, "embedding": True}


@dataclasses.dataclass(frozen=True)
class Scheme:
  """How a tree's kernels are stored: `kind` none | nf4 | int8; NF4's `blocksize` and `double` quantisation."""
  kind: str = "none"
  blocksize: int = 64
  double: bool = False
  embeddings: bool = True  # also the embedding and unembedding tables

  @property
  def on(self) -> bool:
    return self.kind != "none"


@flax.struct.dataclass
class Quantized:
  """A quantized kernel [*lead, *in, *out]: nf4 codes uint8 [*lead, I/2, *out] (two per byte) with absmax float32
  [*lead, I/blocksize, *out] (under double quantisation uint8, with `scales2` [*lead, blocks] and `offset` [*lead]);
  int8 codes [*lead, I, *out] with absmax float32 [*lead, *out]. `in_shape`: the kernel's input dims; `dtype`: the
  dtype it was stored in."""
  codes: jax.Array
  scales: jax.Array
  scales2: Any = None
  offset: Any = None
  kind: str = flax.struct.field(pytree_node=False, default="nf4")
  in_shape: tuple = flax.struct.field(pytree_node=False, default=())
  n_out: int = flax.struct.field(pytree_node=False, default=1)
  dtype: str = flax.struct.field(pytree_node=False, default="float32")
  transposed: bool = flax.struct.field(pytree_node=False, default=False)  # the leaf is the kernel's transpose

  @property
  def lead(self) -> tuple[int, ...]:
    return tuple(self.codes.shape[:self.codes.ndim - 1 - self.n_out])

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape[self.codes.ndim - self.n_out:])

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    return (*self.lead, *self.in_shape, *self.out_shape)

  @property
  def shape(self) -> tuple[int, ...]:
    """The leaf's shape."""
    return self.kernel_shape[::-1] if self.transposed else self.kernel_shape

  @property
  def size(self) -> int:
    """Parameters it stands for."""
    return math.prod(self.shape)

  def _flat_scales(self) -> jax.Array:
    """The block scales [*lead, I/blocksize, O] float32 (int8: [*lead, O])."""
    lead, o = self.lead, math.prod(self.out_shape)
    if self.kind == "int8":
      return self.scales.reshape(*lead, o)
    scales = self.scales.reshape(*lead, self.scales.shape[len(lead)], o)
    return scales if self.scales2 is None else blockwise.double_dequantize(scales, self.scales2, self.offset)

  def kernel(self, dtype: Any = None) -> jax.Array:
    """The kernel [*lead, *in, *out] in `dtype` (default: the stored dtype)."""
    dtype = jnp.dtype(dtype or self.dtype)
    codes = self.codes.reshape(*self.codes.shape[:len(self.lead) + 1], math.prod(self.out_shape))
    return self._values(codes, self._flat_scales(), dtype).reshape(self.kernel_shape)

  def _values(self, codes: jax.Array, scales: jax.Array, dtype: Any) -> jax.Array:
    """[..., I, O] codes with their flat scales, dequantized by this kernel's format."""
    fn = blockwise.int8_dequantize if self.kind == "int8" else blockwise.nf4_dequantize
    return fn(codes, scales, dtype)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The leaf in `dtype` (default: the stored dtype)."""
    w = self.kernel(dtype)
    return w.T if self.transposed else w

  def take(self, ids: jax.Array, dtype: Any = None) -> jax.Array:
    """Rows `ids` of a transposed 2-D leaf (an embedding table [V, D] stored as its [D, V] kernel), [*ids, D]: only
    those columns of the codes are dequantized."""
    dtype = jnp.dtype(dtype or self.dtype)
    flat = ids.reshape(-1)
    codes, scales = jnp.take(self.codes, flat, axis=1), jnp.take(self._flat_scales(), flat, axis=-1)
    w = self._values(codes, scales, dtype)
    return w.T.reshape(*ids.shape, w.shape[0])


def quantize(w: jax.Array, scheme: Scheme, n_in: int, lead: int = 0, transposed: bool = False) -> Quantized:
  """`w` [*lead, *in, *out] (`lead` leading dims, `n_in` input dims) stored under `scheme`; `transposed`: `w` is
  the transpose of that kernel (2-D)."""
  if transposed:
    return dataclasses.replace(quantize(w.T, scheme, n_in, lead), transposed=True)
  shape = w.shape
  in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
  i, o = math.prod(in_shape), math.prod(out_shape)
  w2 = w.reshape(*shape[:lead], i, o)
  back = lambda a: a.reshape(*a.shape[:lead + 1], *out_shape)  # noqa: E731
  meta = dict(kind=scheme.kind, in_shape=tuple(in_shape), n_out=len(out_shape), dtype=jnp.dtype(w.dtype).name)
  if scheme.kind == "int8":
    codes, absmax = blockwise.int8_quantize(w2)
    return Quantized(back(codes), absmax.reshape(*shape[:lead], *out_shape), **meta)
  codes, absmax = blockwise.nf4_quantize(w2, scheme.blocksize)
  if not scheme.double:
    return Quantized(back(codes), back(absmax), **meta)
  q8, absmax2, offset = blockwise.double_quantize(absmax)
  return Quantized(back(codes), back(q8), absmax2, offset, **meta)


def _kernel(path: tuple[str, ...], scheme: Scheme) -> tuple[int, int, bool] | None:
  """(input dims, rank, transposed) of the kernel at `path` that `scheme` quantizes, or None."""
  if len(path) >= 2 and path[-1] in KERNELS and path[-2] in MODULES:
    return (*KERNELS[path[-1]], False)
  if len(path) == 1 and path[0] in TABLES and scheme.embeddings:
    return 1, 2, TABLES[path[0]]
  return None


def check(tree: Any, scheme: Scheme, key: str) -> None:
  """Fails, naming the fix, where a kernel's inputs do not fill whole NF4 blocks."""
  if scheme.kind != "nf4":
    return
  for path, w in traverse_util.flatten_dict(tree).items():
    k = _kernel(tuple(map(str, path)), scheme)
    if k is None:
      continue
    lead = len(w.shape) - k[1]
    inputs = w.shape[-1] if k[2] else math.prod(w.shape[lead:lead + k[0]])
    if inputs % scheme.blocksize or inputs % 2:
      raise UserError(f"{key}=nf4: kernel {'/'.join(map(str, path))} has {inputs} inputs, not a multiple of "
                      f"quant.blocksize={scheme.blocksize}; choose a blocksize that divides every projection's inputs "
                      "(d_model, mlp_dim, num_heads·head_dim), e.g. 32 or 16, or use int8.")


def quantize_tree(tree: Any, scheme: Scheme) -> Any:
  """`tree` with each projection kernel a `Quantized` under `scheme` (unchanged when it is off)."""
  if not scheme.on:
    return tree
  flat = traverse_util.flatten_dict(tree)
  out = {}
  for path, w in flat.items():
    k = _kernel(tuple(map(str, path)), scheme)
    out[path] = w if k is None else quantize(w, scheme, k[0], lead=w.ndim - k[1], transposed=k[2])
  return traverse_util.unflatten_dict(out)


def dequantize_tree(tree: Any) -> Any:
  """`tree` with every `Quantized` back in its stored dtype (what the model computed with)."""
  return jax.tree.map(lambda x: x.dequantize() if isinstance(x, Quantized) else x, tree,
                      is_leaf=lambda x: isinstance(x, Quantized))


def count(tree: Any) -> int:
  """Parameters a tree stands for (a quantized kernel counts its kernel's)."""
  return sum(x.size for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Quantized)))


def _merged(spec: tuple) -> Any:
  """One PartitionSpec entry for several dims flattened into one (row-major): their mesh axes in order."""
  axes = [a for s in spec for a in ((s,) if isinstance(s, str) else tuple(s or ()))]
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _size(axes: Any, mesh) -> int:
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())))


def _moved(shape: tuple[int, ...], spec: tuple, dim: int, mesh) -> tuple:
  """`spec` for NF4 scales [*lead, I/blocksize, *out]: where few blocks leave the block dim (`dim`) indivisible by
  its mesh axes, those axes go to the first output dim they divide that is not split yet (else: replicated)."""
  axes = spec[dim]
  if axes is None or shape[dim] % _size(axes, mesh) == 0:
    return spec
  for d in range(dim + 1, len(shape)):
    if _size(spec[d], mesh) == 1 and shape[d] % _size(axes, mesh) == 0:
      return tuple(axes if i == d else None if i == dim else s for i, s in enumerate(spec))
  return spec


def shardings(q: Any, plain: Any, mesh) -> Any:
  """The shardings of a quantized tree `q` (abstract) from its plain tree's `plain` (NamedShardings): a kernel's
  codes and scales keep its dims' mesh axes, its input dims' merged into one (dropped where they do not divide)."""
  from fmjax.sharding import fit_spec

  def one(x, s):
    if not isinstance(x, Quantized):
      return s
    spec = tuple(s.spec) + (None,) * (len(x.shape) - len(s.spec))
    spec = spec[::-1] if x.transposed else spec
    lead, n_in = len(x.lead), len(x.in_shape)
    lead_spec, in_spec, out_spec = spec[:lead], _merged(spec[lead:lead + n_in]), spec[lead + n_in:]
    fit = lambda a, p: None if a is None else NamedSharding(mesh, fit_spec(a.shape, P(*p), mesh))  # noqa: E731
    codes_spec = (*lead_spec, in_spec, *out_spec)
    if x.kind == "int8":  # per output channel: the inputs' mesh axes go to an output dim, as for too few blocks
      moved = _moved((*x.lead, 1, *x.out_shape), codes_spec, lead, mesh)
      scales_spec = moved[:lead] + moved[lead + 1:]
    else:
      scales_spec = _moved(x.scales.shape, codes_spec, lead, mesh)
    return x.replace(codes=fit(x.codes, codes_spec), scales=fit(x.scales, scales_spec),
                     scales2=fit(x.scales2, (*lead_spec, None)), offset=fit(x.offset, lead_spec))

  return jax.tree.map(one, q, plain, is_leaf=lambda x: isinstance(x, Quantized))


def nbytes(tree: Any) -> int:
  """Bytes of a (possibly abstract) tree as stored."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def plan(abstract: Any, plain: Any, scheme: Scheme, mesh) -> tuple[Any, Any]:
  """(abstract quantized tree carrying its shardings, its shardings) of the abstract plain tree `abstract` with
  shardings `plain`; nothing is allocated."""
  q = jax.eval_shape(lambda t: quantize_tree(t, scheme), abstract)
  sh = shardings(q, plain, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), q, sh), sh


def quantizer(scheme: Scheme, out_shardings: Any):
  """Jitted plain tree -> quantized tree (into `out_shardings`), the plain tree's buffers donated: freed once it
  is quantized (they cannot hold the new, smaller arrays, which jax warns about)."""
  fn = jax.jit(lambda t: quantize_tree(t, scheme), out_shardings=out_shardings, donate_argnums=0)

  def run(tree: Any) -> Any:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
      return fn(tree)

  return run
