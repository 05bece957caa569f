"""Embedded corpora: leak-free stable splits, the standard-library file rules, docstring documents, the disk cache."""

import ast
import gzip
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
from pydoc_data import topics

from fmjax.data import embedded

STDLIB = embedded.stdlib_dir()
NOT_SOURCE_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

MOD = '''"""Module doc."""

def f():
  """F doc."""

def _g():
  """Private."""

def outer():
  """Outer doc."""
  def inner():
    """Not API."""

class C:
  """C doc.

    Indented detail.
  """
  def m(self):
    """M doc."""
  def _p(self):
    """Private method."""
  def bare(self):
    pass
  class Inner:
    """Inner doc."""

if X:
  def h():
    """H doc."""
try:
  import y
except ImportError:
  def y():
    """Y doc."""
'''


def fake_stdlib(root) -> str:
  """A tiny standard library with one file for each rule; returns its directory."""
  files = {
      "mod.py": MOD,
      "pkg/__init__.py": '"""Package doc."""\n',
      "pkg/sub.py": "x = 1\n",  # code, but no docstring: no prose document
      "blank/__init__.py": "\n",  # blank: no document at all
      "pkg/tests/test_a.py": '"""Test."""\n',
      "test/test_b.py": '"""Test."""\n',
      "idlelib/idle_test/htest.py": '"""Test."""\n',
      "site-packages/third.py": '"""Third party."""\n',
      "__pycache__/c.py": "x = 1\n",
      "config-3.11-x86_64-linux-gnu/python-config.py": '"""Build tool."""\n',
      "_sysconfigdata__linux_x86_64-linux-gnu.py": "build_time_vars = {}\n",
      "big.py": '"""Big."""\n' + "#" * embedded.MAX_FILE_BYTES,
      "broken.py": "def (:\n",
      "notes.txt": "not source\n",
  }
  lib = os.path.join(root, "lib")
  for rel, text in files.items():
    os.makedirs(os.path.dirname(os.path.join(lib, rel)), exist_ok=True)
    with open(os.path.join(lib, rel), "w", encoding="utf-8") as f:
      f.write(text)
  with open(os.path.join(lib, "latin1.py"), "wb") as f:
    f.write(b'"""caf\xe9"""\n')
  return lib


@pytest.fixture
def fake(tmp_path, monkeypatch) -> str:
  lib = fake_stdlib(str(tmp_path))
  monkeypatch.setattr(embedded, "stdlib_dir", lambda: lib)
  monkeypatch.setenv("FMJAX_CACHE", str(tmp_path / "cache"))
  return lib


def refuse(root: str):
  raise AssertionError(f"rebuilt the corpora from {root} instead of reading the cache")


@pytest.mark.parametrize("name", sorted(embedded.CORPORA))
def test_splits_are_disjoint_cover_the_corpus_and_hold_out_a_tenth(name):
  train, val, full = (embedded.load_records(name, s) for s in ("train", "validation", "all"))
  train_keys, val_keys, all_keys = ({k for k, _ in records} for records in (train, val, full))
  assert len(full) > 500 and len(all_keys) == len(full)
  assert not train_keys & val_keys
  assert train_keys | val_keys == all_keys
  assert len(val) == math.ceil(len(full) * embedded.VALIDATION_FRACTION)
  for records in (train, val, full):
    assert [k for k, _ in records] == sorted(k for k, _ in records)
    assert all(text.strip() for _, text in records)
  assert embedded.load(name, "validation") == [text for _, text in val]
  assert os.path.isfile(embedded.cache_path(name))


@pytest.mark.parametrize("name,key", [("code", "json/encoder.py"), ("prose", "doc:json"), ("prose", "topic:assert")])
def test_a_known_document_lands_on_the_side_its_hash_rank_says(name, key):
  keys = [k for k, _ in embedded.load_records(name, "all")]
  ranked = sorted(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
  side, other = ("validation", "train") if ranked.index(key) < math.ceil(len(keys) / 10) else ("train", "validation")
  assert key in dict(embedded.load_records(name, side))
  assert key not in dict(embedded.load_records(name, other))


def test_code_is_the_stdlib_source_verbatim_without_tests_third_party_or_generated_tables():
  code = dict(embedded.load_records("code", "all"))
  with open(os.path.join(STDLIB, "json", "encoder.py"), "rb") as f:
    assert code["json/encoder.py"] == f.read().decode("utf-8")
  assert {"os.py", "json/__init__.py", "email/mime/text.py", "asyncio/tasks.py"} <= set(code)
  for key in code:
    assert key.endswith(".py") and not NOT_SOURCE_DIRS & set(key.split("/")[:-1]), key
  assert "pydoc_data/topics.py" not in code  # 0.75 MB of generated topic pages: prose, not code


def test_prose_holds_topic_pages_and_public_docstrings_under_qualified_names():
  prose = dict(embedded.load_records("prose", "all"))
  assert prose["topic:assert"] == topics.topics["assert"]
  with open(os.path.join(STDLIB, "json", "__init__.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  dumps = next(node for node in tree.body if getattr(node, "name", "") == "dumps")
  assert prose["doc:json"].startswith(f"json\n{ast.get_docstring(tree)}\n\n")
  assert f"\n\njson.dumps\n{ast.get_docstring(dumps)}\n\n" in prose["doc:json"]
  assert "\njson.dumps\nSerialize ``obj`` to a JSON formatted ``str``." in prose["doc:json"]
  assert "\n\njson.encoder.JSONEncoder.encode\nReturn a JSON string representation" in prose["doc:json.encoder"]
  assert "json.encoder._make_iterencode" not in prose["doc:json.encoder"]
  assert "doc:email.mime.text" in prose and not any(k.startswith(("doc:test.", "doc:unittest.test")) for k in prose)


def test_file_rules_and_docstring_document_on_a_made_up_stdlib(fake):
  code = dict(embedded.load_records("code", "all"))
  assert code == {"mod.py": MOD, "pkg/__init__.py": '"""Package doc."""\n', "pkg/sub.py": "x = 1\n"}
  prose = dict(embedded.load_records("prose", "all"))
  assert {k for k in prose if not k.startswith("topic:")} == {"doc:mod", "doc:pkg"}
  assert prose["doc:pkg"] == "pkg\nPackage doc."
  assert prose["doc:mod"] == ("mod\nModule doc.\n\nmod.f\nF doc.\n\nmod.outer\nOuter doc.\n\n"
                              "mod.C\nC doc.\n\nIndented detail.\n\nmod.C.m\nM doc.\n\nmod.C.Inner\nInner doc.\n\n"
                              "mod.h\nH doc.\n\nmod.y\nY doc.")
  assert len(prose) == sum(1 for page in topics.topics.values() if page.strip()) + 2


def test_the_first_load_writes_the_cache_and_a_fresh_process_reads_it(fake, monkeypatch):
  paths = {name: embedded.cache_path(name) for name in embedded.CORPORA}
  assert not any(os.path.exists(p) for p in paths.values())
  first = {name: embedded.load_records(name, "all") for name in embedded.CORPORA}
  for name, path in paths.items():  # one build caches every corpus
    assert os.stat(path).st_mode & 0o777 == 0o644
    with open(path, "rb") as f:
      assert json.loads(gzip.decompress(f.read())) == dict(first[name])
  assert f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}" in paths["code"]
  script = "\n".join([
      "import json",
      "from fmjax.data import embedded",
      f"embedded.stdlib_dir = lambda: {fake!r}",
      "def refuse(root):",
      "  raise AssertionError(f'rebuilt the corpora from {root} instead of reading the cache')",
      "embedded._build = refuse",
      "print(json.dumps({name: embedded.load_records(name, 'all') for name in embedded.CORPORA}))"])
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert json.loads(run.stdout) == {name: [list(r) for r in records] for name, records in first.items()}
  monkeypatch.setattr(embedded, "_build", refuse)  # within a process, loads come from memory
  for path in paths.values():
    os.remove(path)
  assert embedded.load_records("code", "all") == first["code"]


def test_a_corrupt_cache_file_is_rebuilt_and_the_rebuild_is_byte_identical(fake):
  path = embedded.cache_path("code")
  embedded.load("code", "all")
  with open(path, "rb") as f:
    good = f.read()
  with open(path, "wb") as f:
    f.write(good[: len(good) // 2])
  embedded._cached.cache_clear()
  assert embedded.load("code", "all") == [MOD, '"""Package doc."""\n', "x = 1\n"]
  with open(path, "rb") as f:
    assert f.read() == good


def test_unknown_corpus_or_split_names_the_choices():
  with pytest.raises(ValueError, match=r"'embedded:poetry' is unknown; embedded corpora: \['code', 'prose'\]"):
    embedded.load("poetry")
  with pytest.raises(ValueError, match=r"split 'dev' is not one of \('train', 'validation', 'all'\)"):
    embedded.load_records("code", "dev")
