"""Quantized frozen weights: NF4 (QLoRA) and int8 kernels that the model's projections dequantize where they use
them, bit for bit as bitsandbytes stores the same layer."""

from fmjax.quant.tree import (KERNELS, SCHEMES, Quantized, Scheme, check, count, dequantize_tree, nbytes, plan,
                              quantize, quantize_tree, quantizer, shardings)

__all__ = ["KERNELS", "SCHEMES", "Quantized", "Scheme", "check", "count", "dequantize_tree", "nbytes", "plan",
           "quantize", "quantize_tree", "quantizer", "shardings"]
