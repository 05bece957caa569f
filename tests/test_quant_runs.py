"""End to end: QLoRA (configs/lora.py:smoke over an NF4 base) learns, resumes over the same quantized base, refuses
a different quant setting, and merges into exactly the function it trained."""

import pytest

from test_finetune import evals, run


@pytest.mark.slow
def test_qlora_smoke_learns_resumes_and_merges_exactly(repo, tmp_path, cpu_env):
  env = cpu_env(1)
  qlora, plain, merged, check = (tmp_path / n for n in ("qlora", "plain", "merged", "check"))
  args = ["-m", "fmjax.main", "--config=configs/lora.py:smoke", f"--workdir={qlora}", "--config.quant.base=nf4"]
  run(repo, env, *args, "--config.train.stop_after=20")
  resumed = run(repo, env, *args)
  assert "resuming from step 20" in resumed.stderr
  q = evals(qlora)
  assert sorted(q) == [0, 10, 20, 30] and q[30] < q[0] - 0.1  # it learns over the quantized base

  refused = run(repo, env, *args[:-1], "--config.quant.base=int8", check=False)
  assert refused.returncode != 0 and "quant.base: 'nf4' -> 'int8'" in refused.stderr

  base = qlora / "base"  # the same pre-trained base, held in its own dtype: step 0 differs by the quantization
  run(repo, env, "-m", "fmjax.main", f"--config=configs/lora.py:smoke,init_from={base}", f"--workdir={plain}",
      "--config.train.steps=1")
  assert 1e-4 < abs(q[0] - evals(plain)[0]) < 0.05

  run(repo, env, "tools/lora.py", "merge", f"--workdir={qlora}", f"--output={merged}")
  run(repo, env, "-m", "fmjax.main", f"--config=configs/sft.py:smoke,init_from={merged}", f"--workdir={check}",
      "--config.train.steps=1")
  assert abs(evals(check)[0] - q[30]) < 1e-4  # the merge holds the dequantized base: the function that trained
