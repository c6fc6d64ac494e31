"""HybridTrainingConfig: the guide's configuration, validated, and round-tripping through JSON.

Every field of the guide's "Configuration Reference" is here with the same name and default. A few fields the
guide leaves implicit are added at the end (how the trust region is measured, which base optimizer, ...); they
have defaults that keep the guide's behaviour.

Validation lives in one place, `config_errors`, so the CLI and the workbench show the same messages: a bad value
raises `ConfigError` naming the field, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any

# The choices (bit-widths the quantizers implement — 1.58 is ternary —, trust-region modes, base optimizers) are
# defined once, in the torch-free vocabulary.
from .schema import (BASE_OPTIMIZERS, HYBRID_BASES, SUPPORTED_BITS,  # noqa: F401  (re-exported)
                     TRUST_REGION_MODES, UnsupportedBitsError, normalize_bits)

# Upper bounds of the sizes: far beyond what a run on this project's hardware needs, and low enough that nothing
# downstream (SQLite integers, tensor shapes, memory) can overflow. ONE bound per quantity: the CLI's flags, the
# form, the sweep's ranges and the options file are all checked against these rules (options.py reuses them).
MAX_STEPS = 10_000_000          # optimizer steps in total
MAX_BATCH_SIZE = 65_536         # windows per step (the CLI also checks the memory available)
MAX_CLUSTERS = 4_096            # data and parameter clusters
MAX_SEED = 2 ** 32 - 1          # numpy's and torch's seed range
MAX_LEARNING_RATE = 10.0        # base and auxiliary learning rates: (0, 10]


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value and what is allowed."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class HybridTrainingConfig:
    # Quantization
    use_quantization: bool = True              # Enable quantization
    quantizer_scale: float = 1.0               # Scale factor
    target_bits: float = 1.58                  # Ternary quantization

    # Clustering
    use_clustering: bool = True                # Enable data/param clustering
    data_clusters: int = 8                     # Number of data clusters
    parameter_clusters: int = 4                # Number of param clusters

    # Auxiliary NN
    use_auxiliary_nn: bool = True              # Enable meta-learner
    auxiliary_nn_hidden_size: int = 16         # Hidden layer size
    auxiliary_nn_learning_rate: float = 0.001  # Meta-learner LR

    # Trust Region
    use_trust_region: bool = True              # Enable trust region
    initial_trust_radius: float = 0.01         # Initial constraint radius
    trust_radius_adaptation: bool = True       # Adapt radius during training

    # Optimization
    base_learning_rate: float = 0.001          # Base learning rate
    max_steps: int = 1000                      # Maximum training steps
    batch_size: int = 32                       # Batch size
    momentum: float = 0.9                      # Momentum for constrained opt
    weight_decay: float = 1e-5                 # L2 regularization

    # Logging
    log_interval: int = 10                     # Log every N steps
    eval_interval: int = 50                    # Evaluate every N steps

    # --- Not in the guide's table; defaults keep the guide's behaviour. ---
    # "absolute": ||ΔΘ||₂ ≤ μ over all parameters (the guide's formula). "relative": every tensor W obeys
    # ||ΔW||₂ ≤ μ·||W||₂ (LAMB-like), so one large layer cannot take the whole budget. "rms" (the default, issue 16):
    # the guide's formula in update-RMS units, ||ΔΘ||₂ ≤ μ·max_update_rms·√N over the N updated entries: at the
    # tiny preset (N ≈ 1.08 M) it is the absolute region within 4 % and ties it at the worst LR of a 100× grid on
    # both benchmark workloads, while with the smollm2 student the absolute region held every step at μ = 1 and left
    # the learned LR nothing to steer (benchmarks/results/hybrid-default/NOTE.md).
    trust_region_mode: str = "rms"
    # Base direction before the LR multiplier and the trust region: AdamW (betas = (momentum, 0.999)) or SGD with
    # momentum, as the guide's ConstrainedOptimizer describes.
    base_optimizer: str = "adamw"
    # Horizon (in steps) of the hypergradient that trains the LR head: 1 is the classic one-step hypergradient
    # g_t·Δ_{t-1}; H > 1 uses an exponential average of the last ~H updates (less greedy).
    meta_horizon: int = 1
    # The update the LR head's hypergradient looks at: False (the default since issue 16) the whole update applied;
    # True only the tensors the trust region left free, the default before — under a whole-model region that binds,
    # that signal is empty and the learned multiplier stays at ×1.00 (benchmarks/results/robustness/report.md).
    projected_hypergradient: bool = False
    # Cluster-balanced sampling: a sample may be drawn at most this many times per epoch, so tiny clusters are
    # not endlessly repeated (ClusterClip).
    max_sample_repeats: int = 2
    # Optional cap on the parameter-weighted average bits of the per-layer precision plan (None: no cap).
    precision_budget: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        errors = config_errors(dataclasses.asdict(self))
        if errors:
            field_name, message = next(iter(errors.items()))
            raise ConfigError(message, field=field_name)
        # Normalise numeric types so JSON round trips and comparisons are exact (e.g. target_bits=2 -> 2.0).
        self.target_bits = normalize_bits(self.target_bits)
        for f in fields(self):
            if f.type in ("float", "float | None") and isinstance(getattr(self, f.name), int) \
                    and not isinstance(getattr(self, f.name), bool):
                setattr(self, f.name, float(getattr(self, f.name)))

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HybridTrainingConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object (mapping of field -> value), got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}; allowed fields: {', '.join(sorted(known))}",
                              field=unknown[0])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "HybridTrainingConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)


# -- validation ------------------------------------------------------------------------------------------------
# One rule per field: (kind, check, description of what is allowed).
def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _int_at_least(lo: int):
    return lambda v: _is_int(v) and v >= lo, f"an integer ≥ {lo}"


def _int_in(lo: int, hi: int):
    return lambda v: _is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi:,}]"


def _learning_rate():
    return (lambda v: _is_number(v) and 0 < v <= MAX_LEARNING_RATE,
            f"a number in (0, {MAX_LEARNING_RATE:g}] (a learning rate of 0 trains nothing)")


def _quantized_bits(value: Any) -> bool:
    try:
        return _is_number(value) and normalize_bits(value) < 16
    except UnsupportedBitsError:
        return False


def _positive():
    return lambda v: _is_number(v) and v > 0, "a finite number > 0"


def _non_negative():
    return lambda v: _is_number(v) and v >= 0, "a finite number ≥ 0"


def _boolean():
    return _is_bool, "true or false"


FIELD_RULES: dict[str, tuple] = {
    "use_quantization": _boolean(),
    "quantizer_scale": _positive(),
    "target_bits": (_quantized_bits, "one of 1, 1.58, 2, 4, 8"),
    "use_clustering": _boolean(),
    "data_clusters": _int_in(1, MAX_CLUSTERS),
    "parameter_clusters": _int_in(1, MAX_CLUSTERS),
    "use_auxiliary_nn": _boolean(),
    "auxiliary_nn_hidden_size": _int_at_least(1),
    "auxiliary_nn_learning_rate": _learning_rate(),
    "use_trust_region": _boolean(),
    "initial_trust_radius": (lambda v: _is_number(v) and 0.001 <= v <= 1.0,
                             "a number in [0.001, 1.0] (the trust-radius range)"),
    "trust_radius_adaptation": _boolean(),
    "base_learning_rate": _learning_rate(),
    "max_steps": _int_in(1, MAX_STEPS),
    "batch_size": _int_in(1, MAX_BATCH_SIZE),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": _non_negative(),
    "log_interval": _int_at_least(1),
    "eval_interval": _int_at_least(1),
    "trust_region_mode": (lambda v: v in TRUST_REGION_MODES, "one of " + ", ".join(TRUST_REGION_MODES)),
    "base_optimizer": (lambda v: v in HYBRID_BASES, "one of " + ", ".join(HYBRID_BASES)),
    "meta_horizon": _int_at_least(1),
    "projected_hypergradient": _boolean(),
    "max_sample_repeats": _int_at_least(1),
    "precision_budget": (lambda v: v is None or (_is_number(v) and 1 <= v <= 8),
                         "empty (no budget) or a number of average bits in [1, 8]"),
    "seed": _int_in(0, MAX_SEED),
}


def field_error(name: str, value: Any) -> str | None:
    """The error message for one field's value, or None when it is valid."""
    if name not in FIELD_RULES:
        return f"unknown config field '{name}'"
    check, allowed = FIELD_RULES[name]
    try:
        ok = bool(check(value))
    except Exception:
        ok = False
    if ok:
        return None
    return f"HybridTrainingConfig.{name} = {value!r} is invalid: it must be {allowed}"


def config_errors(values: dict[str, Any]) -> dict[str, str]:
    """All field errors of a mapping of config values, in field order (empty when valid)."""
    errors = {}
    for name, value in values.items():
        message = field_error(name, value)
        if message:
            errors[name] = message
    return errors
