"""The Llama-family decoder, its presets and its FLOP count."""

from fmjax.model.config import PRESETS, ModelConfig, resolve
from fmjax.model.transformer import Transformer, init_cache, init_params

__all__ = ["PRESETS", "ModelConfig", "Transformer", "init_cache", "init_params", "resolve"]
