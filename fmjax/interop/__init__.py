"""Interoperability with the Hugging Face ecosystem: checkpoints (safetensors, config.json) and tokenizers."""
