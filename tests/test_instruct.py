"""`embedded:instruct`: api entries, the three tasks built from real docstrings, filters, the module-level held-out
split and its consistency with `embedded:prose`, and chat encoding."""

import asyncio
import collections
import inspect
import json
import os
import shutil

import numpy as np
import pytest

import fmjax.data
from fmjax.data import embedded, formats, instruct
from fmjax.data.sources import open_source

SPLITS = ("train", "validation", "all")
END = "<|end|>"  # the default chat template's end marker (plain bytes to ByteTokenizer)

MOD = '''"""Module doc."""

def f(a, b=1, *args, c, **kw) -> int:
  """F doc."""

async def g(x):
  """G doc."""

def _private():
  """Private."""

def bare():
  pass

def outer():
  """Outer doc."""
  def inner():
    """Not API."""

class C:
  """C doc."""
  def m(self, /, y=None):
    """M doc."""
  class Inner:
    def deep(self):
      """Deep doc."""

class _Hidden:
  def shown(self):
    """Method of a private class."""

if X:
  def h():
    """H first."""
else:
  def h():
    """H second."""
'''


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, dict]]:
  """split -> key -> record of the real corpus (built once per process)."""
  return {split: dict(instruct.load_records(split)) for split in SPLITS}


def qualname(key: str) -> str:
  return key.split(":", 1)[1]


def joined(paragraph: str) -> str:
  return " ".join(line.strip() for line in paragraph.splitlines())


def test_api_entries_follow_the_doc_rules_on_a_made_up_stdlib(tmp_path, monkeypatch):
  lib = tmp_path / "lib"
  (lib / "pkg").mkdir(parents=True)
  (lib / "mod.py").write_text(MOD)
  (lib / "pkg" / "__init__.py").write_text('def p():\n  """P doc."""\n')
  monkeypatch.setattr(embedded, "stdlib_dir", lambda: str(lib))
  monkeypatch.setenv("FMJAX_CACHE", str(tmp_path / "cache"))
  def entry(module, signature, doc):
    return {"module": module, "signature": signature, "doc": doc}
  assert embedded.api_entries() == {
      "mod.f": entry("mod", "def f(a, b=1, *args, c, **kw) -> int", "F doc."),
      "mod.g": entry("mod", "async def g(x)", "G doc."),
      "mod.outer": entry("mod", "def outer()", "Outer doc."),
      "mod.C.m": entry("mod", "def m(self, /, y=None)", "M doc."),
      "mod.C.Inner.deep": entry("mod", "def deep(self)", "Deep doc."),
      "mod.h": entry("mod", "def h()", "H first."),  # the first of two platform variants
      "pkg.p": entry("pkg", "def p()", "P doc.")}
  assert os.path.isfile(embedded.cache_path("api"))
  assert "-v2-" in embedded.cache_path("api")  # the format changed: caches of version 1 are not read


def test_json_dumps_makes_the_three_records_from_its_real_docstring(records):
  paragraph = inspect.getdoc(json.dumps).split("\n\n")[0]
  assert paragraph == "Serialize ``obj`` to a JSON formatted ``str``."
  prose_validation = {key for key, _ in embedded.load_records("prose", "validation")}
  side = "validation" if "doc:json" in prose_validation else "train"
  got = records[side]
  assert got["explain:json.dumps"] == {
      "messages": [{"role": "user", "content": "What does `json.dumps` do?"},
                   {"role": "assistant", "content": paragraph}], "task": "explain"}
  signature = f"def dumps{inspect.signature(json.dumps)}"
  assert got["summarize:json.dumps"]["messages"] == [
      {"role": "user", "content": f"Summarize this function in one sentence:\n{signature}"},
      {"role": "assistant", "content": paragraph}]
  assert got["name:json.dumps"]["messages"] == [
      {"role": "user", "content": f"Which function of the `json` module does this? {paragraph}"},
      {"role": "assistant", "content": "`json.dumps`"}]


def test_multi_line_paragraphs_are_joined_and_summaries_keep_the_first_sentence(records):
  everything = records["all"]
  loads = joined(inspect.getdoc(json.loads).split("\n\n")[0])
  assert loads.startswith("Deserialize ``s`` (a ``str``, ``bytes`` or ``bytearray`` instance containing a JSON")
  assert everything["explain:json.loads"]["messages"][1]["content"] == loads
  move = joined(inspect.getdoc(shutil.move).split("\n\n")[0])
  assert everything["explain:shutil.move"]["messages"][1]["content"] == move
  assert everything["summarize:shutil.move"]["messages"][1]["content"] == (
      "Recursively move a file or directory to another location.")
  assert len(move) > 100  # the summary really is shorter than the explanation
  sleep = everything["summarize:asyncio.tasks.sleep"]["messages"][0]["content"]
  assert sleep == f"Summarize this function in one sentence:\nasync def sleep{inspect.signature(asyncio.sleep)}"
  encode = everything["name:json.encoder.JSONEncoder.encode"]["messages"]
  assert encode[0]["content"] == ("Which function of the `json.encoder` module does this? Return a JSON string "
                                  "representation of a Python data structure.")
  assert encode[1]["content"] == "`json.encoder.JSONEncoder.encode`"


def test_filters_drop_signature_lines_short_paragraphs_and_ambiguous_names(records):
  everything = records["all"]
  names = {qualname(k) for k in everything}
  assert inspect.getdoc(os.makedirs).startswith("makedirs(name [, mode=0o777][, exist_ok=False])")
  assert "os.makedirs" not in names  # a C-style signature line
  assert "datetime.date.year" not in names  # "year (1-9999)": too short
  assert instruct.first_sentence("Create an archive file (eg. zip or tar). Return its name.") == (
      "Create an archive file (eg. zip or tar).")
  # "Remove and return an item from the queue." also opens asyncio.Queue.get's docstring
  assert {"explain:queue.Queue.get", "summarize:queue.Queue.get"} <= set(everything)
  assert "name:queue.Queue.get" not in everything
  sentences = collections.Counter(r["messages"][1]["content"] for k, r in everything.items() if k.startswith("summ"))
  for key, record in everything.items():
    assert key == f"{record['task']}:{qualname(key)}"
    question, answer = (m["content"] for m in record["messages"])
    if record["task"] == "explain":
      assert instruct.MIN_CHARS <= len(answer) <= instruct.MAX_CHARS, key
    if record["task"] == "name":
      sentence = question.split(" module does this? ", 1)[1]
      assert sentences[sentence] == 1, key
    if record["task"] == "summarize":
      assert len(question.split("\n", 1)[1]) <= instruct.MAX_SIGNATURE, key


def test_train_and_validation_split_by_module_and_make_up_all(records):
  for split in SPLITS:
    assert list(records[split]) == sorted(records[split])
  train, validation, everything = (set(records[s]) for s in SPLITS)
  assert not train & validation and train | validation == everything
  module = {name: entry["module"] for name, entry in embedded.api_entries().items()}
  train_modules = {module[qualname(k)] for k in train}
  validation_modules = {module[qualname(k)] for k in validation}
  assert not train_modules & validation_modules
  counts = {s: collections.Counter(r["task"] for r in records[s].values()) for s in SPLITS}
  print(f"\ninstruct records: {counts}; modules: {len(train_modules)} train, {len(validation_modules)} validation")
  assert sum(counts["train"].values()) > 5000 and sum(counts["validation"].values()) > 300
  for task in instruct.TASKS:
    assert counts["train"][task] > 2000 and counts["validation"][task] > 100, task
  assert len(validation_modules) > 20


def test_held_out_modules_are_prose_held_out_modules_and_their_docstrings_are_unseen(records):
  prose_train = {key: text for key, text in embedded.load_records("prose", "train")}
  prose_validation = {key for key, _ in embedded.load_records("prose", "validation")}
  entries = embedded.api_entries()
  held = {entries[qualname(k)]["module"] for k in records["validation"]}
  assert {f"doc:{m}" for m in held} <= prose_validation
  assert not {f"doc:{m}" for m in held} & set(prose_train)
  for key in records["train"]:
    assert f"doc:{entries[qualname(key)]['module']}" in prose_train, key
  seen = "\n\n".join(prose_train.values())
  for name in {qualname(k) for k in records["validation"]}:
    assert f"\n{name}\n" not in seen, name  # its header, so its docstring, is in no train document
    assert entries[name]["doc"].split("\n\n")[0] not in seen, name  # nor is a copy under another name
  if "doc:asyncio.queues" in prose_validation:  # held out on CPython 3.11
    # its Queue.get repeats queue.Queue.get's first line, which train documents hold: no record
    assert "Remove and return an item from the queue." in seen
    assert not any(qualname(k) == "asyncio.queues.Queue.get" for k in records["all"])


def test_source_records_encode_with_loss_on_exactly_the_answer(records):
  source = open_source("embedded:instruct", "validation")
  assert len(source) == len(records["validation"])
  tokenizer = fmjax.data.ByteTokenizer()
  encode = formats.Encoder("chat", tokenizer)
  for i in range(0, len(source), 97):
    record = source[i]
    key = list(records["validation"])[i]
    assert record["_where"] == f"embedded:instruct[{key}]"
    assert formats.detect(record, "text") == "chat"
    answer = record["messages"][1]["content"]
    example = encode(record)
    mask = example["loss_mask"].astype(bool)
    first = int(np.argmax(mask))
    assert mask[first:].all() and not mask[:first].any()  # the answer is the sequence's tail
    masked = example["targets"][mask]
    assert masked[-1] == tokenizer.eos_id and len(masked) == len((answer + END).encode()) + 1
    assert tokenizer.decode(masked) == answer + END
    assert tokenizer.decode(example["targets"][~mask]).endswith(END + "<|assistant|>")
  record = source[0]
  record["messages"].clear()  # a caller's edit reaches no other reader
  assert source[0]["messages"]


def test_documents_read_the_messages_and_unknown_names_list_instruct(records):
  texts = fmjax.data.documents("embedded:instruct", "validation")
  assert texts == [m["content"] for r in records["validation"].values() for m in r["messages"]]
  with pytest.raises(ValueError, match=r"'embedded:poetry' is unknown; embedded corpora: "
                                       r"\['code', 'instruct', 'preference', 'prose', 'sort', 'sort_pairs', 'topics'\]"):
    open_source("embedded:poetry")
  with pytest.raises(ValueError, match="split 'dev'"):
    instruct.load_records("dev")
