"""Sources: every file kind, tfds and prepared data give the same records; bad inputs name file, line and fix."""

import hashlib
import json
import os

import numpy as np
import pytest

from fmjax import data
from fmjax.data import ByteTokenizer, formats, prepared
from fmjax.data.sources import WHERE, open_source
import from_config

TEXTS = [f"record {i}: " + "words " * (i % 5 + 1) for i in range(30)]


def texts_of(source):
  return [source[i]["text"] for i in range(len(source))]


def test_every_file_kind_yields_the_same_records(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from array_record.python import array_record_module

  (tmp_path / "j").mkdir()
  for k in range(3):  # three files, read in sorted order
    (tmp_path / "j" / f"part{k}.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n\n" for i, t in enumerate(TEXTS[10 * k:10 * k + 10])))
  (tmp_path / "t").mkdir()
  for i, t in enumerate(TEXTS):
    (tmp_path / "t" / f"{i:03d}.txt").write_text(t)
  pq.write_table(pa.table({"text": TEXTS}), tmp_path / "d.parquet", row_group_size=7)
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
  for t in TEXTS:
    writer.write(json.dumps({"text": t}).encode())
  writer.close()
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / "e.array_record"), "group_size:1")
  writer.write(b"not json")
  writer.close()
  for spec in ("j/*.jsonl", "t/*.txt", "d.parquet", "d.array_record"):
    src = open_source(str(tmp_path / spec), "all")
    assert texts_of(src) == TEXTS, spec
  assert open_source(str(tmp_path / "j/*.jsonl"), "all")[12][WHERE].endswith("part1.jsonl:5")  # blank lines count
  both = open_source(str(tmp_path / "[de].array_record"), "all")
  with pytest.raises(ValueError, match=r"e.array_record:record 0: not a JSON object"):
    both[len(TEXTS)]
  train, val = (open_source(str(tmp_path / "d.parquet"), s, holdout=0.3) for s in ("train", "validation"))
  assert not set(texts_of(train)) & set(texts_of(val)) and sorted(texts_of(train) + texts_of(val)) == sorted(TEXTS)
  assert 3 <= len(val) <= 16


def test_tfds_source_reads_a_locally_built_dataset(tmp_path):
  import tensorflow_datasets as tfds

  class FmjaxTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(TEXTS), "validation": self._generate_examples(TEXTS[:3])}

    def _generate_examples(self, texts):
      for i, t in enumerate(texts):
        yield i, {"text": t}

  FmjaxTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = open_source("tfds:fmjax_tiny_text", "all", tfds_data_dir=str(tmp_path))
  assert sorted(texts_of(src)) == sorted(TEXTS)  # tfds shuffles at build time
  assert len(open_source("tfds:fmjax_tiny_text:validation", "all", tfds_data_dir=str(tmp_path))) == 3
  from fmjax.curation import read  # curation reads the same records, and hashes them (a dataset has no one file)

  curated = read.Input("tfds:fmjax_tiny_text", tfds_data_dir=str(tmp_path))
  items = list(curated)
  assert sorted(r["text"] for _, _, r in items) == sorted(TEXTS) and {s for s, _, _ in items} == {"ok"}
  assert curated.stats()["records"] == 30 and curated.stats()["sha256_of"] == "records"
  assert read.where(["tfds:fmjax_tiny_text"], read.order(0, 7)) == "tfds:fmjax_tiny_text[7]"
  with pytest.raises(ValueError, match="tfds dataset 'fmjax_no_such' .*tfds build"):
    open_source("tfds:fmjax_no_such", "all", tfds_data_dir=str(tmp_path))


def test_bad_inputs_name_the_file_line_field_and_fix(tmp_path):
  with pytest.raises(ValueError, match=r"'.*nothing/\*.jsonl' matched no files; check the path"):
    open_source(str(tmp_path / "nothing/*.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": "broken\n')
  src = open_source(str(bad), "all")
  assert src[0]["text"] == "fine"
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
    src[1]
  other = tmp_path / "other.jsonl"
  other.write_text('{"body": "x"}\n')
  enc = formats.Encoder("text", ByteTokenizer())
  with pytest.raises(ValueError, match=r"other.jsonl:1: missing field 'text'.*\['body'\].*data.field"):
    enc(open_source(str(other), "all")[0])
  with pytest.raises(ValueError, match=r"message 0 has role 'bot'"):
    formats.Encoder("chat", ByteTokenizer())({"messages": [{"role": "bot", "content": "x"}]})
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "a.txt").write_text("x")
  (tmp_path / "m" / "b.jsonl").write_text("{}\n")
  with pytest.raises(ValueError, match=r"files of kinds \['.jsonl', '.txt'\]"):
    open_source(str(tmp_path / "m/*"))


def test_vocab_mismatch_names_both_sizes_and_the_fix():
  with pytest.raises(ValueError, match=r"259 ids but model.vocab_size=512; set model.vocab_size=384"):
    data.check_vocab(ByteTokenizer(), 512)


def test_prepared_data_gives_the_batches_of_the_raw_source(tmp_path, repo):
  """Prepared on Beam with 1 and 2 workers: the same bytes, and the batches of the raw source."""
  from fmjax import config_lib

  (tmp_path / "sft").mkdir()
  for k, (start, stop) in enumerate(((0, 10), (10, 35), (35, 45))):  # a unit per file; the middle one in two shards
    (tmp_path / "sft" / f"part{k}.jsonl").write_text("".join(
        json.dumps({"prompt": f"q{i}", "completion": "a" * (i % 9)}) + "\n" for i in range(start, stop)))
  path = tmp_path / "sft" / "*.jsonl"
  tok = ByteTokenizer()
  metas = [prepared.prepare(str(path), formats.Encoder("prompt_completion", tok), tok, str(tmp_path / f"prep{n}"),
                            records_per_shard=16, num_workers=n, license_id="MIT") for n in (1, 2)]
  assert metas[0]["examples"] == 45 and metas[0]["shards"] == 4
  assert {k: v for k, v in metas[0].items() if k != "seconds"} == {k: v for k, v in metas[1].items() if k != "seconds"}
  names = sorted(os.listdir(tmp_path / "prep1"))
  assert names == sorted(os.listdir(tmp_path / "prep2")) == [
      "data-00000-00000.array_record", "data-00001-00000.array_record", "data-00001-00001.array_record",
      "data-00002-00000.array_record", "manifest.json", "meta.json"]
  for name in names[:4]:
    assert (tmp_path / "prep1" / name).read_bytes() == (tmp_path / "prep2" / name).read_bytes()
  m = json.loads((tmp_path / "prep1" / "manifest.json").read_text())
  assert m["tool"] == "prepare" and [i["records"] for i in m["inputs"]] == [10, 25, 10]
  assert [i["license"] for i in m["inputs"]] == ["MIT"] * 3 and m["unknown_license_inputs"] == 0
  assert m["inputs"][1]["sha256"] == hashlib.sha256((tmp_path / "sft" / "part1.jsonl").read_bytes()).hexdigest()
  assert m["rules"]["tokenizer"] == metas[0]["tokenizer"] and m["counts"]["examples"] == 45
  assert [o["file"] for o in m["outputs"]] == names[:4]
  c = config_lib.base()
  c.data.tokenizer, c.train.seq_len, c.train.batch_size = "bytes", 32, 4
  batches = {}
  for spec in (str(path), f"prepared:{tmp_path / 'prep2'}"):
    c.data.source = spec
    it = iter(from_config.train_dataset(c, tok)[0])
    batches[spec] = [next(it) for _ in range(6)]
  for a, b in zip(*batches.values()):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="already holds prepared data"):
    prepared.prepare(str(path), formats.Encoder("text", tok), tok, str(tmp_path / "prep1"))
  meta_path = tmp_path / "prep1" / "meta.json"
  meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "tokenizer": "sentencepiece:0123"}))
  c.data.source = f"prepared:{tmp_path / 'prep1'}"
  with pytest.raises(ValueError, match="was tokenized with sentencepiece:0123 .* set data.tokenizer_path"):
    from_config.train_dataset(c, tok)


def test_prepare_data_tool_writes_a_source_the_trainer_reads(repo, tmp_path):
  import subprocess
  import sys

  out = tmp_path / "prep"
  run = subprocess.run([sys.executable, "tools/prepare_data.py", "--source=embedded:prose", f"--output={out}",
                        "--config=configs/pretrain.py:smoke"], cwd=repo, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  meta = json.loads((out / "meta.json").read_text())
  assert meta["format"] == "text" and meta["examples"] == len(data.documents("embedded:prose", "all"))
  again = subprocess.run([sys.executable, "tools/prepare_data.py", "--source=nowhere/*.jsonl", f"--output={out}2"],
                         cwd=repo, capture_output=True, text=True)
  assert again.returncode != 0 and "'nowhere/*.jsonl' matched no files" in again.stderr
