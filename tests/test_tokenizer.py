"""SentencePiece tokenizer: exact round trips, fixed special ids, clear errors for missing files and vocab mismatch."""

import subprocess
import sys

import ml_collections
import pytest

from fmjax import config_lib, data
from fmjax.data import sp_tokenizer
from fmjax.data.byte_tokenizer import ByteTokenizer
from fmjax.errors import UserError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "prose512.model")
  sp_tokenizer.train(data.documents("embedded:prose", "train"), 512, path)
  return sp_tokenizer.SentencePieceTokenizer(path)


def test_round_trip_is_exact_for_prose_code_and_unicode(tok):
  samples = [data.documents("embedded:prose", "validation")[0][:2000],
             "def f(x):\n    return {'a': [1, 2]}  # tabs\tand  spaces\n\n",
             "naïve café — 日本語 😀", "<|user|> hi <|end|>"]
  for text in samples:
    assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode(samples[0])) < 0.7 * len(samples[0].encode())  # even 512 pieces merge ~1.8 chars/token


def test_special_ids_and_chat_markers_are_fixed(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 512)
  for i, marker in enumerate(sp_tokenizer.CHAT_MARKERS):
    assert tok.encode(marker).tolist() == [4 + i]  # one reserved id each, right after PAD/UNK/BOS/EOS


def test_training_is_deterministic(tok, tmp_path):
  again = sp_tokenizer.train(data.documents("embedded:prose", "train"), 512, str(tmp_path / "again.model"))
  assert open(again, "rb").read() == open(tok.path, "rb").read()


def test_vocab_mismatch_names_both_sizes_and_the_fix(tok):
  data.check_vocab(tok, 512)
  with pytest.raises(ValueError, match=r"512 ids but model.vocab_size=8192; set model.vocab_size=512"):
    data.check_vocab(tok, 8192)
  with pytest.raises(ValueError, match=r"259 ids but model.vocab_size=256; set model.vocab_size=384"):
    data.check_vocab(ByteTokenizer(), 256)


def test_missing_tokenizer_file_points_to_the_tool(tmp_path):
  cfg = ml_collections.ConfigDict(dict(tokenizer="sentencepiece", tokenizer_path=str(tmp_path / "nope.model"),
                                       source="embedded:prose", vocab_size=512))
  with pytest.raises(UserError, match=r"data.tokenizer_path='.*nope.model' does not exist.*tools/train_tokenizer.py"):
    data.make_tokenizer(cfg)


def test_train_tokenizer_tool(repo, tmp_path):
  out = tmp_path / "t.model"
  ok = subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input=embedded:prose", "--vocab_size=1000",
                       f"--output={out}"], cwd=repo, capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr
  assert sp_tokenizer.SentencePieceTokenizer(str(out)).vocab_size == 1000
  small = subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input=embedded:prose", "--vocab_size=100",
                          f"--output={out}"], cwd=repo, capture_output=True, text=True, timeout=120)
  assert small.returncode != 0 and "vocab_size=100" in small.stderr
  bad = subprocess.run([sys.executable, "tools/train_tokenizer.py", f"--input={tmp_path}/*.txt",
                        f"--output={out}"], cwd=repo, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "matched no files" in bad.stderr


def test_auto_trained_tokenizer_is_cached_under_a_fingerprint(tmp_path, monkeypatch):
  monkeypatch.setenv("FMJAX_CACHE", str(tmp_path))
  cfg = config_lib.base().data
  cfg.vocab_size = 512
  first = data.make_tokenizer(cfg)
  assert data.make_tokenizer(cfg).path == first.path  # reused, not retrained
  cfg.vocab_size = 640
  assert data.make_tokenizer(cfg).path != first.path
  monkeypatch.setattr(sp_tokenizer, "TRAINER_VERSION", sp_tokenizer.TRAINER_VERSION + 1)
  cfg.vocab_size = 512
  assert data.make_tokenizer(cfg).path != first.path  # new trainer settings never reuse an old model
