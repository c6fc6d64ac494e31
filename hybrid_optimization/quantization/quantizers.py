"""Weight and activation quantizers: 1-bit, ternary (1.58-bit), k-bit, int8 activations, and fake quantization.

Schemes (W is a weight of shape [out, in]; any ndim ≥ 1 works, seen as [shape[0], rest]):

* 1 bit (XNOR-Net): codes = sign(W) in {-1, +1} (sign(0) = +1), scale = mean|W| per output channel.
* 1.58 bit (BitNet b1.58 "absmean"): scale = mean|W| over the whole tensor (floor 1e-5),
  codes = clip(round(W / scale), -1, 1).
* k = 2, 4, 8 bits: symmetric scale, codes over the full signed range [-2^(k-1), 2^(k-1) - 1], one scale per output
  channel (or per group of `group_size` input columns). Plain absmax wastes most of the range at low bits (2-bit
  absmax with levels {-1, 0, 1} is no better than ternary), so the scale is chosen to minimise the squared error:
  a small grid of clipping ratios of the absmax (a range per bit-width, measured on Gaussian, Student-t and uniform
  weights, always including plain absmax), the best per channel/group, then one least-squares refit
  s = <W, c> / <c, c> that is kept only where it lowers the error. Each candidate is evaluated for all channels at
  once (no Python loop over rows), in place; the search is still ~12 passes over the weight, so QuantLinear caches
  the resulting clipping ratio (`search_clip_ratio`, `clip_ratio=`) and searches again every few training steps
  (qlinear.py), which makes a k-bit QAT step cost about what a ternary one does.
* `group_size` also works for 1 bit and ternary (per-group mean|W|); None keeps the defaults above.

Scales are rounded to fp16 when they are computed and codes are taken with the rounded scale, so an export that
stores fp16 scales reproduces the trained model bit for bit (see export.py); scales are clamped to [1e-5, 65504].

Scale layout of `QuantizedTensor.scale` (float32), against the 2-D view W2 = W.reshape(out, -1):
  per tensor  -> [1, 1]              (ternary default)
  per channel -> [out, 1]            (1 bit and k bit default)
  per group   -> [out, in // group_size, 1], broadcasting against W2.reshape(out, in // group_size, group_size)

Fake quantization (`fake_quantize`) returns exactly dequantize(quantize_weight(w)) in the forward pass and passes
the gradient through unchanged (straight-through estimator). It is a custom autograd Function rather than the
usual `w + (q - w).detach()`: that expression is not bit-exact in floating point (w + (q - w) can differ from q by
an ulp) and it materialises two extra weight-sized temporaries per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hybrid_optimization import schema as _schema
from hybrid_optimization.config import SUPPORTED_BITS  # noqa: F401  (re-exported by the quantization package)

FULL_PRECISION = 32.0          # a bits value meaning "not quantized" (16 is accepted too)
TERNARY_BITS = _schema.TERNARY_BITS
SCALE_FLOOR = 1e-5             # BitNet's floor: an all-zero weight must not divide by zero
SCALE_CEIL = 65504.0           # largest fp16 value: scales are stored in fp16

# Clipping-ratio grids (scale = ratio * absmax / (2^(k-1) - 1)) searched for k-bit weights. Measured: the
# per-channel MSE-optimal ratio lies in 0.08-0.7 at 2 bits (heavy tails want strong clipping), 0.4-0.95 at 4 bits
# and 0.98-1.0 at 8 bits, for Gaussian, Student-t(3) and uniform matrices. Every grid ends at 1.0 (plain absmax),
# so the chosen scale is never worse than absmax.
_CLIP_RATIOS = {
    2: (0.08, 0.11, 0.15, 0.21, 0.29, 0.40, 0.55, 0.75, 1.0),
    4: (0.35, 0.43, 0.52, 0.61, 0.70, 0.79, 0.89, 1.0),
    8: (0.85, 0.90, 0.95, 1.0),
}


# The one bit-width rule lives in the vocabulary (schema.py); the quantizers re-export it under their old names.
UnsupportedBitsError = _schema.UnsupportedBitsError
normalize_bits = _schema.normalize_bits


def is_full_precision(bits: float) -> bool:
    return normalize_bits(bits) >= 16


def bits_label(bits) -> str:
    """Short text for a bit-width: 1, 1.58, 2, ... (used in feature names such as err_1.58)."""
    b = normalize_bits(bits)
    return str(int(b)) if b == int(b) else f"{b:g}"


def code_range(bits) -> tuple[int, int]:
    """Smallest and largest integer code of a bit-width (1 bit: -1 and +1, with no 0 code)."""
    b = normalize_bits(bits)
    if b >= 16:
        raise ValueError(f"bits={b:g} is full precision: it has no integer codes")
    if b == 1:
        return -1, 1
    if b == TERNARY_BITS:
        return -1, 1
    k = int(b)
    return -(2 ** (k - 1)), 2 ** (k - 1) - 1


def scale_shape(weight_shape, bits, group_size: int | None = None) -> tuple[int, ...]:
    """Shape of the scale tensor for a weight of `weight_shape` (layout in the module docstring)."""
    b = normalize_bits(bits)
    out = weight_shape[0] if len(weight_shape) >= 2 else 1
    columns = math.prod(weight_shape) // out if out else 0
    if group_size is not None:
        return (out, columns // group_size, 1)
    if b == TERNARY_BITS:
        return (1, 1)
    return (out, 1)


@dataclass
class QuantizedTensor:
    """Integer codes plus scales; `dequantize()` gives codes * scale in the original shape and dtype."""
    codes: torch.Tensor            # int8, same shape as the weight
    scale: torch.Tensor            # float32, layout in the module docstring
    bits: float
    group_size: int | None
    shape: tuple
    dtype: torch.dtype = torch.float32   # dtype of the quantized weight (dequantize returns this)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    blocks = _block_view(q.codes.to(torch.float32), q.group_size, q.scale)
    return (blocks * q.scale).reshape(q.shape).to(q.dtype)


def quantize_weight(w: torch.Tensor, bits, group_size: int | None = None, scale_factor: float = 1.0,
                    scale: torch.Tensor | None = None, clip_ratio: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize a weight. `scale_factor` multiplies the computed scale (the config's `quantizer_scale`).

    `scale` (optional) fixes the scale instead of computing it, e.g. the stored scale of an exported layer.
    `clip_ratio` (optional, k-bit only) skips the MSE search: scale = clip_ratio * absmax / (2^(k-1) - 1), with a
    ratio from `search_clip_ratio` (QuantLinear caches one between searches).
    """
    b = normalize_bits(bits)
    if b >= 16:
        raise ValueError(f"bits={b:g} is full precision: there is nothing to quantize")
    with torch.no_grad():
        codes, s = _quantize_codes(w.detach(), b, group_size, scale_factor, scale, clip_ratio)
    return QuantizedTensor(codes=codes.to(torch.int8).reshape(w.shape), scale=s, bits=b, group_size=group_size,
                           shape=tuple(w.shape), dtype=w.dtype)


def fake_quantize(w: torch.Tensor, bits, group_size: int | None = None, scale_factor: float = 1.0,
                  scale: torch.Tensor | None = None, clip_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize_weight(w)) in the forward pass, identity gradient in the backward pass (STE)."""
    b = normalize_bits(bits)
    if b >= 16:
        return w
    if w.requires_grad and torch.is_grad_enabled():
        return _FakeQuantSTE.apply(w, b, group_size, scale_factor, scale, clip_ratio)
    with torch.no_grad():
        return _fake_quantize_values(w, b, group_size, scale_factor, scale, clip_ratio)


def search_clip_ratio(w: torch.Tensor, bits, group_size: int | None = None) -> torch.Tensor:
    """The MSE-optimal clipping ratio (scale * (2^(k-1) - 1) / absmax) of each channel/group of a k-bit weight,
    shaped like the scale. quantize_weight(w, bits, clip_ratio=ratio) then reproduces the searched scale."""
    b = normalize_bits(bits)
    if b < 2 or b >= 16 or b == TERNARY_BITS:
        raise ValueError(f"clip-ratio search is for 2, 4 and 8 bits, got bits={b:g}")
    with torch.no_grad():
        blocks = _blocks(w.detach().to(torch.float32), group_size)
        absmax = _absmax(blocks)
        return _mse_scale(blocks, int(b), absmax).mul_(2 ** (int(b) - 1) - 1).div_(absmax)


def quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token absmax fake quantization of activations (BitNet: scale = 127 / max|x| over the last dim), STE."""
    if isinstance(bits, bool) or bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"act_bits={bits!r} is not supported: use an integer from 2 to 8 (8 = int8 per token), "
                         "or None for full-precision activations")
    if x.requires_grad and torch.is_grad_enabled():
        return _ActQuantSTE.apply(x, int(bits))
    with torch.no_grad():
        return _fake_quantize_activation_values(x, int(bits))


# -- the arithmetic -------------------------------------------------------------------------------------------------
def _block_view(w: torch.Tensor, group_size: int | None, scale: torch.Tensor) -> torch.Tensor:
    """View of w that broadcasts against its scale: [out, in] for per-tensor/channel, [out, groups, g] for groups."""
    w2 = w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(1, -1)
    if group_size is not None:
        return w2.reshape(w2.shape[0], -1, group_size)
    return w2


def _blocks(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Checked block view of a float32 weight: rows of the last dim share one scale (except per-tensor ternary)."""
    if w.dim() == 0:
        raise ValueError("can only quantize a weight with at least one dimension, got a scalar")
    w2 = w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(1, -1)
    if group_size is None:
        return w2
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} is invalid: use a positive integer or None (per channel)")
    if w2.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {w2.shape[1]} input columns of the weight; "
                         "choose a divisor of the input size or None (per channel)")
    return w2.reshape(w2.shape[0], -1, group_size)


def _absmax(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.abs().amax(dim=-1, keepdim=True).clamp_min_(SCALE_FLOOR)


def _round_scale(s: torch.Tensor) -> torch.Tensor:
    """Clamp to [1e-5, fp16 max] and round to the nearest fp16 value, so fp16 storage is lossless."""
    return s.clamp_(SCALE_FLOOR, SCALE_CEIL).to(torch.float16).to(torch.float32)


def _quantize_codes(w: torch.Tensor, bits: float, group_size: int | None, scale_factor: float,
                    fixed_scale: torch.Tensor | None = None,
                    clip_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 codes (in the block view) and the float32 scale. Runs without autograd."""
    if not w.is_floating_point():
        raise ValueError(f"can only quantize floating-point weights, got dtype {w.dtype}")
    blocks = _blocks(w.to(torch.float32), group_size)

    if fixed_scale is not None:
        s = fixed_scale.to(device=w.device, dtype=torch.float32)
    elif bits == 1 or bits == TERNARY_BITS:
        if group_size is not None or bits == 1:   # per group / per output channel
            s = blocks.abs().mean(dim=-1, keepdim=True)
        else:   # BitNet b1.58: one scale for the whole tensor
            s = blocks.abs().mean().reshape(1, 1)
        s = _round_scale(s.mul_(scale_factor) if scale_factor != 1.0 else s)
    else:
        hi = 2 ** (int(bits) - 1) - 1
        absmax = _absmax(blocks)
        s = _mse_scale(blocks, int(bits), absmax) if clip_ratio is None else absmax * clip_ratio.div(hi)
        s = _round_scale(s.mul_(scale_factor) if scale_factor != 1.0 else s)

    if bits == 1:
        codes = torch.where(blocks >= 0, 1.0, -1.0)
    else:
        lo, hi = code_range(bits)
        codes = torch.div(blocks, s).round_().clamp_(lo, hi)
    return codes, s


def _mse_scale(blocks: torch.Tensor, k: int, absmax: torch.Tensor) -> torch.Tensor:
    """Per-row (last dim) symmetric scale minimising ||W - s clip(round(W / s))||²: clipping grid + LS refit."""
    lo, hi = -(2 ** (k - 1)), 2 ** (k - 1) - 1
    x = torch.empty_like(blocks)
    codes = torch.empty_like(blocks)

    def error_of(s: torch.Tensor) -> torch.Tensor:
        torch.div(blocks, s, out=x)
        torch.round(x, out=codes).clamp_(lo, hi)
        # ||W - s c|| = s ||W / s - c||: measured in code units, so no weight-sized temporary is needed.
        return torch.linalg.vector_norm(x.sub_(codes), dim=-1, keepdim=True).mul_(s)

    best_s = best_err = None
    for ratio in _CLIP_RATIOS[k]:
        s = _round_scale(absmax * (ratio / hi))   # evaluate exactly the scale that will be stored
        err = error_of(s)
        if best_s is None:
            best_s, best_err = s, err
        else:
            better = err < best_err
            best_s = torch.where(better, s, best_s)
            best_err = torch.where(better, err, best_err)
    # One least-squares refit of the scale for the codes of the best grid point; kept where it helps.
    torch.div(blocks, best_s, out=x)
    torch.round(x, out=codes).clamp_(lo, hi)
    numerator = (blocks * codes).sum(dim=-1, keepdim=True)
    denominator = codes.square().sum(dim=-1, keepdim=True)
    refit = _round_scale(torch.where(denominator > 0, numerator / denominator.clamp_min(1.0), best_s))
    return torch.where(error_of(refit) < best_err, refit, best_s)


def _fake_quantize_values(w: torch.Tensor, bits: float, group_size, scale_factor, fixed_scale=None,
                          clip_ratio=None) -> torch.Tensor:
    codes, s = _quantize_codes(w, bits, group_size, scale_factor, fixed_scale, clip_ratio)
    return codes.mul_(s).reshape(w.shape).to(w.dtype)


def _fake_quantize_activation_values(x: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    x32 = x.to(torch.float32)
    scale = qmax / x32.abs().amax(dim=-1, keepdim=True).clamp_min_(SCALE_FLOOR)
    return (x32 * scale).round_().clamp_(-qmax - 1, qmax).div_(scale).to(x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, bits, group_size, scale_factor, fixed_scale, clip_ratio):
        return _fake_quantize_values(w, bits, group_size, scale_factor, fixed_scale, clip_ratio)

    @staticmethod
    def backward(ctx, grad_output):
        # Straight-through: d fake_quantize(w) / dw := I. Returning grad_output keeps double backward working
        # (Hutchinson Hessian-vector products through quantized layers).
        return grad_output, None, None, None, None, None


class _ActQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits):
        return _fake_quantize_activation_values(x, bits)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None
