"""The configuration form's layout: which HybridTrainingConfig field goes in which group, with what help text and
which kind of widget — and the parsing of what users type back into config values.

Fields, defaults and choices come from `hybrid_optimization.config` itself; validation is its `config_errors` /
`field_error` (one validation, not a copy). A field added to the config later appears in "Other" on its own.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from hybrid_optimization.config import (HYBRID_BASES, SUPPORTED_BITS, TRUST_REGION_MODES, HybridTrainingConfig,
                                        config_errors)
from hybrid_optimization.distill.options import MAX_SEQ_LEN, MIN_SEQ_LEN
from hybrid_optimization.schema import MAX_UPDATE_RMS

# The guide's groups, in the guide's order; fields the guide leaves implicit join the group they belong to.
GROUPS: dict[str, tuple[str, ...]] = {
    "Quantization": ("use_quantization", "quantizer_scale", "target_bits", "precision_budget"),
    "Clustering": ("use_clustering", "data_clusters", "parameter_clusters", "max_sample_repeats"),
    "Auxiliary NN": ("use_auxiliary_nn", "auxiliary_nn_hidden_size", "auxiliary_nn_learning_rate", "meta_horizon",
                     "projected_hypergradient"),
    "Trust Region": ("use_trust_region", "initial_trust_radius", "trust_radius_adaptation", "trust_region_mode"),
    "Optimization": ("base_learning_rate", "max_steps", "batch_size", "momentum", "weight_decay", "base_optimizer",
                     "seed"),
    "Logging": ("log_interval", "eval_interval"),
}
# Help texts: the guide's comments for its fields, config.py's explanations for the added ones.
HELP: dict[str, str] = {
    "use_quantization": "Enable quantization (quantization-aware training of the student).",
    "quantizer_scale": "Scale factor applied by the quantizer.",
    "target_bits": "Bits per weight. 1.58 = ternary {−1, 0, +1} (BitNet b1.58); 1 = binary (XNOR-Net).",
    "precision_budget": "Optional cap on the parameter-weighted average bits of the per-layer precision plan. "
                        "Empty: no cap.",
    "use_clustering": "Enable data/param clustering.",
    "data_clusters": "Number of data clusters (K-means over sample features).",
    "parameter_clusters": "Number of param clusters (K-means over per-layer sensitivity; sets per-layer bits).",
    "max_sample_repeats": "Cluster-balanced sampling: a sample is drawn at most this many times per epoch, so tiny "
                          "clusters are not endlessly repeated (ClusterClip).",
    "use_auxiliary_nn": "Enable meta-learner (predicts the LR multiplier and the trust radius).",
    "auxiliary_nn_hidden_size": "Hidden layer size of the auxiliary network.",
    "auxiliary_nn_learning_rate": "Meta-learner LR.",
    "meta_horizon": "Horizon in steps of the hypergradient that trains the LR head (1 = one-step hypergradient).",
    "projected_hypergradient": "The LR head learns from the tensors the trust region left free only (the default "
                               "before issue 16), instead of the whole update applied. Under a region that binds "
                               "on every tensor, that signal is empty and the learned multiplier stays at ×1.",
    "use_trust_region": "Enable trust region: ‖ΔΘ‖₂ ≤ μ_t.",
    "initial_trust_radius": "Initial constraint radius μ₀ (range 0.001–1.0).",
    "trust_radius_adaptation": "Adapt radius during training.",
    "trust_region_mode": "absolute: ‖ΔΘ‖₂ ≤ μ over all parameters (the guide's formula). relative: every tensor W "
                         "obeys ‖ΔW‖₂ ≤ μ·‖W‖₂ (LAMB-like), so one large layer cannot take the whole budget. "
                         f"bounded: relative, and no tensor's update RMS above {MAX_UPDATE_RMS:g} (an LR set too high "
                         f"is held there). rms: absolute in update-RMS units, ‖ΔΘ‖₂ ≤ μ·{MAX_UPDATE_RMS:g}·√N over "
                         "all N parameters, so μ means the "
                         "same per-entry step at any model size (the default).",
    "base_learning_rate": "Base learning rate (the auxiliary NN multiplies it by 0.1×–10×).",
    "max_steps": "Maximum training steps.",
    "batch_size": "Batch size.",
    "momentum": "Momentum for constrained opt (AdamW β₁).",
    "weight_decay": "L2 regularization.",
    "base_optimizer": "Base direction before the LR multiplier and the trust region: AdamW, SGD with momentum, or Muon (hidden matrices; AdamW for the rest).",
    "seed": "Random seed of the run (data split, initialisation, sampling).",
    "log_interval": "Log every N steps.",
    "eval_interval": "Evaluate every N steps.",
}
CHOICES: dict[str, tuple] = {
    "target_bits": tuple(float(b) for b in SUPPORTED_BITS),
    "trust_region_mode": TRUST_REGION_MODES,
    "base_optimizer": HYBRID_BASES,
}
OPTIONAL = {"precision_budget"}


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(HybridTrainingConfig))


_DEFAULTS = HybridTrainingConfig().to_dict()


def defaults() -> dict[str, Any]:
    """The guide's defaults, as HybridTrainingConfig() has them."""
    return dict(_DEFAULTS)


def grouped_fields() -> dict[str, list[str]]:
    """Every config field in a group: the guide's groups first, anything unlisted in "Other"."""
    names = [f.name for f in config_fields()]
    groups = {title: [n for n in members if n in names] for title, members in GROUPS.items()}
    placed = {n for members in groups.values() for n in members}
    rest = [n for n in names if n not in placed]
    if rest:
        groups["Other"] = rest
    return groups


def widget_kind(name: str) -> str:
    """'choice', 'bool', 'int', or 'number' (free text parsed as a number, so the core validates whatever is
    typed — widgets with built-in bounds would be a second, silent validation)."""
    if name in CHOICES:
        return "choice"
    default = _DEFAULTS[name]
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    return "number"


def format_number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.0e}".replace("e-0", "e-")
    return str(value)


def parse_number(text: Any, optional: bool = False) -> Any:
    """What users type -> int or float where it parses; otherwise the text itself, so that the core's
    validation names the field and says what is allowed. Empty -> None."""
    if not isinstance(text, str):
        return text
    stripped = text.strip().replace("_", "")
    if stripped == "":
        return None
    try:
        return int(stripped)
    except ValueError:
        pass
    try:
        value = float(stripped)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


def values_from_widgets(raw: dict[str, Any]) -> dict[str, Any]:
    """Widget values (strings for numbers) -> config values, ready for `config_errors`."""
    values = {}
    for name, value in raw.items():
        kind = widget_kind(name)
        if kind == "number":
            parsed = parse_number(value, optional=name in OPTIONAL)
            # Float fields accept an integer typed by the user ("1" learning rate is 1.0).
            if isinstance(parsed, int) and isinstance(_DEFAULTS[name], float):
                parsed = float(parsed)
            values[name] = parsed
        elif kind == "int" and isinstance(value, float) and value.is_integer():
            values[name] = int(value)
        else:
            values[name] = value
    return values


def widget_value(name: str, value: Any) -> Any:
    """A config value -> the value its widget holds (text for numbers)."""
    return format_number(value) if widget_kind(name) == "number" else value


# Switches that only mean something for the hybrid optimizer: the baseline (AdamW at constant LR) turns them off,
# greys out their groups and saves them false.
HYBRID_SWITCHES = ("use_auxiliary_nn", "use_trust_region", "use_clustering")
HYBRID_GROUPS = ("Clustering", "Auxiliary NN", "Trust Region")
# Window length: the CLI's own bounds (one definition, in the torch-free options module).
SEQ_LEN_RANGE = (MIN_SEQ_LEN, MAX_SEQ_LEN)


def baseline_values(values: dict[str, Any]) -> dict[str, Any]:
    """The config a baseline run saves: the hybrid switches off."""
    return {**values, **{name: False for name in HYBRID_SWITCHES if name in values}}


def friendly_error(message: str) -> str:
    """The core's message without the class prefix (the field sits right above it on the form)."""
    return message.replace("HybridTrainingConfig.", "", 1)


def validate(values: dict[str, Any]) -> dict[str, str]:
    return {name: friendly_error(message) for name, message in config_errors(values).items()}
