"""Hugging Face import/export: logit parity with transformers for Llama (Llama-3 RoPE scaling), Mistral, Qwen2 and
Qwen3, bitwise round trips, HF tokenizers as fmjax tokenizers, greedy generation equal to transformers' `generate`.

Tiny random models are built from configs (no download). Needs the `hf` extra (torch, transformers).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fmjax  # noqa: E402
from fmjax import data  # noqa: E402
from fmjax.interop import hf, safetensors_io  # noqa: E402
from fmjax.train import weights  # noqa: E402

VOCAB = 320
SPECIALS = {"llama": ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"),
            "qwen": ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
TEXT = ("The quick brown fox jumps over the lazy dog. Üñíçødé, tabs\tand  spaces,\nnew lines and digits 12345. "
        "def f(x):\n    return x * 2\n") * 4


def hf_tokenizer(directory: str, kind: str) -> None:
  """A byte-level BPE tokenizer.json (+ tokenizer_config.json) of `kind`'s special tokens and pre-tokenization,
  trained here."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  if kind == "qwen":  # as Qwen's tokenizer.json (transformers rebuilds it so for model_type qwen2/qwen3)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  specials = SPECIALS[kind]
  trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=list(specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator([TEXT] * 8, trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=specials[0] if kind == "llama" else None,
      eos_token=specials[1] if kind == "llama" else specials[0])
  fast.save_pretrained(directory)


def hf_model(family: str, directory: str) -> str:
  """A random-init HF model of `family` (norms and biases perturbed so every tensor matters), saved with a
  tokenizer into `directory`."""
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1)
  if family == "llama":  # Llama-3 RoPE scaling with a short original context, so it changes the frequencies
    config = transformers.LlamaConfig(**common, rope_theta=500_000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
  elif family == "mistral":
    config = transformers.MistralConfig(**common, sliding_window=None)
  elif family == "qwen2":
    config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
  else:  # Qwen3: head_dim independent of hidden_size / heads
    config = transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(directory)
  hf_tokenizer(directory, "llama" if family in ("llama", "mistral") else "qwen")
  return directory


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 40)).astype(np.int32)


def hf_logits(directory: str, tokens: np.ndarray = TOKENS) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.numpy()


def import_once(tmp_path_factory, build, tokens: np.ndarray = TOKENS):
  """family → (family, HF dir, imported fmjax run dir, transformers' logits of `tokens`), each family's HF model
  made by `build(family, directory)` once."""
  cache = {}

  def get(family: str):
    if family not in cache:
      root = tmp_path_factory.mktemp(family)
      source = build(family, str(root / "hf"))
      hf.import_dir(source, str(root / "run"))
      cache[family] = family, source, str(root / "run"), hf_logits(source, tokens)
    return cache[family]

  return get


@pytest.fixture(scope="module")
def importer(tmp_path_factory):
  return import_once(tmp_path_factory, hf_model)


@pytest.fixture(params=FAMILIES)
def imported(request, importer):
  return importer(request.param)


def test_import_matches_transformers_logits(imported):
  _, source, run, theirs = imported
  assert np.abs(theirs).max() > 1.0  # logits big enough for an error to show
  ours = fmjax.load(run).logits(TOKENS)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
  direct = fmjax.load(source).logits(TOKENS)  # an HF directory loads straight, converted in memory
  np.testing.assert_array_equal(direct, ours)


def test_export_reloads_in_transformers_and_round_trips_bitwise(imported, tmp_path):
  _, source, run, theirs = imported
  out = str(tmp_path / "exported")
  hf.export_dir(run, out)
  np.testing.assert_allclose(hf_logits(out), theirs, rtol=0, atol=1e-4)
  original, exported = safetensors_io.Reader(source), safetensors_io.Reader(out)
  assert sorted(exported.keys()) == sorted(k for k in original.keys() if k in exported)  # tied: no lm_head copy
  for name in exported.keys():
    np.testing.assert_array_equal(exported.get(name), original.get(name), err_msg=name)
  hf.import_dir(out, str(tmp_path / "again"))
  first, second = weights.read_params(run)[0], weights.read_params(str(tmp_path / "again"))[0]
  jax.tree.map(np.testing.assert_array_equal, first, second)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["model_type"] == imported[0]


def test_hf_tokenizer_matches_transformers(imported):
  family, source, run, _ = imported
  ours = data.tokenizer_from_file(os.path.join(run, "tokenizer.json"))
  theirs = transformers.AutoTokenizer.from_pretrained(source)
  for text in (TEXT, "naïve café — 東京 🙂", "  leading spaces", ""):
    ids = ours.encode(text)
    assert ids.tolist() == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text
  assert ours.eos_id == theirs.eos_token_id
  assert ours.bos_id == (theirs.bos_token_id if theirs.bos_token_id is not None else theirs.eos_token_id)
  assert ours.vocab_size == len(theirs)
  with open(os.path.join(run, "config.json")) as f:
    config = json.load(f)
  assert config["data"]["chat_template"] == ("llama3" if family in ("llama", "mistral") else "chatml")


def assert_greedy_generation_equal(source: str, run: str, tokens: np.ndarray, new_tokens: int) -> None:
  """fmjax's KV-cache greedy decoding of imported run `run` equals transformers' generate on `source`, for three
  prompts of different lengths cut from `tokens`."""
  from fmjax import sample

  model = fmjax.load(run)
  hf_model_ = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
  prompts = [tokens[0, :5], tokens[1, :17], tokens[0, 3:12]]
  ours = sample.generate(model.config, None, model.params, prompts, new_tokens)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      out = hf_model_.generate(torch.from_numpy(prompt[None]).long(), max_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt)).long())
    assert got.tolist() == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers_generate(importer, family):
  _, source, run, _ = importer(family)
  assert_greedy_generation_equal(source, run, TOKENS, 12)


@pytest.mark.slow
def test_convert_cli_and_training_on_the_imported_vocabulary(importer, tmp_path):
  _, source, _, theirs = importer("qwen2")  # tied embeddings, QKV bias, no BOS token
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True,  # noqa: E731
                                     timeout=300)
  workdir = str(tmp_path / "run")
  proc = run("tools/convert_hf.py", "import", f"--hf_dir={source}", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = run("tools/convert_hf.py", "import", f"--hf_dir={source}", f"--workdir={workdir}")
  assert again.returncode != 0 and "already holds checkpoints" in again.stderr
  sft = str(tmp_path / "sft")
  proc = run("-m", "fmjax.main", f"--config=configs/sft.py:smoke,init_from={workdir}", f"--workdir={sft}",
             "--config.train.steps=4", "--config.eval.every_steps=4", "--config.checkpoint.every_steps=4",
             "--config.train.seq_len=128", "--config.train.batch_size=8", "--config.data.overlong=truncate")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(sft, "metrics.jsonl"))]
  start = next(r for r in rows if r.get("step") == 0 and "eval_loss" in r)
  assert np.isfinite(start["eval_loss"])
  with open(os.path.join(sft, "config.json")) as f:
    config = json.load(f)
  assert config["data"]["chat_template"] == "chatml" and config["model"]["qkv_bias"]
  assert os.path.isfile(os.path.join(sft, "tokenizer.json"))
  out = str(tmp_path / "sft-hf")
  proc = run("tools/convert_hf.py", "export", f"--workdir={sft}", f"--hf_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  trained = fmjax.load(sft).logits(TOKENS)
  np.testing.assert_allclose(hf_logits(out), trained, rtol=0, atol=1e-4)
  assert np.abs(trained - theirs).max() > 1e-3  # the fine-tuning changed the weights
  assert transformers.AutoTokenizer.from_pretrained(out).encode(TEXT, add_special_tokens=False) == \
      data.tokenizer_from_file(os.path.join(sft, "tokenizer.json")).encode(TEXT).tolist()


def test_lora_run_exports_merged_and_as_a_peft_adapter(importer, tmp_path):
  """A LoRA run over an imported model: the merged export and the PEFT adapter over the original HF model both give
  the LoRA run's logits in transformers."""
  peft_lib = pytest.importorskip("peft")
  from fmjax.adapters import lora
  from fmjax.model import init_params

  _, source, run, theirs = importer("llama")
  config = weights.run_config(run)
  config.lora.rank, config.lora.alpha = 4, 8.0
  config.lora.targets = r"(q|k|v|o|gate|up|down)_kernel$|unembed"
  config.init_from.workdir = run
  model_cfg = fmjax.load(run).config
  lora_cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=config.lora.targets)
  adapters, _ = lora.split(init_params(model_cfg, jax.random.PRNGKey(0), adapter=lora_cfg))
  keys = jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(adapters)))
  adapters = jax.tree.unflatten(jax.tree.structure(adapters), [
      0.1 * np.asarray(jax.random.normal(k, x.shape)) for k, x in zip(keys, jax.tree.leaves(adapters))])
  lora_run = str(tmp_path / "lora")
  weights.write_run(lora_run, adapters, config, 5, os.path.join(run, "tokenizer.json"))
  ours = fmjax.load(lora_run).logits(TOKENS)
  assert np.abs(ours - theirs).max() > 0.1  # the adapters matter

  merged = str(tmp_path / "merged")
  hf.export_dir(lora_run, merged)
  np.testing.assert_allclose(hf_logits(merged), ours, rtol=0, atol=1e-4)
  adapter = str(tmp_path / "adapter")
  hf.export_dir(lora_run, adapter, adapter_mode="peft")
  base = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
  with torch.no_grad():
    adapted = peft_lib.PeftModel.from_pretrained(base, adapter).eval()
    np.testing.assert_allclose(adapted(torch.from_numpy(TOKENS).long()).logits.numpy(), ours, rtol=0, atol=1e-4)
