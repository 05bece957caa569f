"""fmjax: train language foundation models through their whole life with one pure-functional JAX train loop.

`fmjax.load(path)` opens an fmjax run directory or a Hugging Face checkpoint as a `fmjax.api.Model`.
"""

from fmjax.version import __version__  # noqa: F401


def __getattr__(name: str):  # `import fmjax` stays light; `fmjax.load` imports jax on first use
  if name in ("load", "Model"):
    from fmjax import api

    return getattr(api, name)
  raise AttributeError(f"module 'fmjax' has no attribute {name!r}")
