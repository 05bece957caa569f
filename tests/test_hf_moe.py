"""Hugging Face import/export of mixtures of experts, Mixtral and Qwen3-MoE: logit parity with transformers, both
expert layouts transformers 5 loads (one tensor per expert, as `save_pretrained` writes; fused `gate_up_proj` /
`down_proj`, as it keeps them in memory), bitwise round trips, greedy generation equal to transformers' `generate`,
fresh fmjax MoE models exported, and the MoE configs fmjax cannot hold refused in one line.

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
from fmjax.errors import UserError  # noqa: E402
from fmjax.interop import hf, hf_config, safetensors_io  # noqa: E402
from fmjax.model import ModelConfig, init_params  # noqa: E402
from fmjax.train import weights  # noqa: E402
import test_hf_interop as interop_tests  # noqa: E402
from test_hf_interop import VOCAB, hf_tokenizer  # noqa: E402

FAMILIES = ("mixtral", "qwen3_moe")
TOKENS = np.random.default_rng(1).integers(0, VOCAB, (2, 24)).astype(np.int32)


def hf_config_of(family: str) -> "transformers.PretrainedConfig":
  """2 layers, 4 experts, top-2, d 32. Qwen3-MoE: head_dim independent of d / heads, tied embeddings and
  norm_topk_prob=false (the top-2 router weights kept as they are; Mixtral always renormalises)."""
  common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
                router_aux_loss_coef=0.02)
  if family == "mixtral":
    return transformers.MixtralConfig(**common, num_local_experts=4, intermediate_size=48)
  return transformers.Qwen3MoeConfig(**common, num_experts=4, intermediate_size=80, moe_intermediate_size=24,
                                     head_dim=12, norm_topk_prob=False, tie_word_embeddings=True)


def hf_model(family: str, directory: str, fused: bool = False) -> str:
  """A random-init HF MoE model (norms perturbed so every tensor matters) saved with a tokenizer into `directory`:
  one tensor per expert (`save_pretrained`'s default), or `fused` as transformers holds them in memory."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config_of(family)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(directory, **({"save_original_format": False} if fused else {}))
  hf_tokenizer(directory, "llama" if family == "mixtral" else "qwen")
  return directory


def hf_logits(directory: str, tokens: np.ndarray = TOKENS) -> np.ndarray:
  return interop_tests.hf_logits(directory, tokens)


@pytest.fixture(scope="module")
def importer(tmp_path_factory):
  return interop_tests.import_once(tmp_path_factory, hf_model, TOKENS)


@pytest.fixture(params=FAMILIES)
def imported(request, importer):
  return importer(request.param)


def test_save_pretrained_writes_one_tensor_per_expert(imported):
  family, source, _, _ = imported
  names = safetensors_io.Reader(source).keys()
  block = "block_sparse_moe" if family == "mixtral" else "mlp"
  expert = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
  assert {f"model.layers.1.{block}.experts.3.{x}.weight" for x in expert} | {f"model.layers.1.{block}.gate.weight"} \
      <= set(names)
  assert not any("gate_up_proj" in n for n in names)


def test_import_matches_transformers_logits(imported):
  family, source, run, theirs = imported
  assert np.abs(theirs).max() > 1.0  # logits big enough for an error to show
  model = fmjax.load(run)
  cfg = model.config
  assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_shared_experts, cfg.moe_aux_loss) == (4, 2, 0, 0.02)
  assert (cfg.mlp_dim, cfg.moe_norm_topk, cfg.qk_norm, cfg.head_dim) == (
      (48, True, False, 8) if family == "mixtral" else (24, False, True, 12))
  params = weights.read_params(run)[0]
  assert params["layers"]["moe"]["router"].shape == (2, 32, 4)
  assert params["layers"]["moe"]["expert_down"].shape == (2, 4, cfg.mlp_dim, 32)
  ours = model.logits(TOKENS)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
  direct = fmjax.load(source).logits(TOKENS)  # an HF directory loads straight, converted in memory
  np.testing.assert_array_equal(direct, ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_expert_layout_imports_the_same_params(importer, family, tmp_path):
  """save_pretrained(save_original_format=False) keeps transformers 5's fused experts (gate_up_proj [E, 2F, D],
  down_proj [E, D, F], router at mlp.gate); transformers loads both layouts, and so does fmjax."""
  if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("transformers 4 keeps one module per expert: no fused layout")
  _, _, run, theirs = importer(family)
  fused = hf_model(family, str(tmp_path / "fused"), fused=True)
  names = safetensors_io.Reader(fused).keys()
  assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.gate.weight" in names
  np.testing.assert_allclose(hf_logits(fused), theirs, rtol=0, atol=1e-6)
  hf.import_dir(fused, str(tmp_path / "run"))
  jax.tree.map(np.testing.assert_array_equal, weights.read_params(run)[0],
               weights.read_params(str(tmp_path / "run"))[0])


def test_export_reloads_in_transformers_and_round_trips_bitwise(imported, tmp_path):
  family, source, run, theirs = imported
  out = str(tmp_path / "exported")
  hf.export_dir(run, out)
  np.testing.assert_allclose(hf_logits(out), theirs, rtol=0, atol=1e-4)
  original, exported = safetensors_io.Reader(source), safetensors_io.Reader(out)
  assert sorted(exported.keys()) == sorted(k for k in original.keys() if k in exported)  # tied: no lm_head copy
  assert len(exported.keys()) >= len(original.keys()) - 1
  for name in exported.keys():
    np.testing.assert_array_equal(exported.get(name), original.get(name), err_msg=name)
  hf.import_dir(out, str(tmp_path / "again"))
  first, second = weights.read_params(run)[0], weights.read_params(str(tmp_path / "again"))[0]
  jax.tree.map(np.testing.assert_array_equal, first, second)
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["model_type"] == family and config["num_experts_per_tok"] == 2
  assert config["router_aux_loss_coef"] == 0.02
  if family == "qwen3_moe":
    assert (config["num_experts"], config["moe_intermediate_size"], config["norm_topk_prob"]) == (4, 24, False)
    assert (config["decoder_sparse_step"], config["mlp_only_layers"]) == (1, [])
  else:
    assert (config["num_local_experts"], config["intermediate_size"]) == (4, 48)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers_generate(importer, family):
  _, source, run, _ = importer(family)
  interop_tests.assert_greedy_generation_equal(source, run, TOKENS, 8)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["mixtral", "qwen3_moe"])
def test_fresh_fmjax_moe_model_exports_as_mixtral_or_qwen3_moe(qk_norm, tmp_path):
  """A model fmjax initialised (no HF template) exports as Mixtral, or as Qwen3-MoE with QK-norm."""
  cfg = ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=16,
                    num_experts=4, num_experts_per_tok=2, qk_norm=qk_norm, moe_norm_topk=not qk_norm).validate()
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))  # random values below: no compile
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (float(path[-1].key == "scale") + 0.2 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
  run = str(tmp_path / "run")
  weights.write_run(run, params, hf.run_config(cfg, "", "plain"), 0, "")
  out = str(tmp_path / "hf")
  hf.export_dir(run, out)
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["model_type"] == ("qwen3_moe" if qk_norm else "mixtral")
  ours = fmjax.load(run).logits(TOKENS)
  assert np.abs(ours).max() > 1.0
  np.testing.assert_allclose(hf_logits(out), ours, rtol=0, atol=1e-4)
  assert hf.read_config(out)[1] == cfg  # the exported config.json imports as the model it came from


@pytest.mark.slow
def test_convert_cli_fine_tune_and_export_of_qwen3_moe(importer, tmp_path, cpu_env):
  """docs/interop.md's commands on a tiny Qwen3-MoE: import with the CLI, 4 SFT steps (router statistics logged),
  export with the CLI; transformers gives the fine-tuned logits."""
  _, source, _, theirs = importer("qwen3_moe")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  def run(*args):
    return subprocess.run([sys.executable, *args], cwd=repo, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
  workdir, sft, out = str(tmp_path / "run"), str(tmp_path / "sft"), str(tmp_path / "sft-hf")
  proc = run("tools/convert_hf.py", "import", f"--hf_dir={source}", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run("-m", "fmjax.main", f"--config=configs/sft.py:smoke,init_from={workdir}", f"--workdir={sft}",
             "--config.train.steps=4", "--config.eval.every_steps=4", "--config.checkpoint.every_steps=4",
             "--config.train.seq_len=128", "--config.train.batch_size=8", "--config.data.overlong=truncate")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(sft, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert any("moe/aux_loss" in r for r in rows)
  proc = run("tools/convert_hf.py", "export", f"--workdir={sft}", f"--hf_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  trained = fmjax.load(sft).logits(TOKENS)
  np.testing.assert_allclose(hf_logits(out), trained, rtol=0, atol=1e-4)
  assert np.abs(trained - theirs).max() > 1e-3  # the fine-tuning changed the weights


def _one_line_error(hf_dict: dict, *words: str) -> str:
  with pytest.raises(UserError) as e:
    hf_config.to_model_config(hf_dict)
  message = str(e.value)
  assert "\n" not in message and all(w in message for w in words), message
  return message


def test_moe_configs_fmjax_cannot_hold_are_one_line_errors(tmp_path):
  qwen3_moe = hf_config_of("qwen3_moe").to_dict()
  assert hf_config.to_model_config(qwen3_moe).num_experts == 4
  hub = {k: v for k, v in qwen3_moe.items() if k != "num_local_experts"}  # Qwen's checkpoints name it num_experts
  assert hf_config.to_model_config({**hub, "num_experts": 6}).num_experts == 6
  _one_line_error({**qwen3_moe, "decoder_sparse_step": 2}, "decoder_sparse_step=2", "decoder_sparse_step=1")
  _one_line_error({**qwen3_moe, "mlp_only_layers": [1]}, "mlp_only_layers=[1]", "mlp_only_layers=[]")
  _one_line_error({**qwen3_moe, "attention_bias": True}, "attention_bias=true")
  qwen2_moe = transformers.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2).to_dict()
  _one_line_error(qwen2_moe, "qwen2_moe", "shared_expert_gate")
  # an MoE model no HF family holds: shared experts
  shared = ModelConfig(num_experts=4, moe_shared_experts=1)
  with pytest.raises(UserError, match="moe_shared_experts"):
    hf_config.from_model_config(shared)
  # a dense template cannot hold an MoE model
  with pytest.raises(UserError, match="num_experts=4"):
    hf_config.from_model_config(ModelConfig(num_experts=4), {"model_type": "llama"})
  # the same through the converter: the error is the whole story, before any weight is read
  bad = tmp_path / "bad"
  hf_model("qwen3_moe", str(bad))
  with open(bad / "config.json") as f:
    config = json.load(f)
  with open(bad / "config.json", "w") as f:
    json.dump({**config, "decoder_sparse_step": 2}, f)
  with pytest.raises(UserError, match="decoder_sparse_step=2"):
    hf.import_dir(str(bad), str(tmp_path / "run"))
