"""8 forced CPU devices (set before jax is imported) and a persistent compilation cache shared by all tests."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("FMJAX_CACHE", tempfile.mkdtemp(prefix="fmjax-test-cache-"))  # tokenizers trained afresh
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/fmjax/jax-compilation-cache"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo() -> str:
  return REPO


def pytest_configure(config):
  assert jax.device_count() == 8, "tests need 8 CPU devices; XLA_FLAGS was set too late"


@pytest.fixture(scope="session")
def v5p_8():
  """(topology, compile-only devices) of a v5p-8 slice, from libtpu (the `tpu` extra); skips where there is none."""
  pytest.importorskip("libtpu")
  from fmjax import topology

  topo = topology.parse("v5p-8")
  try:
    return topo, topology.devices(topo)
  except RuntimeError as e:
    pytest.skip(f"libtpu cannot describe TPU topologies here: {e}")


@pytest.fixture(scope="session")
def cpu_env():
  """Environment for a subprocess run on `devices` virtual CPU devices (default 1). Eight virtual devices on a busy
  2-core machine can starve XLA's cross-device rendezvous, which aborts after 40 s; runs that test no sharding use
  one."""
  def make(devices: int = 1) -> dict:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}
  return make
