"""Zero-download corpora built from the Python installation itself, with a document-level held-out split.

`prose`, reference English, two kinds of document:
  `topic:NAME`   a pydoc topic page (`pydoc_data.topics`, e.g. `topic:assert`);
  `doc:MODULE`   one per standard-library source file (below): the module docstring, then the docstring of every
                 public class, function and method in source order, each entry a header line with its qualified
                 name (`json`, `json.dumps`, `json.JSONEncoder.encode`) followed by the docstring as
                 `ast.get_docstring` cleans it; entries are separated by a blank line. Public: the name does not
                 start with `_`. Definitions are found at module level (including inside `if` / `try` blocks, where
                 platform-specific APIs live) and, recursively, inside public classes; never inside functions.
                 Empty docstrings are left out, and so is a module with no entry at all. `MODULE` is the dotted
                 module name (`email.mime.text`; a package's `__init__.py` is the package itself).
`code`, Python source: one document per standard-library source file that is not blank, its exact text, keyed by
  its path relative to the standard-library directory with `/` separators (`json/encoder.py`).
`api`, the raw material of `fmjax.data.instruct` (not a corpus of `load`): one entry per public function or method
  with a docstring, found by the rules of `doc:` (so never a class itself), keyed by its qualified name
  (`json.dumps`), its value a compact JSON object {"module": "json", "signature": "def dumps(obj, *, ...)",
  "doc": the docstring as `ast.get_docstring` cleans it}. The signature is `def` or `async def`, the name, the
  arguments as `ast.unparse` writes them, and ` -> RETURN` when annotated. Where a name is defined more than once
  (platform variants in `if` / `try` blocks), the first definition in source order is kept.

Standard-library source files: the `.py` files under `sysconfig.get_paths()["stdlib"]`, walked in sorted order,
  - descending only into directories whose names are identifiers (packages), and never into `site-packages`,
    `dist-packages`, `__pycache__` or a test suite: a directory named `test`, `tests` or `idle_test` at any depth
    (`test/`, `unittest/test/`, `lib2to3/tests/`, `tkinter/test/`, `idlelib/idle_test/`, ...); this also leaves out
    `lib-dynload` and the build directory `config-X.Y-<platform>`;
  - whose file stem is an identifier, which leaves out build-specific files such as
    `_sysconfigdata__linux_x86_64-linux-gnu.py`;
  - of at most `MAX_FILE_BYTES` bytes, which leaves out generated tables such as `pydoc_data/topics.py` (its text is
    the topic pages of `prose`);
  - that decode as UTF-8 and parse with this Python's `ast` (others are skipped silently).
No module is imported (importing some, e.g. `antigravity` or `this`, has side effects); docstrings come from `ast`.

All three are deterministic for a given Python installation. Building them parses ~11 MB of source (seconds), so
the first `load` writes them to `$FMJAX_CACHE/corpora/` (default `~/.cache/fmjax/corpora/`) as gzip'd JSON
objects key -> text, named by corpus, `FORMAT_VERSION`, Python version and standard-library directory; later loads
read that file (and, within a process, memory).
"""

from __future__ import annotations

import ast
import functools
import gc
import gzip
import hashlib
import json
import logging
import math
import os
import sys
import sysconfig
import warnings
import zlib
from typing import Iterator

from fmjax.data import cache
from fmjax.errors import UserError

SPLITS = ("train", "validation", "all")
VALIDATION_FRACTION = 0.1
FORMAT_VERSION = 2  # bump whenever the documents built change, so cached corpora are rebuilt
MAX_FILE_BYTES = 500_000
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def stdlib_dir() -> str:
  """The directory of the standard library's Python sources."""
  return sysconfig.get_paths()["stdlib"]


def source_files(root: str) -> Iterator[tuple[str, str]]:
  """(path relative to `root` with `/` separators, text) of the standard-library source files under `root` that
  pass the directory, name, size and UTF-8 rules of the module docstring, in sorted order (parsing is not checked
  here)."""
  for here, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d.isidentifier() and d not in SKIP_DIRS)  # os.walk descends into these
    for f in sorted(files):
      if not (f.endswith(".py") and f[:-3].isidentifier()):
        continue
      path = os.path.join(here, f)
      try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
          continue
        with open(path, "rb") as fh:
          text = fh.read().decode("utf-8")
      except (OSError, UnicodeDecodeError):
        continue
      yield os.path.relpath(path, root).replace(os.sep, "/"), text


def module_name(rel: str) -> str:
  """`email/mime/text.py` -> `email.mime.text`; `json/__init__.py` -> `json`."""
  parts = rel[:-len(".py")].split("/")
  if parts[-1] == "__init__" and len(parts) > 1:
    parts.pop()
  return ".".join(parts)


def _add(entries: list[str], name: str, node: ast.AST) -> str | None:
  doc = ast.get_docstring(node)
  if doc and doc.strip():
    entries.append(f"{name}\n{doc}")
    return doc
  return None


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  """`def dumps(obj, *, skipkeys=False, ...)`: the definition line of a function, without decorators or colon."""
  keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
  returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
  return f"{keyword} {node.name}({ast.unparse(node.args)}){returns}"


def _walk(entries: list[str], prefix: str, body: list[ast.stmt], api: dict[str, str] | None, module: str) -> None:
  for node in body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      if not node.name.startswith("_"):
        name = f"{prefix}.{node.name}"
        doc = _add(entries, name, node)
        if isinstance(node, ast.ClassDef):
          _walk(entries, name, node.body, api, module)
        elif doc and api is not None and name not in api:  # the first of several platform variants wins
          api[name] = json.dumps({"module": module, "signature": signature(node), "doc": doc},
                                 ensure_ascii=False, separators=(",", ":"))
    elif isinstance(node, ast.If):
      _walk(entries, prefix, node.body + node.orelse, api, module)
    elif isinstance(node, (ast.Try, ast.TryStar)):
      _walk(entries, prefix, node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody,
            api, module)


def reference(module: str, tree: ast.Module, api: dict[str, str] | None = None) -> str:
  """The `doc:` document of a parsed module: its docstrings under qualified-name headers ('' when it has none).
  With `api`, also adds the module's `api` entries to it (qualified name -> JSON)."""
  entries: list[str] = []
  _add(entries, module, tree)
  _walk(entries, module, tree.body, api, module)
  return "\n\n".join(entries)


def _build_stdlib(root: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
  """(`code` documents, `doc:` documents of `prose`, `api` entries) of the standard library under `root`, in one
  parse per file."""
  code, docs, api = {}, {}, {}
  gc_was_enabled = gc.isenabled()
  # Parsing allocates millions of AST nodes, which would trigger many full collections over the whole heap;
  # the trees hold no reference cycles, so reference counting frees them and the build runs ~2x faster without gc.
  gc.disable()
  try:
    with warnings.catch_warnings():  # old sources trip e.g. invalid-escape warnings of newer parsers
      warnings.simplefilter("ignore")
      for rel, text in source_files(root):
        try:
          tree = ast.parse(text, filename=rel)
        except (SyntaxError, ValueError):  # ValueError: null bytes, on Pythons before 3.12
          continue
        if text.strip():  # empty `__init__.py` files make no document
          code[rel] = text
        name = module_name(rel)
        if doc := reference(name, tree, api):
          docs[f"doc:{name}"] = doc
  finally:
    if gc_was_enabled:
      gc.enable()
  return code, docs, api


def _build(root: str) -> dict[str, dict[str, str]]:
  """Every corpus: name -> key -> text."""
  from pydoc_data import topics  # ships with every CPython; a plain dict, no side effects

  code, docs, api = _build_stdlib(root)
  prose = {f"topic:{k}": v for k, v in topics.topics.items() if v.strip()}
  prose.update(docs)
  return {"prose": prose, "code": code, "api": api}


def cache_path(name: str, root: str | None = None) -> str:
  """The cache file of corpus `name` built from the standard library at `root` (default: this Python's)."""
  root = stdlib_dir() if root is None else root
  v = sys.version_info
  where = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:8]  # two installs never share a file
  file = f"{name}-v{FORMAT_VERSION}-{sys.implementation.name}{v.major}.{v.minor}.{v.micro}-{where}.json.gz"
  return os.path.join(cache.cache_root(), "corpora", file)


@functools.lru_cache(maxsize=8)
def _cached(name: str, root: str, path: str) -> dict[str, str]:
  """Corpus `name` from its cache file `path`, or built from `root` (and every corpus's cache file written)."""
  try:
    with open(path, "rb") as f:
      docs = json.loads(gzip.decompress(f.read()))
    if isinstance(docs, dict):
      return docs
    logging.warning("embedded corpus cache %s holds no JSON object; rebuilding it.", path)
  except FileNotFoundError:
    pass
  except (OSError, EOFError, ValueError, zlib.error) as e:
    logging.warning("embedded corpus cache %s is unreadable (%s); rebuilding it.", path, e)
  built = _build(root)
  try:
    for other, other_docs in built.items():  # one walk builds all, so cache all
      other_path = cache_path(other, root)
      os.makedirs(os.path.dirname(other_path), exist_ok=True)
      data = json.dumps(other_docs, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
      cache.write_atomic(other_path, gzip.compress(data, compresslevel=6, mtime=0))
  except OSError as e:
    logging.warning("could not cache the embedded corpora under %s (%s); they are rebuilt in every process. "
                    "Point $FMJAX_CACHE at a writable directory.", os.path.dirname(path), e)
  return built[name]


def _documents(name: str) -> dict[str, str]:
  root = stdlib_dir()
  return _cached(name, root, cache_path(name, root))


def prose_documents() -> dict[str, str]:
  """The pydoc topic pages and the standard library's docstrings, keyed `topic:NAME` / `doc:MODULE`."""
  return dict(_documents("prose"))


def code_documents() -> dict[str, str]:
  """The standard library's Python source files, keyed by relative path (`json/encoder.py`)."""
  return dict(_documents("code"))


def api_entries() -> dict[str, dict[str, str]]:
  """The standard library's public functions and methods with a docstring: qualified name -> {"module",
  "signature", "doc"} (see the module docstring)."""
  return {name: json.loads(entry) for name, entry in _documents("api").items()}


CORPORA = {"prose": prose_documents, "code": code_documents}


def _check(name: str, split: str) -> None:
  if name not in CORPORA:
    raise UserError(f"data source 'embedded:{name}' is unknown; embedded corpora: {sorted(CORPORA)}.")
  if split not in SPLITS:
    raise UserError(f"split {split!r} is not one of {SPLITS}.")


def split_keys(keys: list[str], split: str) -> list[str]:
  """The keys on side `split`, sorted: `validation` holds the first 10% (rounded up) of `keys` ordered by the
  SHA-256 of the key, `train` the rest, `all` every key."""
  ranked = sorted(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
  n_val = math.ceil(len(ranked) * VALIDATION_FRACTION)
  return sorted({"train": ranked[n_val:], "validation": ranked[:n_val], "all": ranked}[split])


def load_records(name: str, split: str = "train") -> list[tuple[str, str]]:
  """(key, text) of the documents of embedded corpus `name` on side `split`, in key order (see `split_keys`).

  Whole documents go to one side, so no text leaks between the splits.
  """
  _check(name, split)
  docs = _documents(name)
  return [(k, docs[k]) for k in split_keys(list(docs), split)]


def load(name: str, split: str = "train") -> list[str]:
  """The texts of `load_records(name, split)`, in the same order."""
  return [text for _, text in load_records(name, split)]
