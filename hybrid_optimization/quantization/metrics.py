"""Quantization diagnostics: relative error, ternary code distribution, code flip rate between steps.

The flip rate (fraction of integer codes that change from one step to the next) is the live signal of how much a
low-bit model is still moving: latent weights can change every step while the quantized network stays the same,
and a flip rate that stays high late in training means the weights oscillate around rounding thresholds.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from hybrid_optimization.quantization.convert import quantized_layers
from hybrid_optimization.quantization.quantizers import (TERNARY_BITS, fake_quantize, normalize_bits,
                                                         quantize_weight)


def relative_quantization_error(w: torch.Tensor, bits, group_size: int | None = None,
                                scale_factor: float = 1.0) -> float:
    """||W - Q(W)||_F / ||W||_F (0 for full precision or an all-zero weight)."""
    if normalize_bits(bits) >= 16:
        return 0.0
    with torch.no_grad():
        w32 = w.detach().to(torch.float32)
        norm = torch.linalg.vector_norm(w32)
        if norm == 0:
            return 0.0
        q = fake_quantize(w32, bits, group_size, scale_factor)
        return float(torch.linalg.vector_norm(w32 - q) / norm)


def ternary_code_distribution(w_or_codes: torch.Tensor) -> dict[str, float]:
    """Fractions of -1 / 0 / +1 codes: {"neg", "zero", "pos"}. Float input is ternary-quantized first."""
    codes = w_or_codes
    if codes.is_floating_point():
        codes = quantize_weight(codes, TERNARY_BITS).codes
    n = codes.numel()
    if n == 0:
        raise ValueError("cannot compute a code distribution of an empty tensor")
    if ((codes < -1) | (codes > 1)).any():
        raise ValueError("codes are not ternary: values outside {-1, 0, +1}")
    neg = int((codes < 0).sum())
    pos = int((codes > 0).sum())
    return {"neg": neg / n, "zero": (n - neg - pos) / n, "pos": pos / n}


def code_flip_rate(prev_codes: torch.Tensor, codes: torch.Tensor) -> float:
    """Fraction of codes that differ between two snapshots of the same layer."""
    if prev_codes.shape != codes.shape:
        raise ValueError(f"code tensors have different shapes {tuple(prev_codes.shape)} and {tuple(codes.shape)}")
    if codes.numel() == 0:
        return 0.0
    return float((prev_codes != codes).sum()) / codes.numel()


class CodeFlipTracker:
    """Keeps the int8 codes of every quantized layer and reports the flip rate since the previous `update`.

    The first update of a layer (or one after its shape or bit-width changed) reports 0.0.
    Memory: one int8 copy of the quantized weights (a quarter of their fp32 size).
    """

    def __init__(self):
        self._codes: dict[str, torch.Tensor] = {}
        self._bits: dict[str, float] = {}

    def update(self, model: nn.Module) -> dict[str, float]:
        rates = {}
        for name, layer in quantized_layers(model).items():
            codes = layer.quantized_weight().codes
            previous = self._codes.get(name)
            if previous is None or previous.shape != codes.shape or self._bits.get(name) != layer.bits:
                rates[name] = 0.0
            else:
                rates[name] = code_flip_rate(previous, codes)
            self._codes[name] = codes
            self._bits[name] = layer.bits
        return rates

    def state_dict(self) -> dict:
        return {"codes": dict(self._codes), "bits": dict(self._bits)}

    def load_state_dict(self, state: dict) -> None:
        self._codes = dict(state["codes"])
        self._bits = dict(state["bits"])


def layer_quantization_report(model: nn.Module) -> list[dict]:
    """One row per quantized layer: name, bits, group_size, n_params, rel_error, code_distribution (ternary only),
    scale (mean of its scales). Errors are those of the layer's own quantizer (its scale factor, any loaded scale)."""
    rows = []
    with torch.no_grad():
        for name, layer in quantized_layers(model).items():
            q = layer.quantized_weight()
            w = layer.weight.detach().to(torch.float32)
            norm = torch.linalg.vector_norm(w)
            error = float(torch.linalg.vector_norm(w - q.dequantize().to(torch.float32)) / norm) if norm > 0 else 0.0
            rows.append({
                "name": name, "bits": layer.bits, "group_size": layer.group_size, "n_params": w.numel(),
                "rel_error": error,
                "code_distribution": ternary_code_distribution(q.codes) if layer.bits == TERNARY_BITS else None,
                "scale": float(q.scale.mean()),
            })
    return rows
