"""HybridController: the decisions of the hybrid optimizer, in plain numbers (no tensors).

HybridOptimizer (optim.py) measures a few sums over the parameters each step — ‖g_t‖, g_t·Δ_{t-1}, ‖u_i‖, g_t·u_i —
and applies the update. Everything it decides from those numbers lives here, so it can be read and tested alone:

* the LR schedule prior: linear warmup over `warmup_steps`, cosine decay to 0 at `decay_steps` (both optional);
* the trust-region agreement ratio ρ = actual / predicted reduction of the previous update, from running averages
  (one step is noisy). With rho_from="gradients" the actual reduction along Δ_{t-1} comes from the two gradients at
  its ends (trapezoid rule, exact for a quadratic): actual = −½ (g_{t-1} + g_t)·Δ_{t-1}, predicted = −g_{t-1}·Δ_{t-1};
  with "losses" it is the difference of consecutive minibatch losses;
* the classic radius rule (×0.5 when ρ < ¼, ×2 when ρ > ¾ and the radius bound): on μ itself without an auxiliary
  net, on a running factor over the net's radius with one (aux_radius="scaled");
* the multiplier and the radius of this step (the net's prediction, or 1 and the rule's μ), with a backoff after
  non-finite steps;
* the projection onto the trust region from per-tensor norms: one scale per tensor;
* optionally one LR factor per parameter cluster (a param group), by hypergradient descent on that cluster's own
  cos(g_c, Δ_c), on top of the net's multiplier (per-layer hypergradient descent; issue 10);
* what the auxiliary net learns from: the normalised hypergradient cos(g_t, Δ_{t-1}) (only over the tensors the
  multiplier still controlled), ρ, and whether the constraint bound — about the state the previous step was
  decided in.

`settings` is the optimizer's first param group (a mapping), so the settings have one home — torch's param_groups —
and travel with its state_dict; this object holds only the running quantities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .schema import PER_TENSOR_TRUST_REGIONS
from .state import TrainingState, TrainingStateTracker

LR_RANGE = (0.1, 10.0)         # the guide's LR multiplier range (the auxiliary net's output is squashed into it)
RADIUS_RANGE = (0.001, 1.0)    # ... and the trust radius's


def trust_region_factor(rho: float | None, constraint_active: bool) -> float:
    """The classic radius update: ×0.5 when the loss model was poor, ×2 when it was good and the radius bound."""
    if rho is None or not math.isfinite(rho):
        return 1.0
    if rho < 0.25:
        return 0.5
    if rho > 0.75 and constraint_active:
        return 2.0
    return 1.0


RHO_BETA = 0.9          # running-average weight of the actual and predicted reductions behind ρ
BACKOFF_RECOVERY = 1.25  # per taken step, the radius backoff after a non-finite step recovers toward 1


@dataclass
class Feedback:
    """What the auxiliary net learns from at this step, about the state the previous step was decided in."""
    features: list[float]
    hypergradient: float | None
    rho: float | None
    constraint_active: bool
    meta_lr_scale: float | None      # anneal the net's own learning rate with the schedule (None: leave it)


@dataclass
class Observation:
    """This step's view: its training state, ρ and hypergradient of the previous update, the schedule factor."""
    state: TrainingState
    rho: float
    hypergradient: float
    schedule: float
    feedback: Feedback | None


@dataclass
class Projection:
    """The trust region's answer for one step: the scale of each tensor's base update and what it did."""
    scales: list[float]              # applied update of tensor i = scales[i] · u_i (multiplier included)
    free: list[bool]                 # tensor i's update still scales with the multiplier (not cut)
    active: bool
    proposed_norm: float             # ‖m·u‖ before the trust region
    applied_norm: float
    predicted: float                 # predicted reduction −g·Δ of the applied update
    free_norm: float                 # ‖Δ‖ over the free tensors (the next hypergradient's normaliser)


class HybridController:
    def __init__(self, trust_radius: float):
        self.steps = 0
        self.skipped_steps = 0
        self.constraint_active_steps = 0
        self.radius = float(trust_radius)   # μ when no aux net decides it
        self.radius_scale = 1.0             # the rule's running factor on the aux net's radius ("scaled")
        self.backoff = 1.0                  # radius factor after non-finite steps, recovers to 1
        self.prev_features: list[float] | None = None
        self.prev_loss: float | None = None
        self.prev_predicted: float | None = None
        self.prev_active = False
        self.prev_norm = 0.0
        self.actual_ema = 0.0
        self.predicted_ema = 0.0
        self.rho_count = 0
        self.tracker = TrainingStateTracker()

    # -- the schedule prior ---------------------------------------------------------------------------------------
    @staticmethod
    def schedule_factor(settings: Mapping[str, Any], step: int) -> float:
        """Linear warmup over `warmup_steps`, then cosine decay to 0 at `decay_steps` (when set); 1.0 without."""
        warmup, decay = int(settings["warmup_steps"]), settings["decay_steps"]
        factor = 1.0
        if warmup > 0 and step < warmup:
            factor = (step + 1) / warmup
        if decay is not None and step >= warmup:
            progress = min(1.0, (step - warmup) / max(1, int(decay) - warmup))
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return factor

    # -- one step: observe, decide, project, record -----------------------------------------------------------------
    def observe(self, settings: Mapping[str, Any], *, loss: float | None, grad_norm: float, dot_full: float,
                dot_free: float, cluster_id: int | None, has_aux: bool,
                prev_norm: float | None = None) -> Observation:
        """Digest the new gradient: ρ of the previous update (and the radius rule), the hypergradient, the state.

        dot_full : g_t·Δ_{t-1} over every tensor;  dot_free : over the part of Δ_{t-1} the multiplier controlled
        (or its trace);  prev_norm : ‖that part‖ when the caller measured it (else the norm recorded last step)."""
        rho = self._rho(settings, loss, dot_full, has_aux)
        norm = self.prev_norm if prev_norm is None else prev_norm
        hypergradient = dot_free / (grad_norm * norm) if norm > 0 and grad_norm > 0 else float("nan")
        state = self.tracker.update(loss, grad_norm, cluster_id, settings["n_clusters"])
        schedule = self.schedule_factor(settings, self.steps)
        feedback = None
        if has_aux and settings["meta_learning"] and self.prev_features is not None:
            anneal = settings["anneal_meta_learning"] and settings["decay_steps"] is not None
            feedback = Feedback(
                features=self.prev_features,
                hypergradient=hypergradient if math.isfinite(hypergradient) else None,
                rho=rho if settings["radius_adaptation"] and math.isfinite(rho) else None,
                constraint_active=self.prev_active, meta_lr_scale=schedule if anneal else None)
        return Observation(state, rho, hypergradient, schedule, feedback)

    def decide(self, settings: Mapping[str, Any], prediction: tuple[float, float] | None) -> tuple[float, float]:
        """This step's (multiplier, radius): the auxiliary net's prediction (None without a net) and the rule."""
        lo, hi = settings["radius_range"]
        if prediction is not None:
            multiplier, aux_radius = prediction
            if not settings["radius_adaptation"]:
                radius = self.radius
            elif settings["aux_radius"] == "scaled":
                radius = min(max(aux_radius * self.radius_scale, lo), hi)
            else:
                radius = aux_radius
        else:
            multiplier, radius = 1.0, self.radius
        return multiplier, max(radius * self.backoff, lo * 1e-3)

    @staticmethod
    def project(settings: Mapping[str, Any], multiplier: float | Sequence[float], radius: float,
                update_sq: Sequence[float], grad_dot_update: Sequence[float], param_sq: Sequence[float] | None = None,
                numels: Sequence[int] | None = None) -> Projection:
        """Scale each tensor's base update u_i (norm² update_sq[i], g_i·u_i grad_dot_update[i]) into the region.

        multiplier : one for all tensors, or one per tensor (per-cluster multipliers).
        "absolute": ‖ΔΘ‖ ≤ μ over all tensors together;  "relative": ‖ΔW_i‖ ≤ μ·max(‖W_i‖, 1e-3·√n_i) per tensor
        (param_sq, numels needed; a zero tensor such as a fresh bias may still move);  "bounded": relative, and
        also ‖ΔW_i‖ ≤ max_update_rms·√n_i (no entry moves by more than that RMS in one step, however large the LR
        and μ; the cap does not depend on the model's size, as the absolute region's whole-model μ does);
        "rms": ‖ΔΘ‖ ≤ μ·max_update_rms·√N over all tensors together, N = Σ n_i (numels needed) — the absolute
        region in update-RMS units, so one μ means the same per-entry step at any model size;
        None: no constraint."""
        mode = settings["trust_region"]
        n = len(update_sq)
        multipliers = [float(multiplier)] * n if isinstance(multiplier, (int, float)) else list(multiplier)
        scales, free, active = list(multipliers), [True] * n, False
        proposed = math.sqrt(sum(m * m * q for m, q in zip(multipliers, update_sq)))
        limit = radius     # the whole-model bound on ‖ΔΘ‖ (absolute and rms)
        if mode == "rms":
            limit = radius * float(settings["max_update_rms"]) * math.sqrt(sum(numels))
        if mode in ("absolute", "rms") and proposed > limit:
            scales, free, active = [m * limit / proposed for m in multipliers], [False] * n, True
        elif mode in PER_TENSOR_TRUST_REGIONS:
            cap = float(settings["max_update_rms"]) if mode == "bounded" else math.inf
            for i in range(n):
                norm = multipliers[i] * math.sqrt(update_sq[i])
                limit = min(radius * max(math.sqrt(param_sq[i]), 1e-3 * math.sqrt(numels[i])),
                            cap * math.sqrt(numels[i]))
                if norm > limit:
                    scales[i], free[i], active = multipliers[i] * limit / norm, False, True
        applied = limit if mode in ("absolute", "rms") and active else math.sqrt(
            sum(s * s * q for s, q in zip(scales, update_sq)))
        predicted = -sum(s * d for s, d in zip(scales, grad_dot_update))
        if not settings["projected_hypergradient"]:
            free = [True] * n
        free_norm = math.sqrt(sum(s * s * q for s, q, f in zip(scales, update_sq, free) if f))
        return Projection(scales, free, active, proposed, applied, predicted, free_norm)

    @staticmethod
    def cluster_scale(scale: float, hypergradient: float, meta_lr: float,
                      lr_range: tuple[float, float] = LR_RANGE) -> float:
        """One step of hypergradient descent on a parameter cluster's own LR factor, in log space: the cosine
        cos(g_c, Δ_c) of the cluster's gradient with its previous (free) update says whether its step was too long
        (> 0) or too short (< 0). Clamped to the multiplier's range; unchanged without a signal."""
        if not math.isfinite(hypergradient):
            return scale
        log_scale = math.log(scale) - meta_lr * max(-1.0, min(1.0, hypergradient))
        return math.exp(min(max(log_scale, math.log(lr_range[0])), math.log(lr_range[1])))

    def record(self, observation: Observation, projection: Projection, loss: float | None,
               free_norm: float | None = None) -> None:
        """The step was taken: remember what the next step's ρ and hypergradient refer to."""
        self.steps += 1
        self.constraint_active_steps += int(projection.active)
        self.prev_features = observation.state.feature_values()
        self.prev_loss, self.prev_predicted, self.prev_active = loss, projection.predicted, projection.active
        self.prev_norm = projection.free_norm if free_norm is None else free_norm
        self.backoff = min(1.0, self.backoff * BACKOFF_RECOVERY)

    def skip(self, settings: Mapping[str, Any]) -> float:
        """A non-finite loss or gradient: nothing moves, the radius backs off, no feedback about this step.
        Returns the radius reported for it."""
        self.skipped_steps += 1
        self.backoff *= 0.5
        self.prev_features = None
        self.prev_norm = 0.0
        return float(settings["trust_radius"]) * 0.5 if settings["trust_region"] else float("inf")

    def forget_previous_step(self) -> None:
        """A new auxiliary net starts from its own prediction, and the old net's last step teaches it nothing."""
        self.radius_scale = 1.0
        self.prev_features = None

    @property
    def constraint_activation_rate(self) -> float:
        return self.constraint_active_steps / self.steps if self.steps else 0.0

    # -- ρ and the radius rule --------------------------------------------------------------------------------------
    def _rho(self, settings: Mapping[str, Any], loss: float | None, grad_dot_prev: float, has_aux: bool) -> float:
        rho = float("nan")
        if self.prev_predicted is not None and self.prev_features is not None:
            if settings["rho_from"] == "gradients":     # trapezoid rule along Δ_{t-1}
                actual = 0.5 * (self.prev_predicted - grad_dot_prev)
            elif loss is not None and self.prev_loss is not None:
                actual = self.prev_loss - loss
            else:
                actual = None
            if actual is not None:
                self.actual_ema = RHO_BETA * self.actual_ema + (1 - RHO_BETA) * actual
                self.predicted_ema = RHO_BETA * self.predicted_ema + (1 - RHO_BETA) * self.prev_predicted
                self.rho_count += 1
                if self.predicted_ema > 0:
                    rho = self.actual_ema / self.predicted_ema
        if settings["radius_adaptation"] and settings["trust_region"]:
            factor = trust_region_factor(rho, self.prev_active)
            lo, hi = settings["radius_range"]
            if not has_aux:
                self.radius = min(max(self.radius * factor, lo), hi)
            elif settings["aux_radius"] == "scaled" and factor != 1.0:
                # keep aux radius × factor inside the range, whatever the net predicts next
                self.radius_scale = min(max(self.radius_scale * factor, lo / hi), hi / lo)
        return rho

    # -- checkpointing (plain numbers only: loads with torch.load(weights_only=True)) ------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k != "tracker"}
        state["prev_features"] = None if self.prev_features is None else list(self.prev_features)
        state["tracker"] = self.tracker.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        tracker = state.pop("tracker", None)
        features = state.get("prev_features")
        if features is not None and not isinstance(features, list):      # older checkpoints kept a tensor
            state["prev_features"] = [float(x) for x in features.tolist()]
        for key in list(self.__dict__):
            if key in state and key != "tracker":
                setattr(self, key, state[key])
        if tracker is not None:
            self.tracker.load_state_dict(tracker)
