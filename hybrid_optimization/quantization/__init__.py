"""Quantization: quantizers with a straight-through estimator, QuantLinear, model conversion, packing, export/load,
and diagnostics. See quantizers.py for the schemes and the scale layout, export.py for the file format."""
from hybrid_optimization.quantization.convert import (DEFAULT_KEEP_FULL_PRECISION, is_kept_full_precision,
                                                      linear_layers, quantizable_layer_names, quantize_model,
                                                      quantized_layers)
from hybrid_optimization.quantization.export import (ExportReport, QuantizedExportError, export_quantized,
                                                     load_quantized, read_export)
from hybrid_optimization.quantization.metrics import (CodeFlipTracker, code_flip_rate, layer_quantization_report,
                                                      relative_quantization_error, ternary_code_distribution)
from hybrid_optimization.quantization.packing import codes_per_byte, pack_codes, packed_size, unpack_codes
from hybrid_optimization.quantization.qlinear import QuantLinear
from hybrid_optimization.quantization.quantizers import (FULL_PRECISION, SUPPORTED_BITS, TERNARY_BITS,
                                                         QuantizedTensor, UnsupportedBitsError, bits_label,
                                                         code_range, dequantize, fake_quantize, is_full_precision,
                                                         normalize_bits, quantize_activations, quantize_weight,
                                                         scale_shape, search_clip_ratio)

__all__ = [
    "SUPPORTED_BITS", "FULL_PRECISION", "TERNARY_BITS", "UnsupportedBitsError", "normalize_bits", "is_full_precision",
    "bits_label", "code_range", "scale_shape", "QuantizedTensor", "quantize_weight", "dequantize", "fake_quantize",
    "quantize_activations", "search_clip_ratio",
    "QuantLinear",
    "DEFAULT_KEEP_FULL_PRECISION", "quantize_model", "quantized_layers", "linear_layers", "quantizable_layer_names",
    "is_kept_full_precision",
    "pack_codes", "unpack_codes", "packed_size", "codes_per_byte",
    "ExportReport", "QuantizedExportError", "export_quantized", "load_quantized", "read_export",
    "relative_quantization_error", "ternary_code_distribution", "code_flip_rate", "CodeFlipTracker",
    "layer_quantization_report",
]
