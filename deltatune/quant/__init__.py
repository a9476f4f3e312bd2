"""Quantized weights: number formats (NF4 with double quantization, int8, int4/int2/int1 with
groups, ternary), the `QuantizedTensor` that keeps a linear layer ordinary while storing only its
packed weight, whole-model quantization and layer-by-layer loading, and the frozen base's
precision (`--base-dtype`). See docs/quantization.md."""
from deltatune.quant.formats import FORMAT_NAMES, QuantFormat, get_format
from deltatune.quant.model import (dequantize_model, is_quantized_folder, model_bytes,
                                   quantize_model, quantized_parameters)
from deltatune.quant.precision import BASE_DTYPES, resolve_base_dtype, use_base_dtype
from deltatune.quant.tensor import QuantizedTensor, is_quantized

__all__ = ["FORMAT_NAMES", "QuantFormat", "get_format", "QuantizedTensor", "is_quantized",
           "quantize_model", "dequantize_model", "quantized_parameters", "model_bytes",
           "is_quantized_folder", "BASE_DTYPES", "resolve_base_dtype", "use_base_dtype"]
