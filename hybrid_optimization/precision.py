"""Parameter clustering -> a per-layer precision plan (which Linear layer gets how many bits).

1. `layer_sensitivity` measures, for each quantizable Linear layer:
   - err_<bits>: relative quantization error ||W - Q(W)|| / ||W|| at each candidate bit-width;
   - hessian_trace: Hutchinson estimate of tr(H_layer) / n_params, E[vᵀHv] over Rademacher vectors v, with
     Hessian-vector products by double backward (HAWQ-V2). One product serves all layers at once: the block
     v_lᵀ(Hv)_l is an unbiased estimate of tr(H_ll) because the cross terms vanish in expectation;
   - fisher: mean squared gradient of the layer's weights (empirical Fisher diagonal, averaged over batches);
   - sensitivity: HAWQ-V2's  curvature × ||W - Q_lowest(W)||²  with curvature = hessian_trace, or the Fisher when
     the Hutchinson estimate is ≤ 0 (saddle region or noise; the Fisher / Gauss-Newton curvature is never negative)
     or when hutchinson_samples = 0.
2. `plan_precision` clusters the layers with K-means (KMeansClustering, scikit-learn) on standardised log features,
   ranks the groups by sensitivity and gives the most sensitive group the most bits (the guide's 4-group example:
   2 / 1.58 / 1.58 / 1), then optionally enforces an average-bits budget.
3. `PrecisionPlan` is plain data: save/load as JSON, show as records (DataFrame rows), apply to a model.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hybrid_optimization.clustering import KMeansClustering
from hybrid_optimization.quantization import (SUPPORTED_BITS, bits_label, linear_layers, normalize_bits,
                                              quantizable_layer_names, quantize_model, relative_quantization_error)

DEFAULT_CANDIDATE_BITS = (1, 1.58, 2, 4, 8)
# Bits per sensitivity rank (most sensitive first). 4 groups is the guide's example; fewer groups take the ends
# and middle of it; more groups extend it upwards, so the most sensitive layers of a finely clustered model can
# reach 4 and 8 bits.
DEFAULT_PRECISION_LADDERS: dict[int, tuple[float, ...]] = {
    1: (1.58,),
    2: (2, 1.58),
    3: (2, 1.58, 1),
    4: (2, 1.58, 1.58, 1),
    5: (4, 2, 1.58, 1.58, 1),
    6: (8, 4, 2, 1.58, 1.58, 1),
    7: (8, 4, 2, 2, 1.58, 1.58, 1),
    8: (8, 4, 4, 2, 2, 1.58, 1.58, 1),
}


def precision_ladder(n_groups: int) -> tuple[float, ...]:
    """Default bits of each sensitivity rank for `n_groups` groups (more than 8: the 8-ladder stretched)."""
    if n_groups < 1:
        raise ValueError(f"the number of groups must be ≥ 1, got {n_groups}")
    if n_groups in DEFAULT_PRECISION_LADDERS:
        return tuple(float(b) for b in DEFAULT_PRECISION_LADDERS[n_groups])
    base = DEFAULT_PRECISION_LADDERS[8]
    return tuple(float(base[round(i * (len(base) - 1) / (n_groups - 1))]) for i in range(n_groups))


def error_key(bits) -> str:
    return f"err_{bits_label(bits)}"


# -- 1. sensitivity features ---------------------------------------------------------------------------------------
def layer_sensitivity(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batches: Iterable,
                      candidate_bits: Sequence = DEFAULT_CANDIDATE_BITS, hutchinson_samples: int = 8,
                      layers: Sequence[str] | None = None, seed: int = 0) -> list[dict]:
    """Sensitivity features of each Linear layer (default: those quantize_model would quantize), in model order."""
    candidates = sorted({normalize_bits(b) for b in candidate_bits})
    if not candidates or candidates[-1] >= 16:
        raise ValueError(f"candidate_bits must be quantized bit-widths from {SUPPORTED_BITS}, got {candidate_bits!r}")
    if isinstance(hutchinson_samples, bool) or not isinstance(hutchinson_samples, int) or hutchinson_samples < 0:
        raise ValueError(f"hutchinson_samples must be an integer ≥ 0, got {hutchinson_samples!r}")
    all_linear = linear_layers(model)
    names = list(layers) if layers is not None else quantizable_layer_names(model)
    unknown = [n for n in names if n not in all_linear]
    if unknown:
        raise ValueError(f"layers {unknown[:8]} are not nn.Linear modules of the model")
    if not names:
        raise ValueError("the model has no Linear layers to measure (all are kept at full precision)")
    weights = [all_linear[n].weight for n in names]
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: give at least one batch to measure the loss curvature on")

    n_batches = len(batches)
    was_training = model.training
    requires_grad = [w.requires_grad for w in weights]
    model.eval()   # no dropout noise inside Hessian-vector products
    try:
        for w in weights:
            w.requires_grad_(True)
        # Fused attention kernels (flash / memory-efficient, on CPU too) have no double backward: use the math one.
        with sdpa_kernel([SDPBackend.MATH]):
            traces, fishers = _curvature_sums(model, loss_fn, batches, weights, hutchinson_samples, seed)
    finally:
        for w, flag in zip(weights, requires_grad):
            w.requires_grad_(flag)
        model.train(was_training)

    lowest = candidates[0]
    rows = []
    for i, name in enumerate(names):
        w = weights[i].detach()
        n = w.numel()
        row: dict[str, Any] = {"name": name, "n_params": n, "module_type": name.rsplit(".", 1)[-1],
                               "shape": list(w.shape)}
        for b in candidates:
            row[error_key(b)] = relative_quantization_error(w, b)
        trace = float(traces[i]) / (n_batches * max(hutchinson_samples, 1) * n) if hutchinson_samples else math.nan
        fisher = float(fishers[i]) / n_batches
        use_trace = hutchinson_samples > 0 and trace > 0
        curvature = trace if use_trace else fisher
        weight_sq_norm = float(w.double().square().sum())
        row.update({
            "hessian_trace": trace, "fisher": fisher, "curvature": curvature,
            "curvature_source": "hutchinson" if use_trace else "fisher",
            "weight_sq_norm": weight_sq_norm, "lowest_bits": lowest,
            "sensitivity": curvature * row[error_key(lowest)] ** 2 * weight_sq_norm,
        })
        rows.append(row)
    return rows


def _curvature_sums(model, loss_fn, batches, weights, hutchinson_samples, seed):
    """Per weight tensor: sum over batches and samples of vᵀ(Hv), and sum over batches of mean(g²)."""
    traces = torch.zeros(len(weights), dtype=torch.float64)
    fishers = torch.zeros(len(weights), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        loss = loss_fn(model, batch)
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise ValueError("loss_fn(model, batch) must return a scalar loss tensor")
        grads = torch.autograd.grad(loss, weights, create_graph=hutchinson_samples > 0, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]
        fishers += torch.tensor([float(g.detach().double().square().mean()) for g in grads])
        differentiable = [i for i, g in enumerate(grads) if g.requires_grad]
        if hutchinson_samples == 0 or not differentiable:
            continue
        for _ in range(hutchinson_samples):
            vs = [torch.randint(0, 2, w.shape, generator=generator).to(w) * 2 - 1 for w in weights]
            hvs = torch.autograd.grad([grads[i] for i in differentiable], weights,
                                      grad_outputs=[vs[i] for i in differentiable], retain_graph=True,
                                      allow_unused=True)
            traces += torch.tensor([0.0 if hv is None else float((v * hv).double().sum()) for v, hv in zip(vs, hvs)])
    return traces, fishers


# -- 2. the plan ---------------------------------------------------------------------------------------------------
@dataclass
class PrecisionPlan:
    layers: dict[str, dict]                       # name -> {"bits", "cluster", **features}
    cluster_bits: dict[int, float]                # cluster (0 = most sensitive) -> bits before the budget
    budget: float | None = None
    avg_bits: float = math.nan                    # parameter-weighted average bits of the plan
    metadata: dict = field(default_factory=dict)  # how the plan was made (n_clusters, seed, ...)

    def bit_map(self) -> dict[str, float]:
        return {name: float(info["bits"]) for name, info in self.layers.items()}

    def apply(self, model: nn.Module, **quantize_kwargs) -> dict[str, float]:
        """Quantize `model` in place with this plan (quantize_model with the bit map); returns the resulting map."""
        return quantize_model(model, self.bit_map(), **quantize_kwargs)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "cluster_bits": {str(k): v for k, v in self.cluster_bits.items()},
                "budget": self.budget, "avg_bits": self.avg_bits, "metadata": self.metadata}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_json_safe(self.to_dict()), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "PrecisionPlan":
        try:
            layers = {str(name): dict(info) for name, info in data["layers"].items()}
            for name, info in layers.items():
                info["bits"] = normalize_bits(info["bits"])
                info["cluster"] = int(info["cluster"])
            cluster_bits = {int(k): normalize_bits(v) for k, v in data["cluster_bits"].items()}
            budget = data.get("budget")
            plan = cls(layers=layers, cluster_bits=cluster_bits,
                       budget=None if budget is None else float(budget), metadata=dict(data.get("metadata", {})))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a precision plan (expected 'layers' and 'cluster_bits'): {exc!r}") from None
        plan.avg_bits = _average_bits(plan.layers)
        return plan

    @classmethod
    def from_json(cls, text: str) -> "PrecisionPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"precision plan is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("a precision plan must be a JSON object")
        return cls.from_dict(data)

    def save(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> "PrecisionPlan":
        return cls.from_json(Path(path).read_text())


def plan_precision(features: list[dict], n_clusters: int = 4, precisions: Sequence | None = None,
                   budget: float | None = None, seed: int = 0) -> PrecisionPlan:
    """Cluster layers by sensitivity features and map the groups to bit-widths (most sensitive -> most bits).

    precisions: bits per sensitivity rank, most sensitive first (sorted descending here). Default: the guide's
    ladder for the group count (`precision_ladder`). When there are fewer groups than precisions (few layers),
    ranks take evenly spaced entries, so the most and least sensitive keep the extremes (a single group takes the
    middle entry).
    budget: maximum parameter-weighted average bits. Layers are demoted one level at a time, cheapest estimated
    loss increase per saved bit first, until the plan fits; then demoted layers are promoted back (largest loss
    decrease per bit first) while the budget still holds. The budget only ever lowers bits.
    """
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be an integer ≥ 1, got {n_clusters!r}")
    if not features:
        raise ValueError("no layer features: run layer_sensitivity on a model with quantizable Linear layers")
    for row in features:
        missing = {"name", "n_params", "sensitivity"} - set(row)
        if missing:
            raise ValueError(f"layer features need 'name', 'n_params' and 'sensitivity'; {row.get('name', row)!r} "
                             f"lacks {sorted(missing)}")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
            raise ValueError(f"budget must be a number of average bits (≥ 1) or None, got {budget!r}")
        if budget < 1:
            raise ValueError(f"budget={budget:g} average bits is below 1, the smallest bit-width: no plan fits it")

    if precisions is None:
        ladder = precision_ladder(n_clusters)
    else:
        ladder = tuple(sorted((normalize_bits(b) for b in precisions), reverse=True))
        if len(ladder) != n_clusters:
            raise ValueError(f"precisions has {len(ladder)} bit-width(s) but n_clusters={n_clusters}: give one "
                             "bit-width per group, most sensitive first")

    matrix = _feature_matrix(features)
    k = min(n_clusters, len(features), len(np.unique(matrix.round(decimals=9), axis=0)))
    labels = KMeansClustering(n_clusters=k, random_state=seed).fit(matrix).labels_ if k > 1 \
        else np.zeros(len(features), dtype=np.int64)

    # Rank groups by the mean log sensitivity of their layers; cluster ids become ranks (0 = most sensitive).
    log_sens = np.log10(np.array([max(float(r["sensitivity"]), 0.0) for r in features]) + _tiny(features))
    raw_ids = sorted(set(labels.tolist()), key=lambda c: -float(log_sens[labels == c].mean()))
    rank_of = {raw: rank for rank, raw in enumerate(raw_ids)}
    n_groups = len(raw_ids)

    # One group (e.g. all layers alike) takes the middle of the ladder: there is nothing to rank.
    picks = [round(i * (len(ladder) - 1) / (n_groups - 1)) for i in range(n_groups)] if n_groups > 1 \
        else [len(ladder) // 2]
    cluster_bits = {rank: float(ladder[p]) for rank, p in enumerate(picks)}

    layers: dict[str, dict] = {}
    for row, raw in zip(features, labels.tolist()):
        rank = rank_of[raw]
        info = {key: _plain(value) for key, value in row.items() if key != "name"}
        layers[str(row["name"])] = {"bits": cluster_bits[rank], "cluster": rank, **info}

    if budget is not None:
        _enforce_budget(layers, float(budget))
    plan = PrecisionPlan(layers=layers, cluster_bits=cluster_bits, budget=None if budget is None else float(budget),
                         metadata={"n_clusters": n_clusters, "n_groups": n_groups, "seed": seed,
                                   "precisions": list(ladder)})
    plan.avg_bits = _average_bits(layers)
    return plan


def build_precision_plan(model: nn.Module, loss_fn, batches, n_clusters: int = 4, budget: float | None = None,
                         precisions: Sequence | None = None, candidate_bits: Sequence = DEFAULT_CANDIDATE_BITS,
                         hutchinson_samples: int = 8, layers: Sequence[str] | None = None,
                         seed: int = 0) -> PrecisionPlan:
    """layer_sensitivity + plan_precision in one call."""
    features = layer_sensitivity(model, loss_fn, batches, candidate_bits=candidate_bits,
                                 hutchinson_samples=hutchinson_samples, layers=layers, seed=seed)
    return plan_precision(features, n_clusters=n_clusters, precisions=precisions, budget=budget, seed=seed)


# -- helpers -------------------------------------------------------------------------------------------------------
def _tiny(features: list[dict]) -> float:
    largest = max((abs(float(r["sensitivity"])) for r in features), default=0.0)
    return max(largest * 1e-12, 1e-300)


def _feature_matrix(features: list[dict]) -> np.ndarray:
    """Standardised log10 features: sensitivity, curvature estimates and the error at each candidate bit-width.

    Columns are centred and divided by max(std, 1 decade)."""
    keys = ["sensitivity"] + [k for k in ("hessian_trace", "fisher") if all(k in r for r in features)]
    keys += sorted({k for r in features for k in r if k.startswith("err_")} &
                   set.intersection(*({k for k in r} for r in features)))
    columns = []
    for key in keys:
        values = np.array([float(r[key]) for r in features], dtype=np.float64)
        values = np.where(np.isfinite(values), np.maximum(values, 0.0), 0.0)
        floor = max(values.max() * 1e-12, 1e-300)
        column = np.log10(values + floor)
        # Standardise, but never magnify: a column that varies by less than a decade (e.g. the errors of
        # same-shaped layers, 0.38 vs 0.39) must not weigh as much as sensitivities that differ 1000-fold.
        columns.append((column - column.mean()) / max(column.std(), 1.0))
    return np.stack(columns, axis=1).astype(np.float32)


def _average_bits(layers: dict[str, dict]) -> float:
    total = sum(int(info["n_params"]) for info in layers.values())
    if total == 0:
        return math.nan
    return sum(float(info["bits"]) * int(info["n_params"]) for info in layers.values()) / total


def _estimated_error(info: dict, bits: float) -> float:
    """Relative quantization error at `bits` from the measured err_<bits>; unmeasured widths are extrapolated
    from the nearest measured one with the uniform-quantizer rule error ∝ 2^-bits."""
    if bits >= 16:
        return 0.0
    key = error_key(bits)
    if key in info:
        return float(info[key])
    measured = [(normalize_bits(k[4:]), float(v)) for k, v in info.items() if k.startswith("err_")]
    if not measured:
        return 2.0 ** -bits
    ref_bits, ref_err = min(measured, key=lambda m: abs(m[0] - bits))
    return ref_err * 2.0 ** -(bits - ref_bits)


def _loss_increase(info: dict, from_bits: float, to_bits: float) -> float:
    """Second-order loss estimate of moving a layer between bit-widths: ½ curvature ||ΔW||² (HAWQ-V2)."""
    curvature = float(info.get("curvature", 0.0) or 0.0)
    weight_sq_norm = float(info.get("weight_sq_norm", 0.0) or 0.0)
    if curvature <= 0 or weight_sq_norm <= 0:   # features without those fields: sensitivity is the proxy
        lowest = float(info.get("lowest_bits", 1.0))
        reference = _estimated_error(info, lowest) ** 2 or 1.0
        scale = float(info["sensitivity"]) / reference
    else:
        scale = curvature * weight_sq_norm
    return 0.5 * scale * (_estimated_error(info, to_bits) ** 2 - _estimated_error(info, from_bits) ** 2)


def _enforce_budget(layers: dict[str, dict], budget: float) -> None:
    levels = sorted({*map(float, SUPPORTED_BITS), *(float(i["bits"]) for i in layers.values())})
    total = sum(int(i["n_params"]) for i in layers.values())
    used = sum(float(i["bits"]) * int(i["n_params"]) for i in layers.values())
    planned = {name: float(info["bits"]) for name, info in layers.items()}

    def step(bits: float, direction: int) -> float | None:
        i = levels.index(bits) + direction
        return levels[i] if 0 <= i < len(levels) else None

    # Demote: cheapest loss increase per saved bit first.
    while used > budget * total + 1e-9:
        best = None
        for name, info in layers.items():
            lower = step(float(info["bits"]), -1)
            if lower is None:
                continue
            saved = (float(info["bits"]) - lower) * int(info["n_params"])
            cost = _loss_increase(info, float(info["bits"]), lower) / saved
            if best is None or cost < best[0]:
                best = (cost, name, lower, saved)
        if best is None:
            break
        _, name, lower, saved = best
        layers[name]["bits"] = lower
        used -= saved
    # Promote back towards the cluster's bits while the budget holds: largest loss decrease per bit first.
    while True:
        best = None
        for name, info in layers.items():
            if float(info["bits"]) >= planned[name]:
                continue
            higher = step(float(info["bits"]), +1)
            extra = (higher - float(info["bits"])) * int(info["n_params"])
            if used + extra > budget * total + 1e-9:
                continue
            gain = -_loss_increase(info, float(info["bits"]), higher) / extra
            if best is None or gain > best[0]:
                best = (gain, name, higher, extra)
        if best is None:
            break
        _, name, higher, extra = best
        layers[name]["bits"] = higher
        used += extra


def _plain(value):
    """numpy / torch scalars and arrays -> JSON-friendly Python values."""
    if isinstance(value, (np.generic,)):
        return value.item()
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
