"""Convert a model's nn.Linear layers to QuantLinear, in place, from one bit-width or a per-layer bit map.

Embeddings and the output head stay at full precision by default (BitNet keeps lm_head in full precision; the
logits are the most quantization-sensitive layer and the embedding is a lookup, not a Linear). A layer is kept when
the last component of its name contains one of `keep_full_precision` ("embed", "lm_head", "head", "output"),
unless a bit map names it explicitly.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch.nn as nn

from hybrid_optimization.quantization.qlinear import QuantLinear
from hybrid_optimization.quantization.quantizers import FULL_PRECISION, normalize_bits

DEFAULT_KEEP_FULL_PRECISION = ("embed", "lm_head", "head", "output")


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear (QuantLinear included) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear whose bits are below full precision, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear) and m.is_quantized}


def is_kept_full_precision(name: str, keep_full_precision: Iterable[str] = DEFAULT_KEEP_FULL_PRECISION) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    return any(pattern.lower() in last for pattern in keep_full_precision)


def quantizable_layer_names(model: nn.Module,
                            keep_full_precision: Iterable[str] = DEFAULT_KEEP_FULL_PRECISION) -> list[str]:
    """Names of the Linear layers that `quantize_model(model, bits)` would quantize (model order)."""
    return [name for name in linear_layers(model) if not is_kept_full_precision(name, keep_full_precision)]


def quantize_model(model: nn.Module, bits, *, group_size: int | None = None, act_bits: int | None = None,
                   keep_full_precision: Iterable[str] = DEFAULT_KEEP_FULL_PRECISION,
                   scale_factor: float = 1.0) -> dict[str, float]:
    """Replace nn.Linear layers by QuantLinear in place; return {name: bits} of every Linear (32 = full precision).

    `bits`: one bit-width for all quantizable layers, or {qualified_name: bits}; in a dict, layers not named keep
    their current state unless a "*" key gives a default (applied like a single bit-width: embeddings and heads
    excepted). Existing QuantLinear layers get their settings updated.
    """
    layers = linear_layers(model)
    keep = tuple(keep_full_precision)
    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(layers) - {"*"})
        if unknown:
            shown = ", ".join(list(layers)[:12]) + (", …" if len(layers) > 12 else "")
            raise ValueError(f"bit map names {len(unknown)} layer(s) that are not nn.Linear modules of the model: "
                             f"{', '.join(unknown[:8])}; Linear layers are: {shown or '(none)'}")
        explicit = {name: normalize_bits(b) for name, b in bits.items() if name != "*"}
        default = normalize_bits(bits["*"]) if "*" in bits else None
    else:
        explicit, default = {}, normalize_bits(bits)

    for name, module in layers.items():
        if name in explicit:
            target = explicit[name]
        elif default is not None and not is_kept_full_precision(name, keep):
            target = default
        else:
            continue
        if not name:
            raise ValueError("quantize_model converts a model's submodules in place; the model itself is an "
                             "nn.Linear: wrap it, e.g. nn.Sequential(linear)")
        try:
            if isinstance(module, QuantLinear):
                module.bits = target
                module.group_size = group_size
                module.act_bits = act_bits
                module.scale_factor = scale_factor
            elif target < 16:
                _replace_module(model, name, QuantLinear.from_linear(module, target, group_size=group_size,
                                                                       act_bits=act_bits, scale_factor=scale_factor))
        except ValueError as exc:
            raise ValueError(f"layer '{name}': {exc}") from None

    return {name: (m.bits if isinstance(m, QuantLinear) else FULL_PRECISION)
            for name, m in linear_layers(model).items()}


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
