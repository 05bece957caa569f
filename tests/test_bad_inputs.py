"""Bad input files, as a user meets them: chat messages with null or non-text content, a one-record source, a
tokenizer path that is a directory, a tokenizer corpus of one very long line, empty preference responses, a curation
--overwrite that fails, and damaged Hugging Face downloads. Each ends in one line `fmjax: error: <message>` naming
the file (or record, or key) and the fix, exit code 2, no traceback, no input changed; or, where it is supported
input (chat content as a list of text parts, a long line), it works.

Each row is one subprocess; without pytest-xdist the selected rows run concurrently (as in tests/test_errors.py).
The in-process tests below pin the pieces (the encoder, the long-line splitter, the curation swap) more finely.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

import subprocess_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**{k: v for k, v in os.environ.items() if k != "FMJAX_DEBUG"},
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
TIMEOUT = 120
PRETRAIN = "--config=configs/pretrain.py:smoke"
BYTES = ("--config.data.tokenizer=bytes", "--config.model.vocab_size=384")  # no tokenizer to train: cheap rows
TOKENIZER_VOCAB = 300  # the sentencepiece model the fixture trains; the model's vocabulary is it padded to 384
WORDS = ("river stone cloud light quick brown fox jumps over lazy dog alpha beta gamma delta sea wind fire earth metal "
         "wood water tree leaf root branch north south east west morning evening winter summer bridge garden").split()


@dataclasses.dataclass(frozen=True)
class Row:
  id: str
  args: tuple[str, ...]  # after `python -m fmjax.main` (or the tool); {files} and {tmp} are filled in
  names: tuple[str, ...] = ()  # what the message must name (file, record, key)
  fix: str = ""  # a word of the fix the message must give
  tool: str = ""  # tools/<tool>.py; empty: fmjax.main
  workdir: bool = True  # fmjax.main: --workdir={tmp}/run, where an error must write nothing (a lock file at most)
  ok: bool = False  # supported input: the command must succeed

  def argv(self, files: str, tmp: str) -> list[str]:
    args = [a.format(files=files, tmp=tmp) for a in self.args]
    if self.workdir and not self.tool:
      args.append(f"--workdir={os.path.join(tmp, 'run')}")
    return [sys.executable, *([f"tools/{self.tool}.py"] if self.tool else ["-m", "fmjax.main"]), *args]


ROWS = [
    # 1. chat content: null and a non-text part are errors naming the record and message; text parts train
    Row("chat_content_null", (PRETRAIN, *BYTES, "--config.data.source={files}/chat_null.jsonl"),
        ("{files}/chat_null.jsonl:1: message 1 (assistant) has content null",), "give it text"),
    Row("chat_content_image_part", (PRETRAIN, *BYTES, "--config.data.source={files}/chat_image.jsonl"),
        ("{files}/chat_image.jsonl:1: message 0 (user), content part 1", "'image_url'"), "remove the other parts"),
    Row("chat_content_text_parts_train", (PRETRAIN, *BYTES, "--config.data.source={files}/chat_parts.jsonl",
                                          "--config.train.steps=2", "--config.optimizer.warmup_steps=0",
                                          "--config.eval.every_steps=0", "--config.data.holdout=0"), ok=True),
    # 2. a one-record source: its only record is held out, leaving nothing to train on (was an IndexError)
    Row("one_record_with_tokenizer_path", (PRETRAIN, "--config.data.source={files}/one.jsonl",
                                           "--config.data.tokenizer_path={files}/tok.model",
                                           "--config.model.vocab_size=384"),
        ("'{files}/one.jsonl' has 1 record", "data.holdout=0.1"), "set data.holdout=0"),
    Row("one_record_sft_with_tokenizer_path", ("--config=configs/sft.py:smoke", "--config.init_from.bootstrap=",
                                               "--config.data.source={files}/one_chat.jsonl",
                                               "--config.data.tokenizer_path={files}/tok.model",
                                               "--config.model.vocab_size=384"),
        ("'{files}/one_chat.jsonl' has 1 record",), "set data.holdout=0"),
    Row("one_record_auto_tokenizer", (PRETRAIN, "--config.data.source={files}/one.jsonl"),
        ("'{files}/one.jsonl' has 1 record",), "set data.holdout=0"),
    Row("train_tokenizer_one_txt_file", ("--input={files}/long.txt", "--output={tmp}/tok.model"),
        ("'{files}/long.txt' has 1 record", "--holdout=0.1"), "set --holdout=0", tool="train_tokenizer"),
    # 3. a tokenizer path that is a directory: name the tokenizer file in it, or say there is none
    Row("tokenizer_path_is_a_directory", (PRETRAIN, "--config.data.tokenizer_path={files}/tokdir"),
        ("data.tokenizer_path='{files}/tokdir' is a directory",), "set data.tokenizer_path={files}/tokdir/tok.model"),
    Row("tokenizer_path_is_an_empty_directory", (PRETRAIN, "--config.data.tokenizer_path={files}/emptydir"),
        ("data.tokenizer_path='{files}/emptydir' is a directory", "holds no .model or tokenizer.json"),
        "tools/train_tokenizer.py"),
    # 4. one line far longer than sentencepiece's max_sentence_length (which skipped it): cut into pieces, trains
    Row("train_tokenizer_long_line", ("--input={files}/long.txt", "--holdout=0", "--vocab_size=400",
                                      "--output={tmp}/long.model"), tool="train_tokenizer", ok=True),
    # 5. an empty preference response (was loss 0.0000 and exit 0): the first record's, by file and field
    Row("preference_empty_chosen", ("--config=configs/dpo.py:smoke", "--config.init_from.bootstrap=", *BYTES,
                                    "--config.data.source={files}/pref_empty.jsonl"),
        ("{files}/pref_empty.jsonl:1: field 'chosen' is empty",), "remove the record"),
    # 6. a curation --overwrite that fails at a bad record leaves the old shards and manifest as they were
    Row("curate_overwrite_that_fails", ("--input={files}/corpus/*.jsonl", "--output={files}/curated", "--overwrite"),
        ("{files}/corpus/bad.jsonl:2",), "--on_error=skip", tool="curate"),
    # 7. damaged Hugging Face downloads: named, with what is wrong and the fix
    Row("convert_truncated_safetensors", ("import", "--hf_dir={files}/hf_truncated", "--workdir={tmp}/run"),
        ("{files}/hf_truncated/model.safetensors is truncated: its header says",), "download it again",
        tool="convert_hf"),
    Row("convert_truncated_header", ("import", "--hf_dir={files}/hf_header", "--workdir={tmp}/run"),
        ("{files}/hf_header/model.safetensors is truncated", "header bytes, the file has 200 bytes"),
        "download it again", tool="convert_hf"),
    Row("convert_malformed_config", ("import", "--hf_dir={files}/hf_config", "--workdir={tmp}/run"),
        ("{files}/hf_config/config.json is not valid JSON",), "download it again", tool="convert_hf"),
]


def snapshot(root: str) -> dict[str, tuple[int, str]]:
  """(size, sha256) of every file under `root` (a failed run may create and remove its scratch directories)."""
  out = {}
  for directory, _, files in os.walk(root):
    for name in files:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[path] = (os.path.getsize(path), hashlib.sha256(f.read()).hexdigest())
  return out


def text(rng: random.Random, words: int) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(words))


def chat(*contents) -> dict:
  return {"messages": [{"role": role, "content": c} for role, c in zip(("user", "assistant"), contents)]}


def write_jsonl(path, records) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_hf_model(directory: str) -> None:
  """A tiny Llama checkpoint in Hugging Face's layout: config.json and model.safetensors."""
  from fmjax.interop import hf, hf_config, safetensors_io
  from fmjax.model.config import ModelConfig

  cfg = ModelConfig(vocab_size=64, loss_chunk=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                    mlp_dim=32)
  os.makedirs(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config.from_model_config(cfg), f)
  shapes = {name: shape for _, _, name, shape in hf.tensor_specs(cfg)}
  safetensors_io.write(directory, [(n, np.float32, s) for n, s in shapes.items()],
                       lambda name: np.full(shapes[name], 0.01, np.float32))


def curated_output_is_valid(directory: str) -> None:
  """The manifest names exactly the shards in `directory`, with their sha256, and nothing is left half-done."""
  with open(os.path.join(directory, "manifest.json")) as f:
    outputs = json.load(f)["outputs"]
  shards = sorted(n for n in os.listdir(directory) if n.startswith("curated-"))
  assert sorted(o["file"] for o in outputs) == shards and shards, (outputs, shards)
  for o in outputs:
    with open(os.path.join(directory, o["file"]), "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == o["sha256"], o
  assert not [n for n in os.listdir(directory) if n.startswith(".curating-") or n.endswith(".partial")]


@dataclasses.dataclass
class Inputs:
  files: str
  root: str  # each row's scratch directory is root/<row id>
  before: dict[str, tuple[int, str]]

  def tmp(self, row: Row) -> str:
    return subprocess_rows.scratch(self.root, row.id)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
  from fmjax.data import sp_tokenizer

  base = tmp_path_factory.mktemp("bad_inputs")
  files, root = base / "files", base / "rows"
  for d in (files / "tokdir", files / "emptydir", files / "corpus", root):
    d.mkdir(parents=True)
  rng = random.Random(0)
  write_jsonl(files / "chat_null.jsonl", [chat("say hi", None)] + [chat("say hi", "hi")] * 3)
  write_jsonl(files / "chat_image.jsonl", [chat([{"type": "text", "text": "what is this?"},
                                                 {"type": "image_url", "image_url": {"url": "cat.png"}}], "a cat")] * 4)
  write_jsonl(files / "chat_parts.jsonl", [chat([{"type": "text", "text": text(rng, 5)}, {"type": "text", "text": "?"}],
                                                [{"type": "text", "text": text(rng, 8)}]) for _ in range(16)])
  write_jsonl(files / "one.jsonl", [{"text": text(rng, 40)}])
  write_jsonl(files / "one_chat.jsonl", [chat(text(rng, 5), text(rng, 8))])
  write_jsonl(files / "pref_empty.jsonl", [{"prompt": text(rng, 5), "chosen": "", "rejected": text(rng, 6)}
                                           for _ in range(8)])
  sp_tokenizer.train([text(rng, 30) for _ in range(2000)], TOKENIZER_VOCAB, str(files / "tok.model"))
  shutil.copyfile(files / "tok.model", files / "tokdir" / "tok.model")
  (files / "long.txt").write_text(text(rng, 400_000))  # one line of ~2 MB, ~500 times max_sentence_length
  write_jsonl(files / "corpus" / "good.jsonl", [{"text": f"{text(rng, 60)} number {i}."} for i in range(12)])
  proc = subprocess.run([sys.executable, "tools/curate.py", f"--input={files}/corpus/good.jsonl",
                         f"--output={files}/curated", "--num_shards=2"], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  curated_output_is_valid(str(files / "curated"))
  (files / "corpus" / "bad.jsonl").write_text(json.dumps({"text": text(rng, 60)}) + "\n" + '{"text": broken\n')
  write_hf_model(str(files / "hf"))
  for variant in ("hf_truncated", "hf_header", "hf_config"):
    shutil.copytree(files / "hf", files / variant)
  weights = files / "hf_truncated" / "model.safetensors"
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) - 100)  # the last tensor's data is cut short
  with open(files / "hf_header" / "model.safetensors", "r+b") as f:
    f.truncate(200)  # inside the JSON header
  config = (files / "hf_config" / "config.json").read_text()
  (files / "hf_config" / "config.json").write_text(config[:len(config) // 2])
  return Inputs(str(files), str(root), snapshot(str(files)))


def trained_two_steps(tmp: str) -> None:
  with open(os.path.join(tmp, "run", "metrics.jsonl")) as f:
    assert max(json.loads(line).get("step", 0) for line in f) == 2


def learned_the_long_line(tmp: str) -> None:
  from fmjax.data import sp_tokenizer

  tok = sp_tokenizer.SentencePieceTokenizer(os.path.join(tmp, "long.model"))
  sample = text(random.Random(1), 200)
  assert tok.vocab_size == 400 and len(sample) / len(tok.encode(sample)) > 3.0  # its words, not byte fallback


SUPPORTED = {"chat_content_text_parts_train": trained_two_steps, "train_tokenizer_long_line": learned_the_long_line}


def execute(row: Row, inputs: Inputs) -> subprocess.CompletedProcess:
  return subprocess.run(row.argv(inputs.files, inputs.tmp(row)), cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=TIMEOUT)


@pytest.fixture(scope="module")
def prefetched(request, inputs) -> dict[str, subprocess.CompletedProcess]:
  return subprocess_rows.prefetch(request, Row, lambda r: execute(r, inputs))


def test_rows_are_distinct():
  assert len({r.id for r in ROWS}) == len(ROWS)
  assert all(r.ok or (r.names and r.fix) for r in ROWS)
  assert {r.id for r in ROWS if r.ok} == set(SUPPORTED)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input_is_one_line_naming_it_and_the_fix(row: Row, inputs: Inputs, prefetched):
  proc = prefetched[row.id] if row.id in prefetched else execute(row, inputs)
  output = proc.stdout + proc.stderr
  assert "Traceback" not in output, output[-3000:]
  assert snapshot(inputs.files) == inputs.before, "a row changed its input files"
  tmp = inputs.tmp(row)
  if row.ok:
    assert proc.returncode == 0, output[-3000:]
    SUPPORTED[row.id](tmp)
    return
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, output[-3000:]
  assert lines and lines[-1].startswith("fmjax: error: "), output[-3000:]
  message = lines[-1]
  for name in row.names:
    assert name.format(files=inputs.files, tmp=tmp) in message, message
  assert row.fix.format(files=inputs.files, tmp=tmp) in message, message
  if row.tool == "curate":  # beyond unchanged files: no staging directory left behind
    curated_output_is_valid(os.path.join(inputs.files, "curated"))
  run = os.path.join(tmp, "run")
  assert not os.path.isdir(run) or all(n.startswith(".") for n in os.listdir(run)), "the run wrote its directory"


# In-process: the pieces behind the rows.

def test_chat_content_as_text_parts_encodes_as_the_joined_string():
  from fmjax.data import ByteTokenizer, formats
  from fmjax.errors import UserError

  encode = formats.Encoder("chat", ByteTokenizer())
  parts = chat([{"type": "text", "text": "Hello "}, "there", {"type": "input_text", "text": "!"}],
               [{"type": "text", "text": "Hi."}])
  joined = encode(chat("Hello there!", "Hi."))
  assert {k: v.tolist() for k, v in encode({**parts, "_where": "a.jsonl:3"}).items()} == \
      {k: v.tolist() for k, v in joined.items()}
  assert formats.texts(parts) == ["Hello there!", "Hi."]  # what an auto-trained tokenizer learns from
  for content, words in ((None, "message 1 (assistant) has content null"), (7, "content of type int"),
                         ([{"type": "image_url"}], "content part 0 is of type 'image_url'"),
                         ([{"text": "no type"}], "content part 0 is of type None")):
    with pytest.raises(UserError) as e:
      encode({**chat("q", content), "_where": "a.jsonl:3"})
    assert str(e.value).startswith("a.jsonl:3: message 1 (assistant)") and words in str(e.value), str(e.value)


def test_an_empty_preference_side_is_an_error_naming_the_record_and_field():
  from fmjax.data import ByteTokenizer, DataError, formats

  encode = formats.Encoder("preference", ByteTokenizer())
  pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "yes"}],
          "rejected": [{"role": "assistant", "content": "no"}], "_where": "p.jsonl:7"}
  assert encode(pair)["chosen_loss_mask"].sum() > 0
  for side, value in (("rejected", [{"role": "assistant", "content": ""}]), ("chosen", "  "),
                      ("rejected", [{"role": "assistant", "content": [{"type": "text", "text": ""}]}])):
    with pytest.raises(DataError, match=f"p.jsonl:7: field '{side}' is empty; .* or remove the record"):
      encode({**pair, side: value})


def test_long_lines_are_cut_at_spaces_and_character_boundaries():
  from fmjax.data.sp_tokenizer import MAX_SENTENCE_BYTES, split_long

  rng = random.Random(2)
  for _ in range(100):
    line = "".join(rng.choice("ab é€😀  ") for _ in range(rng.randint(0, 3000)))
    limit = rng.randint(8, 400)
    pieces = split_long(line, limit)
    assert "".join(pieces) == line and all(0 < len(p.encode()) <= limit for p in pieces)
  words = text(rng, 5000)
  pieces = split_long(words)
  assert len(pieces) > 1 and all(p.endswith(" ") for p in pieces[:-1])  # words stay whole
  assert all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in pieces)


def test_a_successful_overwrite_replaces_the_output_and_keeps_other_files(tmp_path):
  from fmjax import curation
  from fmjax.curation.read import CurationError

  rng = random.Random(3)
  write_jsonl(tmp_path / "in.jsonl", [{"text": f"{text(rng, 60)} number {i}."} for i in range(12)])
  out = tmp_path / "out"
  curation.run([str(tmp_path / "in.jsonl")], str(out), num_shards=3)
  (out / "NOTES.md").write_text("the user's own file\n")
  (tmp_path / "bad.jsonl").write_text('{"text": broken\n')
  with pytest.raises(CurationError, match="bad.jsonl:1: not valid JSON"):
    curation.run([str(tmp_path / "*.jsonl")], str(out), overwrite=True)
  assert len([n for n in os.listdir(out) if n.startswith("curated-")]) == 3
  curated_output_is_valid(str(out))
  os.remove(tmp_path / "bad.jsonl")
  report = curation.run([str(tmp_path / "in.jsonl")], str(out), overwrite=True)
  assert sorted(os.listdir(out)) == ["NOTES.md", "curated-00000-of-00001.jsonl", "manifest.json", "report.json"]
  curated_output_is_valid(str(out))
  assert report["kept_docs"] == 12
  assert not [n for n in os.listdir(tmp_path) if n not in ("in.jsonl", "out")]
