"""The Llama-family decoder, its presets and its FLOP count."""

from fmjax.model.config import PRESETS, ModelConfig, resolve
from fmjax.model.transformer import Transformer

__all__ = ["PRESETS", "ModelConfig", "Transformer", "resolve"]
