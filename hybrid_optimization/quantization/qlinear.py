"""QuantLinear: an nn.Linear whose forward uses fake-quantized weights (and optionally int8 activations).

The latent full-precision weight stays the trainable Parameter (quantization-aware training): every forward
quantizes it afresh and the straight-through estimator hands the gradient back to it unchanged.
`bits >= 16` makes the layer a plain Linear (passthrough), which lets a precision plan keep a layer at full
precision without changing the module tree.

A layer loaded from an export holds that export's scales in `fixed_scale` (a non-persistent buffer): re-quantizing
dequantized ternary weights with a fresh absmean would keep the codes but shrink the scale (~2/3), so the stored
scale is reused and the outputs match the exported model bit for bit. `release_scale()` returns to scales computed
from the weights (e.g. before fine-tuning the loaded model).

k-bit layers search an MSE clipping ratio per channel/group (the scale is ratio * absmax of the current weights).
The search costs ~10 passes over the weight, so in training a ratio may be reused for `scale_search_interval`
training forwards (default 16; the distillation pipeline uses 1, a search every step): the count of forwards alone
decides, never the weight's version counter — torch's fused optimizer kernels write weights without bumping it, and
a ratio keyed on it went stale for a whole run (issue 13). Outside training every forward searches on the current
weights (nothing cached, so no writer can leave it stale). `quantized_weight()` returns what the next forward
computes, so an export equals the layer. The cached ratio is not part of the state_dict: with
scale_search_interval=1 k-bit training does not depend on it, so a resumed run follows the uninterrupted one
exactly.

Activation quantization (act_bits) of one input tensor is computed once and shared: q/k/v projections (and
gate/up) read the same normed hidden states, and quantizing them three times would triple that cost.
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_optimization.quantization.quantizers import (TERNARY_BITS, QuantizedTensor, bits_label, fake_quantize,
                                                         normalize_bits, quantize_activations, quantize_weight,
                                                         search_clip_ratio)


class QuantLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits=1.58,
                 group_size: int | None = None, act_bits: int | None = None, scale_factor: float = 1.0,
                 device=None, dtype=None, scale_search_interval: int = 16):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("fixed_scale", None, persistent=False)
        self.register_buffer("clip_ratio", None, persistent=False)
        self._ratio_layout = None         # (bits, group_size) the cached training ratio was searched for
        self._forwards_since_search = 0
        if isinstance(scale_search_interval, bool) or not isinstance(scale_search_interval, int) \
                or scale_search_interval < 1:
            raise ValueError(f"scale_search_interval={scale_search_interval!r} is invalid: use an integer ≥ 1 "
                             "(1 = search the k-bit clipping every step)")
        self.scale_search_interval = scale_search_interval
        self.bits = bits
        self.group_size = group_size
        self.act_bits = act_bits
        self.scale_factor = scale_factor

    # -- settings, validated once here instead of on every forward ---------------------------------------------------
    @property
    def bits(self) -> float:
        return self._bits

    @bits.setter
    def bits(self, value) -> None:
        new = normalize_bits(value)
        if new != getattr(self, "_bits", new):   # a new bit-width invalidates a stored scale
            self.fixed_scale = None
        self._bits = new

    @property
    def group_size(self) -> int | None:
        return self._group_size

    @group_size.setter
    def group_size(self, value) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"group_size={value!r} is invalid: use a positive integer or None (per channel)")
            if self.in_features % value:
                raise ValueError(f"group_size={value} does not divide in_features={self.in_features}; "
                                 "choose a divisor of the input size or None (per channel)")
        if value != getattr(self, "_group_size", value):   # a new scale layout invalidates a stored scale
            self.fixed_scale = None
        self._group_size = value

    @property
    def act_bits(self) -> int | None:
        return self._act_bits

    @act_bits.setter
    def act_bits(self, value) -> None:
        if value is not None and (isinstance(value, bool) or value not in (2, 3, 4, 5, 6, 7, 8)):
            raise ValueError(f"act_bits={value!r} is not supported: use an integer from 2 to 8 (8 = int8 per "
                             "token), or None for full-precision activations")
        self._act_bits = None if value is None else int(value)

    @property
    def scale_factor(self) -> float:
        return self._scale_factor

    @scale_factor.setter
    def scale_factor(self, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
            raise ValueError(f"scale_factor={value!r} is invalid: it must be a finite number > 0")
        self._scale_factor = float(value)

    @property
    def is_quantized(self) -> bool:
        return self._bits < 16

    # -- behaviour -----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._act_bits is not None:
            x = _quantize_input(x, self._act_bits)
        weight = self.weight
        if self._bits < 16:
            ratio = self._current_clip_ratio(in_forward=True)
            if self.training:
                self._forwards_since_search += 1
            weight = fake_quantize(weight, self._bits, self._group_size, self._scale_factor, self.fixed_scale, ratio)
        return F.linear(x, weight, self.bias)

    def quantized_weight(self) -> QuantizedTensor:
        """Codes and scales of the weight exactly as the forward pass uses them."""
        if self._bits >= 16:
            raise ValueError(f"layer is full precision (bits={self._bits:g}): it has no quantized weight")
        return quantize_weight(self.weight, self._bits, self._group_size, self._scale_factor, self.fixed_scale,
                               self._current_clip_ratio())

    def release_scale(self) -> None:
        """Forget a scale loaded from an export: scales are computed from the weights again."""
        self.fixed_scale = None

    def _current_clip_ratio(self, in_forward: bool = False) -> torch.Tensor | None:
        """The k-bit clipping ratio the next forward uses (rules in the module docstring); only a training forward
        stores a searched ratio, so quantized_weight() never changes a training run."""
        if self._bits < 2 or self._bits == TERNARY_BITS or self.fixed_scale is not None:
            return None
        layout = (self._bits, self._group_size)
        due = (not self.training or self.clip_ratio is None or layout != self._ratio_layout
               or self._forwards_since_search >= self.scale_search_interval)
        if not due:
            return self.clip_ratio
        ratio = search_clip_ratio(self.weight, self._bits, self._group_size)
        if in_forward and self.training:
            self.clip_ratio, self._ratio_layout, self._forwards_since_search = ratio, layout, 0
        return ratio

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits, group_size: int | None = None, act_bits: int | None = None,
                    scale_factor: float = 1.0, scale_search_interval: int = 16) -> "QuantLinear":
        """A QuantLinear that shares `linear`'s Parameter objects (an optimizer built earlier keeps working)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=bits,
                    group_size=None, act_bits=act_bits, scale_factor=scale_factor, device="meta",
                    scale_search_interval=scale_search_interval)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.group_size = group_size
        layer.train(linear.training)
        return layer

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, bits={bits_label(self._bits)}"
        if self._group_size is not None:
            text += f", group_size={self._group_size}"
        if self._act_bits is not None:
            text += f", act_bits={self._act_bits}"
        if self._scale_factor != 1.0:
            text += f", scale_factor={self._scale_factor:g}"
        return text


# One-entry cache of the last quantized input, per thread: consecutive layers that read the same tensor (q/k/v,
# gate/up) reuse it. The entry is keyed on the tensor itself (a weak reference, so no activation is kept alive by
# the key), its in-place version, the bit-width and the grad mode; the result is a regular autograd node, so
# sharing it between layers gives the same gradients as computing it for each.
_last_input = threading.local()


def _quantize_input(x: torch.Tensor, bits: int) -> torch.Tensor:
    key = (x._version, bits, torch.is_grad_enabled(), x.requires_grad, x.shape, x.device)
    entry = getattr(_last_input, "entry", None)
    if entry is not None and entry[0]() is x and entry[1] == key:
        return entry[2]
    result = quantize_activations(x, bits)
    _last_input.entry = (weakref.ref(x), key, result)
    return result
