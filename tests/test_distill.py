"""Distillation: divergences against float64 NumPy, their conventions, T², the α mix, masking, the teacher run."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config_lib, objectives
from fmjax.objectives import LossContext
from fmjax.objectives.distill import divergence

rng = np.random.default_rng(0)
T_LOGITS = (3 * rng.standard_normal((4, 6, 50))).astype(np.float32)
S_LOGITS = (3 * rng.standard_normal((4, 6, 50))).astype(np.float32)


def log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def kl(log_p, log_q):
  return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def close(ours, ref):
  np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergences_match_float64(temperature):
  lt, ls = log_softmax(T_LOGITS / temperature), log_softmax(S_LOGITS / temperature)
  close(divergence(T_LOGITS, S_LOGITS, "forward_kl", temperature), kl(lt, ls))
  close(divergence(T_LOGITS, S_LOGITS, "reverse_kl", temperature), kl(ls, lt))
  beta = 0.2  # M = β·teacher + (1 − β)·student, JSD = β·KL(teacher ‖ M) + (1 − β)·KL(student ‖ M) (TRL's GKD)
  lm = np.log(beta * np.exp(lt) + (1 - beta) * np.exp(ls))
  close(divergence(T_LOGITS, S_LOGITS, "jsd", temperature, beta), beta * kl(lt, lm) + (1 - beta) * kl(ls, lm))


def test_top_k_restricts_both_to_the_teachers_top_tokens():
  k = 5
  idx = np.argsort(-T_LOGITS, axis=-1)[..., :k]
  lt = log_softmax(np.take_along_axis(T_LOGITS, idx, -1))
  ls = log_softmax(np.take_along_axis(S_LOGITS, idx, -1))
  close(divergence(T_LOGITS, S_LOGITS, "forward_kl", top_k=k), kl(lt, ls))


def test_closed_forms_and_the_beta_convention():
  close(divergence(T_LOGITS, T_LOGITS, "forward_kl"), np.zeros((4, 6)))  # KL(p ‖ p) = 0
  close(divergence(T_LOGITS, T_LOGITS, "reverse_kl"), np.zeros((4, 6)))
  close(divergence(T_LOGITS, S_LOGITS, "jsd", beta=0.5), divergence(S_LOGITS, T_LOGITS, "jsd", beta=0.5))  # symmetric
  close(divergence(T_LOGITS, S_LOGITS, "jsd", beta=0.2), divergence(S_LOGITS, T_LOGITS, "jsd", beta=0.8))
  assert np.abs(divergence(T_LOGITS, S_LOGITS, "jsd", beta=0.2)
                - divergence(S_LOGITS, T_LOGITS, "jsd", beta=0.2)).max() > 1e-3  # β pins which side is which
  jsd = np.asarray(divergence(T_LOGITS, S_LOGITS, "jsd", beta=0.5))
  assert np.all(jsd >= 0) and np.all(jsd <= np.log(2) + 1e-6)  # JSD is bounded by ln 2


def head(alpha=0.5, temperature=2.0, kind="forward_kl"):
  cfg = config_lib.use_head(config_lib.base(), "distill", alpha=alpha, temperature=temperature, divergence=kind)
  return objectives.get(cfg).loss


def batch_and_ctx(pad=0):
  B, T, V = T_LOGITS.shape
  rng = np.random.default_rng(1)  # the same targets and mask with and without padding
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  mask = (rng.random((B, T)) < 0.7).astype(np.float32)
  teacher, student = T_LOGITS, S_LOGITS
  if pad:  # padded positions: mask 0, arbitrary logits and targets
    grow = lambda x, fill: np.concatenate([x, fill], axis=1)  # noqa: E731
    teacher = grow(teacher, 50 * rng.standard_normal((B, pad, V)).astype(np.float32))
    student = grow(student, 50 * rng.standard_normal((B, pad, V)).astype(np.float32))
    targets = grow(targets, rng.integers(0, V, (B, pad)).astype(np.int32))
    mask = grow(mask, np.zeros((B, pad), np.float32))
  batch = {"tokens": jnp.zeros_like(targets), "targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask),
           "segment_ids": jnp.ones_like(targets), "positions": jnp.zeros_like(targets)}
  ctx = LossContext(apply=lambda p, *x: jnp.asarray(student), frozen={"teacher": lambda *x: jnp.asarray(teacher)})
  return batch, ctx, mask, targets


def test_head_mixes_hard_labels_and_t2_scaled_divergence():
  batch, ctx, mask, targets = batch_and_ctx()
  loss_sum, weight, metrics = head(alpha=0.3, temperature=2.0)(None, batch, ctx)
  nll = -np.take_along_axis(log_softmax(S_LOGITS), targets[..., None], -1)[..., 0]
  div = kl(log_softmax(T_LOGITS / 2.0), log_softmax(S_LOGITS / 2.0))
  expected = np.sum((0.3 * nll + 0.7 * 4.0 * div) * mask)
  assert float(weight) == mask.sum()
  np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["nll"]), np.sum(nll * mask), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["divergence"]), np.sum(div * mask), rtol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_padding_changes_nothing(kind):
  plain = head(kind=kind)(None, *batch_and_ctx()[:2])
  padded = head(kind=kind)(None, *batch_and_ctx(pad=7)[:2])
  for a, b in zip(jnp.asarray(plain[:2]), jnp.asarray(padded[:2])):
    np.testing.assert_allclose(float(b), float(a), rtol=1e-6)


def test_bad_settings_name_the_key():
  with pytest.raises(ValueError, match=r"objective.divergence='kl' must be one of \('forward_kl'"):
    head(kind="kl")
  with pytest.raises(ValueError, match=r"objective.alpha=1.5 must be in \[0, 1\]"):
    head(alpha=1.5)


@pytest.mark.slow
def test_distill_smoke_learns_from_its_teacher_and_refuses_another_tokenizer(repo, tmp_path, cpu_env):
  env = cpu_env(1)
  run = lambda *a: subprocess.run([sys.executable, "-m", "fmjax.main", *a], cwd=repo, capture_output=True,  # noqa
                                  text=True, timeout=300, env=env)
  proc = run("--config=configs/distill.py:smoke", f"--workdir={tmp_path / 'student'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "teacher: " in proc.stderr and "frozen" in proc.stderr
  rows = [json.loads(line) for line in open(tmp_path / "student" / "metrics.jsonl")]
  assert rows[-1]["divergence"] < 0.5 * rows[0]["divergence"] and rows[-1]["nll"] < rows[0]["nll"]
  teacher = tmp_path / "student" / "teacher"
  shape = ["--config.model.d_model=64", "--config.model.num_layers=2", "--config.model.num_heads=4",
           "--config.model.num_kv_heads=2", "--config.model.mlp_dim=192"]  # the teacher's own shape
  lora = run(f"--config=configs/distill.py:smoke,teacher={teacher}", f"--workdir={tmp_path / 'lora'}",
             f"--config.init_from.workdir={teacher}", "--config.lora.rank=4", "--config.eval.at_start=True",
             "--config.train.steps=4", *shape)
  assert lora.returncode == 0, lora.stderr[-3000:]
  step0 = json.loads(open(tmp_path / "lora" / "metrics.jsonl").readline())
  assert step0["step"] == 0 and abs(step0["eval_divergence"]) < 1e-6  # a LoRA student over the teacher (B = 0)
  bad = run("--config=configs/distill.py:smoke", f"--config.objective.teacher={teacher}",
            "--config.data.tokenizer_path=", "--config.data.vocab_size=500", f"--workdir={tmp_path / 'bad'}")
  assert bad.returncode != 0 and f"objective.teacher='{teacher}' was trained with tokenizer" in bad.stderr
