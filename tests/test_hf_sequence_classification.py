"""Hugging Face sequence classifiers and reward models (`*ForSequenceClassification`) ↔ fmjax score models
(`model.num_labels` > 0): imports whose per-token scores at each row's last real token equal transformers' pooled
logits, exports that `AutoModelForSequenceClassification` reloads with the same scores and bitwise weights.

Tiny random models are built from configs (no download). Needs the `hf` extra (torch, transformers).
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fmjax  # noqa: E402
from fmjax.errors import UserError  # noqa: E402
from fmjax.interop import hf, hf_config, safetensors_io  # noqa: E402
from fmjax.model import ModelConfig, Transformer, init_params  # noqa: E402
from fmjax.train import weights  # noqa: E402

VOCAB = 320
BOS, EOS = 0, 1  # the tokenizer's first special tokens; it has no pad token, so its pad id is EOS
TEXT = "The quick brown fox jumps over the lazy dog. Digits 12345, tabs\tand new\nlines. " * 8
LENGTHS = (24, 17, 9)  # a full row and two right-padded ones
TOKENS = np.random.default_rng(0).integers(8, VOCAB, (len(LENGTHS), max(LENGTHS))).astype(np.int32)  # no specials


def save_tokenizer(directory: str) -> None:
  """A byte-level BPE tokenizer.json with BOS and EOS and no pad token."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator([TEXT], trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                              eos_token="<|end_of_text|>")
  assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (BOS, EOS, None)
  fast.save_pretrained(directory)


def hf_classifier(family: str, directory: str, num_labels: int, pad_token_id: int | None = EOS) -> str:
  """A random-init `*ForSequenceClassification` of `family` (norms and biases perturbed so every tensor matters)
  with `num_labels` labels, saved with a tokenizer into `directory`."""
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
                num_labels=num_labels, pad_token_id=pad_token_id, bos_token_id=BOS, eos_token_id=EOS)
  if family == "llama":
    config = transformers.LlamaConfig(**common, rope_theta=500_000.0)
  else:  # Qwen2: QKV bias; tied embeddings, which a classifier (no lm_head) ignores
    config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
  transformers.set_seed(0)
  model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(directory)
  save_tokenizer(directory)
  return directory


def padded(pad: int) -> tuple[np.ndarray, np.ndarray]:
  """(TOKENS right-padded with `pad` to LENGTHS, the 0/1 mask of real tokens)."""
  real = (np.arange(TOKENS.shape[1])[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
  return np.where(real == 1, TOKENS, pad).astype(np.int32), real


def hf_scores(directory: str) -> np.ndarray:
  """transformers' logits [B, num_labels], pooled at each row's last non-pad token."""
  model = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
  tokens, real = padded(model.config.pad_token_id)
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(real).long()).logits.numpy()


def fmjax_scores(cfg: ModelConfig, params: dict) -> np.ndarray:
  """fmjax's per-token scores read at each row's last real token [B, num_labels] (padding: segment 0)."""
  tokens, real = padded(0)
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  out = Transformer(cfg).apply({"params": params}, tokens, real, positions)
  assert out.shape == (*tokens.shape, cfg.num_labels) and out.dtype == np.float32
  return np.asarray(out)[np.arange(len(LENGTHS)), np.asarray(LENGTHS) - 1]


CASES = (("llama", 1), ("llama", 3), ("qwen2", 2))


@pytest.fixture(scope="module")
def importer(tmp_path_factory):
  """(family, num_labels) → (HF dir, imported fmjax run dir, transformers' scores), built once each."""
  cache = {}

  def get(family: str, num_labels: int):
    if (family, num_labels) not in cache:
      root = tmp_path_factory.mktemp(f"{family}{num_labels}")
      source = hf_classifier(family, str(root / "hf"), num_labels)
      hf.import_dir(source, str(root / "run"))
      cache[family, num_labels] = source, str(root / "run"), hf_scores(source)
    return cache[family, num_labels]

  return get


@pytest.mark.parametrize("family,num_labels", CASES)
def test_import_matches_transformers_pooled_logits(importer, family, num_labels):
  source, run, theirs = importer(family, num_labels)
  assert theirs.shape == (len(LENGTHS), num_labels) and np.abs(theirs).max() > 0.1
  model = fmjax.load(run)
  assert model.config.num_labels == num_labels and set(model.params) == {"embedding", "final_norm", "layers", "score"}
  assert model.params["score"].shape == (64, num_labels)
  ours = fmjax_scores(model.config, model.params)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
  cfg, params, _, _ = hf.load(source)  # converted in memory: the same weights
  jax.tree.map(np.testing.assert_array_equal, params, weights.read_params(run)[0])
  assert cfg.num_labels == num_labels


@pytest.mark.parametrize("family,num_labels", CASES)
def test_export_reloads_in_transformers_and_round_trips_bitwise(importer, family, num_labels, tmp_path):
  source, run, theirs = importer(family, num_labels)
  out = str(tmp_path / "exported")
  hf.export_dir(run, out)
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["architectures"] == [hf_config.CLASSIFIERS[family]] and config["pad_token_id"] == EOS
  assert config["id2label"] == {str(i): f"LABEL_{i}" for i in range(num_labels)}
  assert not os.path.exists(os.path.join(out, "generation_config.json"))
  np.testing.assert_allclose(hf_scores(out), theirs, rtol=0, atol=1e-4)
  original, exported = safetensors_io.Reader(source), safetensors_io.Reader(out)
  assert sorted(exported.keys()) == sorted(original.keys()) and "lm_head.weight" not in exported
  for name in exported.keys():
    np.testing.assert_array_equal(exported.get(name), original.get(name), err_msg=name)
  assert exported.get("score.weight").shape == (num_labels, 64)


def test_export_fills_the_pad_token_id_transformers_leaves_null(tmp_path):
  """transformers writes `"pad_token_id": null` for Llama; without a pad id its classifier refuses batches > 1, so
  the export sets the tokenizer's (which, lacking a pad token, is its EOS)."""
  source = hf_classifier("llama", str(tmp_path / "hf"), 1, pad_token_id=None)
  with open(os.path.join(source, "config.json")) as f:
    assert json.load(f)["pad_token_id"] is None
  run = str(tmp_path / "run")
  hf.import_dir(source, run)
  model = fmjax.load(run)
  out = str(tmp_path / "exported")
  hf.export_dir(run, out)
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out)
  assert reloaded.config.pad_token_id == EOS
  np.testing.assert_allclose(hf_scores(out), fmjax_scores(model.config, model.params), rtol=0, atol=1e-4)


def test_reward_model_over_an_imported_language_model_exports_as_a_classifier(tmp_path):
  """A score model whose run descends from an imported causal LM (init_from): the LM's config.json is the template,
  and the export is a `LlamaForSequenceClassification` with one label and a pad id, without generation config."""
  transformers.set_seed(0)
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.1))
  lm.save_pretrained(str(tmp_path / "lm"))
  save_tokenizer(str(tmp_path / "lm"))
  base = str(tmp_path / "base")
  hf.import_dir(str(tmp_path / "lm"), base)
  assert fmjax.load(base).config.num_labels == 0  # a causal LM stays a language model

  config = weights.run_config(base)
  config.model.num_labels = 1
  config.init_from.workdir = base
  cfg = dataclasses.replace(fmjax.load(base).config, num_labels=1)
  params = {k: v for k, v in weights.read_params(base)[0].items() if k != "unembed"}
  params["score"] = 0.5 * np.asarray(jax.random.normal(jax.random.PRNGKey(1), (64, 1)), np.float32)
  reward = str(tmp_path / "reward")
  weights.write_run(reward, params, config, 3, os.path.join(base, "tokenizer.json"))
  out = str(tmp_path / "exported")
  hf.export_dir(reward, out)
  with open(os.path.join(out, "config.json")) as f:
    exported = json.load(f)
  assert exported["architectures"] == ["LlamaForSequenceClassification"]
  assert exported["id2label"] == {"0": "LABEL_0"} and exported["label2id"] == {"LABEL_0": 0}
  assert exported["pad_token_id"] == EOS and "num_labels" not in exported
  assert os.path.isfile(os.path.join(tmp_path / "lm", "generation_config.json"))
  assert not os.path.exists(os.path.join(out, "generation_config.json"))
  ours = fmjax_scores(cfg, params)
  assert np.abs(ours).max() > 0.1
  np.testing.assert_allclose(hf_scores(out), ours, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(safetensors_io.Reader(out).get("score.weight"), params["score"].T)


def test_fresh_score_model_exports_without_a_template(tmp_path):
  """A score model never imported (no hf/ template): a fresh Llama classifier config, the byte tokenizer's pad id."""
  cfg = ModelConfig(vocab_size=VOCAB, num_labels=2, tie_embeddings=True, init_std=0.1)
  params = init_params(cfg, jax.random.PRNGKey(0))
  assert "unembed" not in params
  run = str(tmp_path / "run")
  weights.write_run(run, params, hf.run_config(cfg, "", "plain"), 0, "")
  out = str(tmp_path / "exported")
  hf.export_dir(run, out)
  with open(os.path.join(out, "config.json")) as f:
    exported = json.load(f)
  assert exported["architectures"] == ["LlamaForSequenceClassification"] and exported["pad_token_id"] == 0
  assert exported["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
  ours = fmjax_scores(cfg, params)
  np.testing.assert_allclose(hf_scores(out), ours, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(safetensors_io.Reader(out).get("score.weight"), np.asarray(params["score"]).T)


def test_config_labels_both_ways():
  base = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
  seq = {**base, "architectures": ["LlamaForSequenceClassification"]}
  assert hf_config.to_model_config({**base, "architectures": ["LlamaForCausalLM"]}).num_labels == 0
  assert hf_config.to_model_config(base).num_labels == 0
  assert hf_config.to_model_config({**seq, "id2label": {"0": "bad", "1": "good", "2": "best"}}).num_labels == 3
  assert hf_config.to_model_config({**seq, "num_labels": 1}).num_labels == 1
  assert hf_config.to_model_config(seq).num_labels == 2  # transformers' default, which older versions did not save
  with pytest.raises(UserError, match="ForTokenClassification"):
    hf_config.to_model_config({**base, "architectures": ["LlamaForTokenClassification"]})

  cfg = hf_config.to_model_config({**seq, "num_labels": 2})
  names = {**seq, "id2label": {"1": "good", "0": "bad"}, "label2id": {"bad": 0, "good": 1},
           "problem_type": "single_label_classification"}
  kept = hf_config.from_model_config(cfg, names)
  assert kept["id2label"] == {"0": "bad", "1": "good"} and kept["label2id"] == {"bad": 0, "good": 1}
  assert kept["problem_type"] == "single_label_classification"
  one = hf_config.from_model_config(hf_config.to_model_config({**seq, "num_labels": 1}), names)
  assert one["id2label"] == {"0": "LABEL_0"} and "problem_type" not in one  # single-label needs >= 2 labels
  lm = hf_config.from_model_config(hf_config.to_model_config(base), names)
  assert lm["architectures"] == ["LlamaForCausalLM"] and not {"id2label", "label2id", "problem_type"} & set(lm)
  transformers.LlamaConfig(**{k: v for k, v in one.items() if k != "model_type"})  # transformers accepts them


def test_mismatched_checkpoint_and_config_are_one_line_errors(importer, tmp_path):
  source, _, _ = importer("llama", 3)
  with open(os.path.join(source, "config.json")) as f:
    config = json.load(f)
  os.makedirs(tmp_path / "lm")
  os.symlink(os.path.join(source, "model.safetensors"), tmp_path / "lm" / "model.safetensors")
  with open(tmp_path / "lm" / "config.json", "w") as f:
    json.dump({**config, "architectures": ["LlamaForCausalLM"]}, f)
  with pytest.raises(UserError, match=r"holds score.weight .*ForSequenceClassification") as e:
    hf.load(str(tmp_path / "lm"))
  assert "\n" not in str(e.value)
  with open(tmp_path / "lm" / "config.json", "w") as f:
    json.dump({**config, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}}, f)
  with pytest.raises(UserError, match=r"score.weight has shape \[3, 64\] but config.json implies \[2, 64\]"):
    hf.load(str(tmp_path / "lm"))
