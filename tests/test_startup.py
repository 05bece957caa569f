"""Start-up: a CPU machine with libtpu installed starts without TPU initialisation errors; a TPU VM keeps its TPU;
an explicit JAX_PLATFORMS wins; fmjax's own INFO lines are short."""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import subprocess
import sys

import pytest
from absl import logging as absl_logging

from fmjax import startup

TPU_NOISE = ("TPU_WORKER_HOSTNAMES", "Failed to find host bounds", "E0000", "Unable to initialize backend 'tpu'")
CPU_MACHINE = dict(configured=None, libtpu=True, tpu_chips=0, tpu_device_paths=(), gpu=False)


def _needs_libtpu_and_no_tpu() -> None:
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): JAX never loads it, so there is no TPU start-up "
                "noise to check")
  from jax._src import hardware_utils

  if hardware_utils.num_available_tpu_chips_and_device_id()[0] or any(glob.glob(g) for g in startup.TPU_DEVICE_GLOBS):
    pytest.skip("this machine has a TPU: the quiet CPU start does not apply")


def _env(cpu_env, **extra: str) -> dict:
  env = cpu_env(1)
  env.pop("JAX_PLATFORMS", None)  # conftest sets it for the in-process tests; these check the unset case
  return {**env, **extra}


def _noise(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if any(n in line for n in TPU_NOISE)]


# The decision, on fake machines.

def test_cpu_machine_with_libtpu_skips_tpu():
  assert startup.choose_platforms({}, **CPU_MACHINE) == "cpu"
  # what `import jax` / `import libtpu` set on any machine is no sign of a TPU
  assert startup.choose_platforms({"TPU_SKIP_MDS_QUERY": "1", "TPU_LIBRARY_PATH": "/x/libtpu.so"},
                                  **CPU_MACHINE) == "cpu"


@pytest.mark.parametrize("value", ["cpu", "tpu", "cuda", ""])
def test_explicit_jax_platforms_is_left_alone(value):
  assert startup.choose_platforms({"JAX_PLATFORMS": value}, **CPU_MACHINE) is None
  assert startup.choose_platforms({}, **{**CPU_MACHINE, "configured": value or "cpu"}) is None  # jax.config.update


@pytest.mark.parametrize("machine", [
    {"tpu_chips": 4},  # JAX's PCI scan found TPU chips (on a TPU VM `import jax` also sets jax_platforms=tpu,cpu)
    {"tpu_device_paths": ["/dev/accel0"]},  # TPU v4 and older
    {"tpu_device_paths": ["/dev/vfio"]},  # TPU v5e and later
    {"libtpu": False},  # nothing loads libtpu, nothing to quiet
    {"gpu": True},  # naming the GPU platform is JAX's business
])
def test_tpu_hardware_or_no_libtpu_keeps_jax_choice(machine):
  assert startup.choose_platforms({}, **{**CPU_MACHINE, **machine}) is None


@pytest.mark.parametrize("var", ["TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID",
                                 "MEGASCALE_COORDINATOR_ADDRESS", "JAX_FORCE_TPU_INIT"])
def test_tpu_vm_environment_keeps_tpu(var):
  assert startup.choose_platforms({var: "v5p-8" if var == "TPU_ACCELERATOR_TYPE" else "1"}, **CPU_MACHINE) is None


def test_select_platform_leaves_an_explicit_setting():
  environ = {"JAX_PLATFORMS": "cpu"}
  assert startup.select_platform(environ) is None
  assert environ == {"JAX_PLATFORMS": "cpu"}


# The real start-up, in fresh processes with JAX_PLATFORMS unset.

DEVICES = "from fmjax import startup; print(startup.select_platform()); import jax; print(jax.devices())"


def test_cpu_start_with_libtpu_is_quiet(cpu_env, repo):
  _needs_libtpu_and_no_tpu()
  out = subprocess.run([sys.executable, "-c", DEVICES], cwd=repo, env=_env(cpu_env), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["cpu", "[CpuDevice(id=0)]"], out.stdout
  assert not _noise(out.stderr), out.stderr[-3000:]


def test_explicit_cpu_still_works(cpu_env, repo):
  out = subprocess.run([sys.executable, "-c", DEVICES], cwd=repo, env=_env(cpu_env, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["None", "[CpuDevice(id=0)]"], out.stdout
  assert not _noise(out.stderr), out.stderr[-3000:]


@pytest.mark.slow
def test_smoke_run_is_quiet_and_readable(cpu_env, repo, tmp_path):
  _needs_libtpu_and_no_tpu()
  cmd = [sys.executable, "-m", "fmjax.main", "--config=configs/pretrain.py:smoke", f"--workdir={tmp_path / 'run'}",
         "--config.train.steps=2", "--config.eval.every_steps=0", "--config.optimizer.warmup_steps=1"]
  out = subprocess.run(cmd, cwd=repo, env=_env(cpu_env), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert not _noise(out.stderr), out.stderr[-3000:]
  assert re.search(r"^\d\d:\d\d:\d\d step 2/2 \| loss ", out.stderr, re.M), out.stderr[-3000:]


# The run log's format.

def _record(level: int, pathname: str) -> logging.LogRecord:
  return logging.LogRecord("x", level, pathname, 12, "step %d/%d | loss 1.0", (1, 2), None)


def test_short_info_format():
  fmt = startup.ShortInfoFormatter(absl_logging.PythonFormatter())
  own = os.path.join(os.path.dirname(startup.__file__), "train", "metrics.py")
  assert re.fullmatch(r"\d\d:\d\d:\d\d step 1/2 \| loss 1\.0", fmt.format(_record(logging.INFO, own)))
  warning = fmt.format(_record(logging.WARNING, own))  # problems keep absl's prefix: severity, time, file:line
  assert re.fullmatch(r"W\d{4} [\d:.]+ +\d+ metrics\.py:12\] step 1/2 \| loss 1\.0", warning), warning
  other = fmt.format(_record(logging.INFO, "/site-packages/orbax/checkpoint.py"))  # other libraries' lines too
  assert other.startswith("I") and "checkpoint.py:12] " in other, other


def test_the_run_log_drops_library_info_lines_but_keeps_warnings_and_fmjax_lines():
  """JAX's INFO "Unable to initialize backend 'tpu'" (seen where libtpu is absent) reads as a failure: dropped."""
  import logging as std_logging

  from fmjax.main import _QuietLibraries

  def record(path: str, level: int) -> std_logging.LogRecord:
    return std_logging.LogRecord("x", level, path, 1, "msg", None, None)

  quiet = _QuietLibraries()
  site = "/venv/lib/python3.11/site-packages"
  assert not quiet.filter(record(f"{site}/jax/_src/xla_bridge.py", std_logging.INFO))
  assert not quiet.filter(record(f"{site}/orbax/checkpoint/x.py", std_logging.INFO))
  assert quiet.filter(record(f"{site}/jax/_src/xla_bridge.py", std_logging.WARNING))
  assert quiet.filter(record("/home/me/jax/fmjax/train/loop.py", std_logging.INFO))


# The allocator: a decision on fake machines, then a real re-executed process.
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


@pytest.mark.parametrize("environ,present,expected", [
    ({}, [TCMALLOC, "/j.so"], TCMALLOC),  # the first installed one
    ({}, [], None),  # none installed: glibc malloc
    ({"FMJAX_ALLOCATOR": "system"}, [TCMALLOC], None),
    ({"FMJAX_ALLOCATOR": "/opt/lib/libjemalloc.so"}, [TCMALLOC], "/opt/lib/libjemalloc.so"),
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, [TCMALLOC], None),  # the user preloaded one already
    ({"FMJAX_ALLOCATOR_PRELOADED": TCMALLOC}, [TCMALLOC], None),  # the re-executed process: never again
])
def test_allocator_choice(environ, present, expected):
  assert startup.choose_allocator(environ, present) == expected


def test_allocator_is_preloaded_by_re_executing_the_entry_point(tmp_path, repo):
  """Any shared library stands in for the allocator here: the re-executed process maps it, keeps its arguments, and
  does not re-execute again (it would loop)."""
  lib = next(p for p in glob.glob("/usr/lib/*-linux-gnu/libm.so.6") + glob.glob("/lib/*-linux-gnu/libm.so.6"))
  script = tmp_path / "tool.py"
  script.write_text("import os, sys\nfrom fmjax import startup\n\ndef main():\n"
                    "  maps = open('/proc/self/maps').read()\n"
                    "  print(os.environ['LD_PRELOAD'], os.path.realpath(sys.argv[1]) in maps or sys.argv[1] in maps, "
                    "sys.argv[1:])\n\nstartup.run(main)\n")
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"FMJAX_ALLOCATOR": lib, "PYTHONPATH": repo}
  proc = subprocess.run([sys.executable, str(script), lib, "--x"], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == [lib, "True", f"['{lib}',", "'--x']"]
  bad = subprocess.run([sys.executable, str(script), lib], env={**env, "FMJAX_ALLOCATOR": "/nowhere/libx.so"},
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "fmjax: error: FMJAX_ALLOCATOR='/nowhere/libx.so' is not a file" in bad.stderr
