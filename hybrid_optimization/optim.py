"""HybridOptimizer: AdamW (or SGD + momentum) × a learned LR multiplier, inside a trust region.

One step, for all parameters together:

1. Base direction, exactly as torch.optim.AdamW (decoupled weight decay) or torch.optim.SGD (momentum, L2 decay):
   Δ = -lr·m · (m̂ / (√v̂ + ε) + wd·θ)      with m = the LR multiplier.
2. Trust region on the *final* update (after moments and weight decay), over every parameter:
   "absolute":  ‖ΔΘ‖₂ ≤ μ   (the guide's constraint; Δ is scaled by μ/‖ΔΘ‖ when it is longer)
   "relative":  ‖ΔW‖₂ ≤ μ·‖W‖₂ for each tensor W (LAMB-like, so a large layer cannot take the whole budget).
3. θ ← θ + Δ.

The multiplier m and the radius μ come from the AuxiliaryNeuralNetwork, which learns online from two signals this
optimizer measures for it (see auxiliary_nn.py): the hypergradient cos(g_t, Δ_{t-1}) for the LR head and the
trust-region agreement ratio ρ = actual / predicted loss reduction for the radius head. Without an auxiliary net,
m = 1 and, when `radius_adaptation` is on, μ follows the classic ρ rule directly.

What the benchmarks (benchmarks/bench_hybrid.py, issue 6) changed, each switchable back for before/after runs:

* ρ from gradients (`rho_from="gradients"`). Minibatch losses of consecutive steps come from different batches
  (different clusters, with cluster-balanced sampling): their difference is mostly batch noise, so a ρ built on it
  swung between −30 and +20 and the radius rule shrank μ to its floor. Along the step Δ_{t-1} a quadratic model
  gives the actual change exactly from the two gradients at its ends (trapezoid rule):
      actual reduction = −½ (g_{t-1} + g_t)·Δ_{t-1},   predicted (linear model) = −g_{t-1}·Δ_{t-1},
  so ρ = ½ (1 + g_t·Δ_{t-1} / g_{t-1}·Δ_{t-1}) needs no loss at all: ≈ 1 while the loss is near-linear along the
  step, ½ at the minimum along it, < 0 when the step overshot by more than 2×. ("losses": the old estimate.)
* The hypergradient through the projection (`projected_hypergradient=True`): a tensor whose update the trust
  region cut to the radius does not change when m changes, so it carries no information about m; the LR head
  learns only from the tensors the constraint left free (no LR signal at all when every tensor was cut). Before,
  the bound update kept reporting "a larger m would help" and m climbed to 6× while changing nothing.
* Radius = the aux net's prediction × the classic rule's running factor (`aux_radius="scaled"`): the net's radius
  head learns slowly (one small Adam step per training step), so from the guide's μ = 0.01 a bound update stayed
  bound for the whole run. The rule's factor (×2 / ×0.5 per step, from ρ) starts at 1, so an untrained net still
  gives exactly its initial radius on the first step. ("direct": the net's prediction alone, as before.)
* An optional base LR schedule inside the optimizer (`warmup_steps`, `decay_steps`: linear warmup, cosine decay
  to 0), multiplied by the learned multiplier — the aux net corrects a sensible prior instead of having to learn
  warmup and annealing from a one-step signal. Off by default (0 / None).

Global scalars (lr_multiplier, trust_radius) live in every param_group; the auxiliary net, its meta-optimizer and
the running statistics are part of `state_dict()`, so a checkpoint resumes bit-identically.

A step whose loss or gradient is NaN/Inf is skipped: no weight or moment changes, the radius is halved, and the
skip is counted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw as adamw_functional
from torch.optim.optimizer import _get_fused_kernels_supported_devices
from torch.optim.sgd import sgd as sgd_functional

from .auxiliary_nn import RADIUS_RANGE, AuxiliaryNeuralNetwork, trust_region_factor
from .config import HybridTrainingConfig
from .state import TrainingStateTracker

BASES = ("adamw", "sgd")


def _fused_ok(params) -> bool:
    """torch's fused AdamW kernel (one pass over θ, g, m, v) when every tensor's device and dtype allow it."""
    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
               for p in params)
TRUST_REGIONS = ("absolute", "relative", None)
RHO_SOURCES = ("gradients", "losses")
AUX_RADIUS_MODES = ("scaled", "direct")


@dataclass
class StepInfo:
    """What one optimizer step did (also the guide's `update_info`)."""
    learning_rate: float          # effective LR = base lr × multiplier (first param group)
    lr_multiplier: float
    trust_radius: float           # μ used for this step (inf when the trust region is off)
    update_magnitude: float       # ‖ΔΘ‖₂ actually applied
    constraint_active: bool       # the trust region shortened the update
    efficiency: float             # ‖applied update‖ / ‖proposed update‖ (1.0 when the constraint is inactive)
    gradient_magnitude: float     # ‖g‖₂ over all parameters
    quantization_error: float | None = None   # ‖Θ - Q(Θ)‖ / ‖Θ‖ over weight matrices, when tracked
    skipped: bool = False         # non-finite loss or gradient: nothing was changed
    hypergradient: float = float("nan")       # cos(g_t, Δ_{t-1}) fed to the LR head
    rho: float = float("nan")                 # trust-region agreement ratio fed to the radius head
    step: int = 0
    lr_schedule: float = 1.0      # the built-in warmup/decay factor (1.0 without a schedule)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class HybridOptimizer(Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, base: str = "adamw", momentum: float = 0.9,
                 trust_region: str | None = "absolute", trust_radius: float = 0.01, radius_adaptation: bool = True,
                 radius_range: tuple[float, float] = RADIUS_RANGE, aux_net: AuxiliaryNeuralNetwork | None = None,
                 meta_learning: bool = True, meta_horizon: int = 1, n_clusters: int | None = None,
                 quantization_bits: float | None = None, quantization_every: int = 1,
                 quantization_scale: float = 1.0, rho_from: str = "gradients", projected_hypergradient: bool = True,
                 aux_radius: str = "scaled", warmup_steps: int = 0, decay_steps: int | None = None,
                 anneal_meta_learning: bool = True):
        if not (lr >= 0):
            raise ValueError(f"lr must be ≥ 0, got {lr!r}")
        if base not in BASES:
            raise ValueError(f"base must be one of {', '.join(BASES)}, got {base!r}")
        if trust_region not in TRUST_REGIONS:
            raise ValueError(f"trust_region must be 'absolute', 'relative' or None, got {trust_region!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        if not (radius_range[0] <= trust_radius <= radius_range[1]):
            raise ValueError(f"trust_radius must lie in {list(radius_range)}, got {trust_radius!r}")
        if int(meta_horizon) < 1:
            raise ValueError(f"meta_horizon must be ≥ 1, got {meta_horizon!r}")
        if rho_from not in RHO_SOURCES:
            raise ValueError(f"rho_from must be one of {', '.join(RHO_SOURCES)}, got {rho_from!r}")
        if aux_radius not in AUX_RADIUS_MODES:
            raise ValueError(f"aux_radius must be one of {', '.join(AUX_RADIUS_MODES)}, got {aux_radius!r}")
        if isinstance(warmup_steps, bool) or int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be an integer ≥ 0, got {warmup_steps!r}")
        if decay_steps is not None and (isinstance(decay_steps, bool) or int(decay_steps) < 1):
            raise ValueError(f"decay_steps must be None or an integer ≥ 1, got {decay_steps!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        lr_multiplier=1.0, trust_radius=float(trust_radius))
        super().__init__(params, defaults)
        self.base = base
        self.trust_region = trust_region
        self.radius_adaptation = radius_adaptation
        self.radius_range = tuple(radius_range)
        self.aux_net = aux_net
        self.meta_learning = meta_learning
        self.meta_horizon = int(meta_horizon)
        self.n_clusters = n_clusters
        self.quantization_bits = quantization_bits
        self.quantization_every = max(int(quantization_every), 1)
        self.quantization_scale = quantization_scale
        self.rho_from = rho_from
        self.projected_hypergradient = bool(projected_hypergradient)
        self.aux_radius = aux_radius
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = None if decay_steps is None else int(decay_steps)
        self.anneal_meta_learning = bool(anneal_meta_learning)
        self.tracker = TrainingStateTracker()
        # Running quantities carried from one step to the next (all plain numbers/tensors: checkpoint-safe).
        self.hybrid_state: dict[str, Any] = {
            "steps": 0, "skipped_steps": 0, "constraint_active_steps": 0,
            "radius": float(trust_radius),      # μ when no aux net decides it
            "radius_scale": 1.0,                # the rule's running factor on the aux net's radius ("scaled")
            "backoff": 1.0,                     # radius factor after non-finite steps, recovers to 1
            "prev_features": None, "prev_loss": None, "prev_predicted": None, "prev_active": False, "prev_norm": 0.0,
            "actual_ema": 0.0, "predicted_ema": 0.0, "rho_count": 0,
        }
        self.last_info: StepInfo | None = None

    @classmethod
    def from_config(cls, params: Iterable, config: HybridTrainingConfig,
                    aux_net: AuxiliaryNeuralNetwork | None = None, **overrides) -> "HybridOptimizer":
        """The optimizer a HybridTrainingConfig describes; `use_*` switches turn parts off."""
        if config.use_auxiliary_nn and aux_net is None:
            aux_net = AuxiliaryNeuralNetwork(hidden_size=config.auxiliary_nn_hidden_size,
                                             learning_rate=config.auxiliary_nn_learning_rate,
                                             initial_trust_radius=config.initial_trust_radius)
        kwargs = dict(
            lr=config.base_learning_rate, betas=(config.momentum, 0.999), weight_decay=config.weight_decay,
            base=config.base_optimizer, momentum=config.momentum,
            trust_region=config.trust_region_mode if config.use_trust_region else None,
            trust_radius=config.initial_trust_radius, radius_adaptation=config.trust_radius_adaptation,
            aux_net=aux_net if config.use_auxiliary_nn else None, meta_horizon=config.meta_horizon,
            n_clusters=config.data_clusters if config.use_clustering else None,
            quantization_bits=config.target_bits if config.use_quantization else None,
            quantization_every=config.log_interval, quantization_scale=config.quantizer_scale,
        )
        kwargs.update(overrides)
        return cls(params, **kwargs)

    # -- the step ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, loss: float | torch.Tensor | None = None,
             cluster_id: int | None = None, grads: list[torch.Tensor | None] | None = None) -> StepInfo:
        """One hybrid step.

        loss : this batch's loss (a number or a tensor). The auxiliary net's features (and, with rho_from="losses",
               the trust-region ratio) need it; with DDP pass the all-reduced loss so every rank decides the same.
        cluster_id : the data cluster the batch came from (an input feature of the auxiliary net).
        grads : gradients to use instead of `.grad`, one per parameter in param_groups order (None entries skip).
        """
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        loss_value = float(loss) if loss is not None else None
        hs = self.hybrid_state

        params, grad_list = self._params_with_grads(grads)
        if not params:
            return self._record(StepInfo(self._effective_lr(), self._multiplier(), self._radius_for_info(),
                                         0.0, False, 1.0, 0.0, step=hs["steps"]))
        # One read of the gradients before anything changes: their norm is a feature, and a NaN/Inf anywhere
        # must stop the step before the first parameter moves.
        grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grad_list))))
        if not math.isfinite(grad_norm) or (loss_value is not None and not math.isfinite(loss_value)):
            return self._skip(grad_norm)

        # 1. What the new gradient says about the previous update (before its buffer is reused): g_t·Δ_{t-1} for
        #    ρ, and g_t·(the part of the recent updates the multiplier controlled) for the hypergradient.
        dots = self._dots_with_previous_update(params, grad_list)
        # 2. This step's multiplier and radius (the radius rule first digests the outcome of the previous step).
        rho = self._trust_region_ratio(loss_value, dots["full"])
        state_now = self.tracker.update(loss_value, grad_norm, cluster_id, self.n_clusters)
        features = state_now.features()
        multiplier, radius = self._decide(features, rho)
        schedule = self.lr_schedule_factor(hs["steps"])
        for group in self.param_groups:
            group["lr_multiplier"], group["trust_radius"] = multiplier, radius

        # 3. One pass, tensor by tensor: base update Δ (into state["update"]), relative trust region, apply.
        sums = self._update_pass(params, grad_list, multiplier * schedule, radius)

        # 4. The absolute trust region needs the norm of the whole update: when it binds, pull every tensor back.
        proposed_norm, applied_norm, active = sums["proposed_norm"], sums["applied_norm"], sums["active"]
        predicted = -sums["grad_dot_update"]
        free = sums["free"]                  # per tensor: did the multiplier still control its update?
        if self.trust_region == "absolute" and applied_norm > radius:
            shrink = radius / applied_norm
            for p in params:
                u = self.state[p]["update"]
                p.add_(u, alpha=shrink - 1.0)
                u.mul_(shrink)
            applied_norm, predicted, active = radius, predicted * shrink, True
            free = [False] * len(params)
        if not self.projected_hypergradient:
            free = [True] * len(params)
        # The updates the next hypergradient looks at: this one (meta_horizon 1) or a decaying trace of the last
        # ~H updates; only the free tensors' parts, since only those scale with the multiplier.
        traces = []
        for p, is_free in zip(params, free):
            state = self.state[p]
            if self.meta_horizon > 1:
                trace = state.setdefault("update_trace", torch.zeros_like(p)).mul_(1.0 - 1.0 / self.meta_horizon)
                if is_free:
                    trace.add_(state["update"])
                traces.append(trace)
            else:
                state["free"] = bool(is_free)
                if is_free:
                    traces.append(state["update"])
        prev_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(traces)))) if traces else 0.0

        # 5. Feedback to the auxiliary net on the previous update (cos(g_t, Δ_{t-1}), ρ); it shapes the next step.
        hypergrad = float("nan")
        if hs["prev_norm"] > 0 and grad_norm > 0:
            hypergrad = dots["free"] / (grad_norm * hs["prev_norm"])
        if self.aux_net is not None and self.meta_learning and hs["prev_features"] is not None:
            if self.anneal_meta_learning and self.decay_steps is not None:
                # While the schedule anneals the LR on purpose, the greedy one-step signal would keep asking for
                # more (it cannot see the long-horizon gain of annealing): its learning rate anneals alike.
                for group in self.aux_net.meta_optimizer.param_groups:
                    group["lr"] = self.aux_net.learning_rate * schedule
            self.aux_net.update_with_feedback(hs["prev_features"],
                                              hypergradient=hypergrad if math.isfinite(hypergrad) else None,
                                              rho=rho if self.radius_adaptation and math.isfinite(rho) else None,
                                              constraint_active=hs["prev_active"])
        hs.update(steps=hs["steps"] + 1, prev_features=features, prev_loss=loss_value, prev_predicted=predicted,
                  prev_active=active, prev_norm=prev_norm, backoff=min(1.0, hs["backoff"] * 1.25))
        hs["constraint_active_steps"] += int(active)

        info = StepInfo(
            learning_rate=self._effective_lr(schedule), lr_multiplier=multiplier,
            trust_radius=radius if self.trust_region else float("inf"), update_magnitude=applied_norm,
            constraint_active=active, efficiency=applied_norm / proposed_norm if active and proposed_norm > 0 else 1.0,
            gradient_magnitude=grad_norm, quantization_error=self._quantization_error(params),
            hypergradient=hypergrad, rho=rho, step=hs["steps"], lr_schedule=schedule)
        return self._record(info)

    def lr_schedule_factor(self, step: int) -> float:
        """The built-in base schedule at `step` (steps taken so far): linear warmup over `warmup_steps`, then
        cosine decay to 0 at `decay_steps` (when set); 1.0 without a schedule."""
        factor = 1.0
        if self.warmup_steps > 0 and step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        if self.decay_steps is not None and step >= self.warmup_steps:
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps))
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return factor

    # -- pieces of the step -------------------------------------------------------------------------------------------
    def _params_with_grads(self, grads):
        params, grad_list = [], []
        all_params = [p for group in self.param_groups for p in group["params"]]
        if grads is not None:
            grads = list(grads)
            if len(grads) != len(all_params):
                raise ValueError(f"got {len(grads)} gradients for {len(all_params)} parameters; pass one gradient "
                                 "(or None) per parameter, in the order of the optimizer's parameters")
        for i, p in enumerate(all_params):
            g = grads[i] if grads is not None else p.grad
            if g is None:
                continue
            if g.shape != p.shape:
                raise ValueError(f"gradient {i} has shape {tuple(g.shape)} but its parameter has {tuple(p.shape)}")
            if g.is_sparse:
                raise RuntimeError("HybridOptimizer does not support sparse gradients")
            params.append(p)
            grad_list.append(g.detach())
        return params, grad_list

    def _dots_with_previous_update(self, params, grad_list) -> dict[str, float]:
        """g_t·Δ_{t-1} over all tensors ("full", for ρ) and over the multiplier-controlled part ("free", for the
        hypergradient: the free tensors' Δ_{t-1}, or the trace of free updates when meta_horizon > 1)."""
        full, free = [], []
        for p, g in zip(params, grad_list):
            state = self.state[p]
            if "update" not in state:
                continue
            dot = torch.vdot(g.reshape(-1), state["update"].reshape(-1))
            full.append(dot)
            if self.meta_horizon > 1:
                if "update_trace" in state:
                    free.append(torch.vdot(g.reshape(-1), state["update_trace"].reshape(-1)))
            elif state.get("free", True):
                free.append(dot)
        total = lambda xs: float(torch.stack(xs).sum()) if xs else 0.0   # noqa: E731 (one sync per sum)
        return {"full": total(full), "free": total(free)}

    def _trust_region_ratio(self, loss_value: float | None, grad_dot_prev: float) -> float:
        """ρ = actual / predicted reduction of the previous update, from running averages (one step is noisy);
        without an auxiliary net the classic rule adapts μ right here, with one its running factor on the net's
        radius ("scaled")."""
        hs = self.hybrid_state
        rho = float("nan")
        if hs["prev_predicted"] is not None and hs["prev_features"] is not None:
            if self.rho_from == "gradients":           # trapezoid rule along Δ_{t-1}: exact for a quadratic
                actual = 0.5 * (hs["prev_predicted"] - grad_dot_prev)
            elif loss_value is not None and hs["prev_loss"] is not None:
                actual = hs["prev_loss"] - loss_value
            else:
                actual = None
            if actual is not None:
                beta = 0.9
                hs["actual_ema"] = beta * hs["actual_ema"] + (1 - beta) * actual
                hs["predicted_ema"] = beta * hs["predicted_ema"] + (1 - beta) * hs["prev_predicted"]
                hs["rho_count"] += 1
                if hs["predicted_ema"] > 0:
                    rho = hs["actual_ema"] / hs["predicted_ema"]
        if self.radius_adaptation and self.trust_region:
            factor = trust_region_factor(rho, hs["prev_active"])
            lo, hi = self.radius_range
            if self.aux_net is None:
                hs["radius"] = min(max(hs["radius"] * factor, lo), hi)
            elif self.aux_radius == "scaled" and factor != 1.0:
                # keep aux radius × factor inside the range, whatever the net predicts next
                hs["radius_scale"] = min(max(hs["radius_scale"] * factor, lo / hi), hi / lo)
        return rho

    def _decide(self, features: torch.Tensor, rho: float) -> tuple[float, float]:
        hs = self.hybrid_state
        if self.aux_net is not None:
            multiplier, aux_radius = self.aux_net.predict(features)
            if not self.radius_adaptation:
                radius = hs["radius"]
            elif self.aux_radius == "scaled":
                lo, hi = self.radius_range
                radius = min(max(aux_radius * hs["radius_scale"], lo), hi)
            else:
                radius = aux_radius
        else:
            multiplier, radius = 1.0, hs["radius"]
        radius = max(radius * hs["backoff"], self.radius_range[0] * 1e-3)
        return multiplier, radius

    def _update_pass(self, params, grad_list, multiplier, radius) -> dict[str, Any]:
        """Base step through torch's own AdamW/SGD kernels (fused where the device has them), with Δ recovered as
        θ_new − θ_old, then the relative trust region. Returns the sums the rest of the step needs, and which
        tensors the trust region left free (in `params` order)."""
        grad_of = {p: g for p, g in zip(params, grad_list)}
        ordered, updates = [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p in grad_of]
            if not ps:
                continue
            gs = [grad_of[p] for p in ps]
            us = [self._init_state(group, p)["update"] for p in ps]
            torch._foreach_copy_(us, ps)                       # θ_old
            lr = group["lr"] * multiplier
            if self.base == "adamw":
                steps = [self.state[p]["step"] for p in ps]
                adamw_functional(ps, gs, [self.state[p]["exp_avg"] for p in ps],
                                 [self.state[p]["exp_avg_sq"] for p in ps], [], steps, fused=_fused_ok(ps),
                                 amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=lr,
                                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            else:
                buffers = [self.state[p].get("momentum_buffer") for p in ps]
                sgd_functional(ps, gs, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
                               lr=lr, dampening=0.0, nesterov=False, maximize=False)
                for p, buf in zip(ps, buffers):
                    if buf is not None:
                        self.state[p]["momentum_buffer"] = buf
            for p, u in zip(ps, us):
                torch.sub(p, u, out=u)                        # Δ = θ_new − θ_old
            ordered += ps
            updates += us
        norms = torch.stack(torch._foreach_norm(updates))
        proposed_sq = float((norms ** 2).sum())
        active = False
        capped = set()
        if self.trust_region == "relative":
            # ‖ΔW‖ ≤ μ·‖W_old‖ (a zero tensor, e.g. a fresh bias, may move μ·1e-3·√n)
            old_norms = torch.stack(torch._foreach_norm([p - u for p, u in zip(ordered, updates)]))
            numels = torch.tensor([float(p.numel()) for p in ordered], dtype=old_norms.dtype)
            limits = radius * torch.maximum(old_norms, 1e-3 * numels.sqrt())
            ratios = (limits / norms.clamp_min(1e-30)).clamp(max=1.0)
            for i in torch.nonzero(ratios < 1.0).flatten().tolist():
                s = float(ratios[i])
                ordered[i].add_(updates[i], alpha=s - 1.0)
                updates[i].mul_(s)
                capped.add(ordered[i])
                active = True
            norms = norms * ratios
        grad_dot_update = sum(torch.vdot(grad_of[p].reshape(-1), u.reshape(-1)) for p, u in zip(ordered, updates))
        return {"grad_dot_update": float(grad_dot_update), "proposed_norm": math.sqrt(proposed_sq),
                "applied_norm": float(torch.linalg.vector_norm(norms)), "active": active,
                "free": [p not in capped for p in params]}

    def _init_state(self, group, p) -> dict:
        state = self.state[p]
        if "update" not in state:
            state["update"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.base == "adamw":
                # float32 step counters on the parameter's device, as torch's fused AdamW keeps them
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _quantization_error(self, params) -> float | None:
        if self.quantization_bits is None or self.hybrid_state["steps"] % self.quantization_every:
            return None
        from .quantization import fake_quantize   # only needed when quantization is tracked
        err_sq = total_sq = 0.0
        for p in params:
            if p.dim() < 2:
                continue
            q = fake_quantize(p.detach(), self.quantization_bits, scale_factor=self.quantization_scale)
            err_sq += float(torch.sum((p - q) ** 2))
            total_sq += float(torch.sum(p ** 2))
        return math.sqrt(err_sq / total_sq) if total_sq > 0 else None

    def _skip(self, grad_norm: float) -> StepInfo:
        hs = self.hybrid_state
        hs["skipped_steps"] += 1
        hs["backoff"] *= 0.5
        hs["prev_features"] = None       # no feedback from a step that was not taken
        radius = self._radius_for_info() * 0.5 if self.trust_region else float("inf")
        for group in self.param_groups:
            group["trust_radius"] = radius
        info = StepInfo(self._effective_lr(), self._multiplier(), radius, 0.0, False, 0.0, grad_norm,
                        skipped=True, step=hs["steps"])
        return self._record(info)

    def _record(self, info: StepInfo) -> StepInfo:
        self.last_info = info
        return info

    def _multiplier(self) -> float:
        return float(self.param_groups[0]["lr_multiplier"])

    def _effective_lr(self, schedule: float | None = None) -> float:
        if schedule is None:
            schedule = self.lr_schedule_factor(self.hybrid_state["steps"])
        return float(self.param_groups[0]["lr"]) * schedule * self._multiplier()

    def _radius_for_info(self) -> float:
        return float(self.param_groups[0]["trust_radius"])

    # -- introspection and checkpointing ------------------------------------------------------------------------------
    @property
    def constraint_activation_rate(self) -> float:
        hs = self.hybrid_state
        taken = hs["steps"]
        return hs["constraint_active_steps"] / taken if taken else 0.0

    def set_aux_net(self, aux_net: AuxiliaryNeuralNetwork | None) -> None:
        """Use another auxiliary net from the next step on: it starts from its own prediction (the rule's running
        factor is reset, and the previous step, decided by the old net, gives it no feedback)."""
        self.aux_net = aux_net
        self.hybrid_state["radius_scale"] = 1.0
        self.hybrid_state["prev_features"] = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        hs = dict(self.hybrid_state)
        state["hybrid"] = {
            "state": hs,
            "tracker": self.tracker.state_dict(),
            "aux_net": self.aux_net.full_state_dict() if self.aux_net is not None else None,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        hybrid = state_dict.pop("hybrid", None)
        super().load_state_dict(state_dict)
        if hybrid is None:
            return
        self.hybrid_state.update(hybrid["state"])
        self.tracker.load_state_dict(hybrid["tracker"])
        if hybrid["aux_net"] is not None:
            if self.aux_net is None:
                raise ValueError("this checkpoint holds an auxiliary network but the optimizer has none: build the "
                                 "optimizer with aux_net=AuxiliaryNeuralNetwork(...) (or use_auxiliary_nn=True)")
            self.aux_net.load_full_state_dict(hybrid["aux_net"])


def _as_param_list(parameters) -> list[torch.Tensor]:
    """Accept what the guide passes: `model.parameters` (the bound method), a tensor, or an iterable of tensors."""
    if callable(parameters) and not isinstance(parameters, torch.Tensor):
        parameters = parameters()
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    try:
        params = list(parameters)
    except TypeError:
        raise TypeError("parameters must be a tensor, an iterable of tensors or a callable returning one "
                        f"(e.g. model.parameters), got {type(parameters).__name__}") from None
    if not all(isinstance(p, torch.Tensor) for p in params):
        raise TypeError("parameters must contain only tensors")
    return params


def split_gradients(gradients, params: list[torch.Tensor]) -> list[torch.Tensor | None] | None:
    """One gradient per parameter from: None (use .grad), a list/tuple aligned with params, one tensor for one
    parameter, or a flat vector of all gradients concatenated in parameter order."""
    if gradients is None:
        return None
    if isinstance(gradients, torch.Tensor):
        if len(params) == 1 and gradients.shape == params[0].shape:
            return [gradients]
        total = sum(p.numel() for p in params)
        if gradients.dim() == 1 and gradients.numel() == total:
            return [g.view_as(p) for g, p in zip(torch.split(gradients, [p.numel() for p in params]), params)]
        raise ValueError(f"a gradient tensor of shape {tuple(gradients.shape)} matches neither the single "
                         f"parameter nor the flat vector of all {total} parameter values")
    grads = list(gradients)
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    return grads


class ConstrainedOptimizer:
    """The guide's trust-region optimizer: `step(parameters, gradients, learning_rate, constraint_radius)`.

    A thin functional front over HybridOptimizer (same update code): the first call creates the per-parameter
    state (moments) for the parameters it is given; later calls must pass the same parameters. The whole update
    over ALL parameters is projected onto ‖ΔΘ‖₂ ≤ constraint_radius (or, with trust_region="relative", each tensor
    onto ‖ΔW‖ ≤ radius·‖W‖). Returns a StepInfo (update_magnitude, constraint_active, efficiency, ...).
    """

    def __init__(self, use_quantization: bool = True, target_bits: float = 1.58, momentum: float = 0.9,
                 base: str = "adamw", weight_decay: float = 0.0, trust_region: str = "absolute"):
        if base not in BASES:
            raise ValueError(f"base must be one of {', '.join(BASES)}, got {base!r}")
        if trust_region not in ("absolute", "relative"):
            raise ValueError(f"trust_region must be 'absolute' or 'relative', got {trust_region!r}")
        if use_quantization:
            from .quantization import normalize_bits
            target_bits = normalize_bits(target_bits)
        self.use_quantization, self.target_bits = use_quantization, target_bits
        self.momentum, self.base, self.weight_decay, self.trust_region = momentum, base, weight_decay, trust_region
        self.optimizer: HybridOptimizer | None = None
        self._param_ids: tuple[int, ...] = ()

    def step(self, parameters, gradients=None, learning_rate: float = 1e-3,
             constraint_radius: float | None = 0.01, loss: float | None = None) -> StepInfo:
        params = _as_param_list(parameters)
        grads = split_gradients(gradients, params)
        ids = tuple(id(p) for p in params)
        if self.optimizer is None:
            self.optimizer = HybridOptimizer(
                params, lr=learning_rate, betas=(self.momentum, 0.999), weight_decay=self.weight_decay,
                base=self.base, momentum=self.momentum, trust_region=self.trust_region,
                trust_radius=min(max(constraint_radius or 0.01, RADIUS_RANGE[0]), RADIUS_RANGE[1]),
                radius_adaptation=False,
                quantization_bits=self.target_bits if self.use_quantization else None)
            self._param_ids = ids
        elif ids != self._param_ids:
            raise ValueError("ConstrainedOptimizer.step got different parameters than on its first call; create "
                             "one ConstrainedOptimizer per set of parameters")
        opt = self.optimizer
        opt.trust_region = self.trust_region if constraint_radius is not None else None
        if constraint_radius is not None:
            if not constraint_radius > 0:
                raise ValueError(f"constraint_radius must be > 0 (or None for no constraint), got {constraint_radius!r}")
            opt.hybrid_state["radius"] = float(constraint_radius)
        for group in opt.param_groups:
            group["lr"] = learning_rate
        return opt.step(loss=loss, grads=grads)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict() if self.optimizer is not None else {}
