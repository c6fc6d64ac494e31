"""HybridOptimizer: AdamW (or SGD + momentum, or Muon) × a learned LR multiplier, inside a trust region.

One step, for all parameters together:

1. Base update, exactly torch.optim.AdamW's (decoupled weight decay) or torch.optim.SGD's (momentum, L2 decay), per
   tensor: u = −lr·s · (m̂ / (√v̂ + ε) + wd·θ), with s the built-in schedule factor (1 without one). `base` is a
   per-group setting: a group with base="muon" (2-D weight matrices only) takes Muon's direction instead — Nesterov
   momentum, orthogonalized by 5 Newton–Schulz steps, scaled to AdamW's update RMS (0.2·√max(A, B), Moonlight's
   rule) so one base LR serves both kinds of group: u = −lr·s · (0.2·√max(A, B)·NS(M) + wd·θ).
2. The multiplier m and the trust region scale it:  Δ = c·u with c = m, or less where the region binds —
   "absolute":  ‖ΔΘ‖₂ ≤ μ over every parameter (the guide's constraint);
   "relative":  ‖ΔW‖₂ ≤ μ·‖W‖₂ for each tensor W (LAMB-like, so a large layer cannot take the whole budget);
   "bounded":   relative, and ‖ΔW‖₂ ≤ max_update_rms·√n for each tensor W of n entries: whatever the LR and μ, no
                tensor's update RMS exceeds the cap (1e-3 by default, the guide's LR: an LR set far too high is
                held there), and the cap does not shrink as the model grows, as the absolute region's does.
   "rms":       ‖ΔΘ‖₂ ≤ μ·max_update_rms·√N over all N entries updated: the absolute region in update-RMS units
                (μ = 1 caps the whole update's RMS at max_update_rms), so one μ is the same per-entry step at any
                model size — the absolute radius, in whole-model units, binds on every step of a large student.
3. θ ← θ + Δ.

m and μ come from the AuxiliaryNeuralNetwork, which learns online from the hypergradient cos(g_t, Δ_{t-1}) and the
trust-region agreement ratio ρ; without a net m = 1 and μ follows the classic ρ rule. Δ_{t-1} is the whole update
applied (projected_hypergradient=False, the default since issue 16): a whole-model region that binds makes the step's
length independent of m, so a hypergradient over only the tensors the region left free (True, the default before)
is empty there and m stayed at ×1.00 at an LR set 10× too high (benchmarks/results/robustness/report.md, H-rms-free). With
`cluster_multipliers=True` each param group — a parameter cluster — also gets its own LR factor
(`group["cluster_lr_scale"]`) by hypergradient descent on its own cos(g_c, Δ_c) (off by default). Those decisions
are plain arithmetic on a few numbers and live in controller.py (HybridController, tested without tensors); this
file holds the tensor side. An untrained net and trust_region=None give torch's AdamW trajectory.

torch's optimizer contract holds: every setting is in `defaults` and each param group (so `state_dict()` carries
them and LR schedulers, `add_param_group` and per-group LRs work); `step(closure)` returns the loss and leaves its
StepInfo in `optimizer.last_info`; step pre/post hooks, `zero_grad`, deepcopy and pickle behave as for any torch
optimizer; the aux net, its meta-optimizer and the controller's running numbers are part of `state_dict()`, so a
checkpoint resumes bit-identically (and loads with torch.load(weights_only=True)).

How the tensor work is done (one host sync per step):
* u is computed into an update buffer the optimizer owns — torch's functional AdamW/SGD run on that buffer (zeroed
  first) instead of on θ — and θ then moves by one ordinary in-place add. So the fused CPU/CUDA kernel only ever sees
  the optimizer's own contiguous buffers and the gradient: a non-contiguous parameter (a view) is updated correctly,
  and every parameter's version counter moves (the fused kernels do not bump the counters of what they write).
* `fused=None` (default) uses the fused AdamW kernel where every tensor it touches qualifies (supported device and
  floating dtype, contiguous buffers and gradient) and torch's foreach path elsewhere; `fused=False` uses foreach
  (`foreach=False`: the for-loop path). torch itself defaults to foreach because its fused kernel would write the
  parameters; here it never does.
* The per-step numbers (‖g‖, g·Δ_{t-1}, ‖u‖, g·u, ‖θ‖ for the relative region) are gathered into one tensor and read
  once. A non-finite gradient is caught without an earlier read: the fused kernel skips via `found_inf`; groups
  on the foreach/for-loop path read ‖g‖ first (a second sync).

A step whose loss or gradient is NaN/Inf is skipped: no weight or moment changes, the radius is halved, and the
skip is counted.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw as adamw_functional
from torch.optim.sgd import sgd as sgd_functional

from .auxiliary_nn import RADIUS_RANGE, AuxiliaryNeuralNetwork
from .config import HybridTrainingConfig
from .controller import HybridController
from .schema import HYBRID_BASES, MAX_UPDATE_RMS, PER_TENSOR_TRUST_REGIONS, TRUST_REGION_MODES

BASES = HYBRID_BASES                   # the bases whose direction the hybrid steers (schema: the one list)
# Muon's quintic Newton–Schulz coefficients and step count (Jordan et al. 2024; torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
TRUST_REGIONS = (*TRUST_REGION_MODES, None)
RHO_SOURCES = ("gradients", "losses")
AUX_RADIUS_MODES = ("scaled", "direct")
FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Settings of the whole optimizer (every group holds the same value; step reads the first group's). The rest —
# lr, betas, eps, weight_decay, momentum, base, foreach, fused — may differ per group.
GLOBAL_SETTINGS = ("trust_region", "radius_adaptation", "radius_range", "meta_learning", "meta_horizon",
                   "n_clusters", "quantization_bits", "quantization_every", "quantization_scale", "rho_from",
                   "projected_hypergradient", "aux_radius", "warmup_steps", "decay_steps", "anneal_meta_learning",
                   "cluster_multipliers", "cluster_meta_lr", "max_update_rms")


@dataclass
class StepInfo:
    """What one optimizer step did (also the guide's `update_info`)."""
    learning_rate: float          # effective LR = base lr × schedule × multiplier (first param group)
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
                 quantization_scale: float = 1.0, rho_from: str = "gradients", projected_hypergradient: bool = False,
                 aux_radius: str = "scaled", warmup_steps: int = 0, decay_steps: int | None = None,
                 anneal_meta_learning: bool = True, cluster_multipliers: bool = False, cluster_meta_lr: float = 0.02,
                 max_update_rms: float = MAX_UPDATE_RMS, foreach: bool | None = None, fused: bool | None = None):
        if aux_net is not None and not isinstance(aux_net, AuxiliaryNeuralNetwork):
            raise TypeError(f"aux_net must be an AuxiliaryNeuralNetwork or None, got {type(aux_net).__name__}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum, foreach=foreach,
                        fused=fused, base=base, trust_region=trust_region, radius_adaptation=radius_adaptation,
                        radius_range=radius_range, meta_learning=meta_learning, meta_horizon=meta_horizon,
                        n_clusters=n_clusters, quantization_bits=quantization_bits,
                        quantization_every=quantization_every, quantization_scale=quantization_scale,
                        rho_from=rho_from, projected_hypergradient=projected_hypergradient, aux_radius=aux_radius,
                        warmup_steps=warmup_steps, decay_steps=decay_steps,
                        anneal_meta_learning=anneal_meta_learning, cluster_multipliers=cluster_multipliers,
                        cluster_meta_lr=cluster_meta_lr, max_update_rms=max_update_rms, trust_radius=trust_radius, lr_multiplier=1.0,
                        cluster_lr_scale=1.0)
        defaults = _checked_settings(defaults)
        super().__init__(params, defaults)
        self.aux_net = aux_net
        self.controller = HybridController(defaults["trust_radius"])
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
            projected_hypergradient=config.projected_hypergradient,
            n_clusters=config.data_clusters if config.use_clustering else None,
            quantization_bits=config.target_bits if config.use_quantization else None,
            quantization_every=max(int(config.log_interval), 1), quantization_scale=config.quantizer_scale,
        )
        kwargs.update(overrides)
        return cls(params, **kwargs)

    # -- torch's contract: groups, pickling ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, with the group's settings checked: a bad value or a global setting that differs from the
        other groups' is a ValueError."""
        merged = _checked_settings({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        if self.param_groups:
            first = self.param_groups[0]
            for key in GLOBAL_SETTINGS:
                if merged[key] != first[key]:
                    raise ValueError(f"{key} is a setting of the whole optimizer: every param group must use "
                                     f"{first[key]!r}, got {merged[key]!r}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if merged["base"] == "muon":
            for p in params:
                if p.dim() != 2:
                    raise ValueError(f"base 'muon' orthogonalizes 2-D weight matrices, got a parameter of shape "
                                     f"{tuple(p.shape)}; put it in a group with base 'adamw' or 'sgd'")
        if merged["fused"]:
            for p in params:
                if p.device.type not in FUSED_DEVICES or p.dtype not in FUSED_DTYPES:
                    raise ValueError(f"fused=True needs floating-point parameters on {' or '.join(FUSED_DEVICES)}, "
                                     f"got {p.dtype} on {p.device.type}; use fused=None (fused where possible)")
        super().add_param_group({**param_group, **merged, "params": params})

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps only defaults, state and param_groups: without these a copy could not step.
        return {**super().__getstate__(), "aux_net": self.aux_net, "controller": self.controller,
                "last_info": self.last_info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("aux_net", None)
        self.__dict__.setdefault("controller", HybridController(self.defaults["trust_radius"]))
        self.__dict__.setdefault("last_info", None)

    # -- the step -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, loss: float | torch.Tensor | None = None,
             cluster_id: int | None = None, grads: list[torch.Tensor | None] | None = None):
        """One hybrid step; returns the loss (the closure's, else `loss`). What it did: `self.last_info`.

        loss : this batch's loss (a number or a tensor). The auxiliary net's features (and, with rho_from="losses",
               the trust-region ratio) need it; with DDP pass the all-reduced loss so every rank decides the same.
        cluster_id : the data cluster the batch came from (an input feature of the auxiliary net).
        grads : gradients to use instead of `.grad`, one per parameter in param_groups order (None entries skip).
        """
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_info = self._hybrid_step(loss, cluster_id, grads)
        return loss

    def _hybrid_step(self, loss, cluster_id, grads) -> StepInfo:
        settings, ctl = self.param_groups[0], self.controller
        entries = self._entries(grads)                  # (group, param, grad) for every parameter with a gradient
        schedule = ctl.schedule_factor(settings, ctl.steps)
        if not entries:
            return StepInfo(self._effective_lr(schedule), float(settings["lr_multiplier"]),
                            self._radius_for_info(), 0.0, False, 1.0, 0.0, step=ctl.steps, lr_schedule=schedule)
        params = [p for _, p, _ in entries]
        grad_list = [g for _, _, g in entries]
        states = [self._init_state(p, group["base"]) for group, p, _ in entries]
        horizon = int(settings["meta_horizon"])

        # 1. The new gradient against the previous update, before the update buffers are reused.
        measured = _Measurements()
        measured.add("grad_norm", torch._foreach_norm(grad_list))
        if isinstance(loss, torch.Tensor):
            measured.add("loss", [loss.detach().reshape(())])
        prev = [i for i, s in enumerate(states) if s.get("taken")]      # tensors with a previous update
        measured.add("dot_prev", [_dot(grad_list[i], states[i]["update"]) for i in prev])
        if horizon > 1:
            traced = [i for i in prev if "update_trace" in states[i]]
            measured.add("dot_trace", [_dot(grad_list[i], states[i]["update_trace"]) for i in traced])
            measured.add("trace_norm", torch._foreach_norm([states[i]["update_trace"] for i in traced])
                         if traced else [])
        groups = self._by_group(entries)
        early = not all(self._fused_indices(group, idx, states, grad_list) == idx for group, idx in groups)
        if early or not math.isfinite(_host_loss(loss)):
            # a group on the foreach/for-loop path would put a NaN gradient into its moments: look first
            values = measured.read()
            if not _finite(values, loss):
                return self._skip(values, schedule)
            found_inf = None
        else:
            finite = torch.isfinite(torch.stack(measured.tensors("grad_norm")).sum())
            if isinstance(loss, torch.Tensor):
                finite = finite & torch.isfinite(loss.detach().reshape(()))
            found_inf = (~finite).to(torch.float32)

        # 2. Base update u of every tensor into its update buffer (θ is not touched yet).
        for group, idx in groups:
            self._base_update(group, idx, params, grad_list, states, schedule, found_inf)
        updates = [s["update"] for s in states]
        measured.add("update_norm", torch._foreach_norm(updates))
        measured.add("grad_dot_update", [_dot(g, u) for g, u in zip(grad_list, updates)])
        relative = settings["trust_region"] in PER_TENSOR_TRUST_REGIONS      # per-tensor regions need ‖W‖
        if relative:
            # ‖W‖ of a view (a non-contiguous parameter) is summed in another order than its contiguous copy's,
            # which can differ in the last bit on some CPUs: read it through a contiguous copy, as the buffers are
            measured.add("param_norm", torch._foreach_norm([p if p.is_contiguous() else p.contiguous()
                                                            for p in params]))
        values = measured.read()                                    # the one host sync of the step
        if not _finite(values, loss):
            return self._skip(values, schedule)

        # 3. Decide (controller + auxiliary net), project onto the trust region, apply.
        loss_value = _loss_value(values, loss)
        grad_norm = _total(values["grad_norm"])
        scales = [states[i].get("scale", 1.0) for i in prev]
        dot_full = sum(c * d for c, d in zip(scales, values["dot_prev"]))
        if horizon > 1:
            dot_free, prev_norm = sum(values["dot_trace"]), _total(values["trace_norm"])
        else:
            dot_free = sum(c * d for c, d, i in zip(scales, values["dot_prev"], prev) if states[i].get("free", True))
            prev_norm = None
        observation = ctl.observe(settings, loss=loss_value, grad_norm=grad_norm, dot_full=dot_full,
                                  dot_free=dot_free, cluster_id=cluster_id, has_aux=self.aux_net is not None,
                                  prev_norm=prev_norm)
        prediction = self.aux_net.predict(observation.state) if self.aux_net is not None else None
        multiplier, radius = ctl.decide(settings, prediction)
        multipliers = multiplier
        if settings["cluster_multipliers"]:     # each param group (parameter cluster) its own LR factor on top
            self._update_cluster_scales(groups, values, prev, states)
            multipliers = [multiplier * group["cluster_lr_scale"] for group, _, _ in entries]
        projection = ctl.project(settings, multipliers, radius, [x * x for x in values["update_norm"]],
                                 values["grad_dot_update"],
                                 [x * x for x in values["param_norm"]] if relative else None,
                                 [p.numel() for p in params] if relative or settings["trust_region"] == "rms"
                                 else None)
        scales = projection.scales
        if all(c == scales[0] for c in scales):
            torch._foreach_add_(params, updates, alpha=scales[0])
        else:
            for p, u, c in zip(params, updates, scales):
                p.add_(u, alpha=c)
        for state, c, free, norm in zip(states, scales, projection.free, values["update_norm"]):
            state.update(scale=c, free=free, taken=True, free_sq=(c * norm) ** 2 if free else 0.0)
        if horizon > 1:     # a decaying trace of the last ~H applied updates, of the tensors the multiplier moved
            traces = [s.setdefault("update_trace", torch.zeros_like(s["update"])) for s in states]
            torch._foreach_mul_(traces, 1.0 - 1.0 / horizon)
            for trace, u, c, free in zip(traces, updates, scales, projection.free):
                if free:
                    trace.add_(u, alpha=c)
        for group in self.param_groups:
            group["lr_multiplier"], group["trust_radius"] = multiplier, radius

        # 4. Feedback to the auxiliary net on the previous update; it shapes the next step.
        feedback = observation.feedback
        if feedback is not None:
            if feedback.meta_lr_scale is not None:
                for group in self.aux_net.meta_optimizer.param_groups:
                    group["lr"] = self.aux_net.learning_rate * feedback.meta_lr_scale
            self.aux_net.update_with_feedback(torch.tensor(feedback.features, dtype=torch.float32),
                                              hypergradient=feedback.hypergradient, rho=feedback.rho,
                                              constraint_active=feedback.constraint_active)
        ctl.record(observation, projection, loss_value)
        active = projection.active
        return StepInfo(
            learning_rate=self._effective_lr(schedule), lr_multiplier=multiplier,
            trust_radius=radius if settings["trust_region"] else float("inf"),
            update_magnitude=projection.applied_norm, constraint_active=active,
            efficiency=projection.applied_norm / projection.proposed_norm
            if active and projection.proposed_norm > 0 else 1.0,
            gradient_magnitude=grad_norm, quantization_error=self._quantization_error(params),
            hypergradient=observation.hypergradient, rho=observation.rho, step=ctl.steps, lr_schedule=schedule)

    # -- pieces of the step -------------------------------------------------------------------------------------------
    def _entries(self, grads):
        all_params = [(group, p) for group in self.param_groups for p in group["params"]]
        if grads is not None:
            grads = list(grads)
            if len(grads) != len(all_params):
                raise ValueError(f"got {len(grads)} gradients for {len(all_params)} parameters; pass one gradient "
                                 "(or None) per parameter, in the order of the optimizer's parameters")
        entries = []
        for i, (group, p) in enumerate(all_params):
            g = grads[i] if grads is not None else p.grad
            if g is None:
                continue
            if g.shape != p.shape:
                raise ValueError(f"gradient {i} has shape {tuple(g.shape)} but its parameter has {tuple(p.shape)}")
            if g.is_sparse:
                raise RuntimeError("HybridOptimizer does not support sparse gradients")
            entries.append((group, p, g.detach()))
        return entries

    def _update_cluster_scales(self, groups, values, prev, states) -> None:
        """Each group's LR factor from its own hypergradient cos(g_c, Δ_c) (the free part of its last update)."""
        dot_prev = dict(zip(prev, values["dot_prev"]))
        meta_lr = float(self.param_groups[0]["cluster_meta_lr"])
        for group, idx in groups:
            grad_norm = _total([values["grad_norm"][i] for i in idx])
            prev_norm = math.sqrt(sum(states[i].get("free_sq", 0.0) for i in idx))
            dot = sum(states[i]["scale"] * dot_prev[i] for i in idx if i in dot_prev and states[i].get("free", True))
            cosine = dot / (grad_norm * prev_norm) if grad_norm > 0 and prev_norm > 0 else float("nan")
            group["cluster_lr_scale"] = self.controller.cluster_scale(float(group["cluster_lr_scale"]), cosine,
                                                                      meta_lr)

    @staticmethod
    def _by_group(entries) -> list[tuple[dict, list[int]]]:
        groups: dict[int, tuple[dict, list[int]]] = {}
        for i, (group, _, _) in enumerate(entries):
            groups.setdefault(id(group), (group, []))[1].append(i)
        return list(groups.values())

    @staticmethod
    def _fused_indices(group, idx, states, grad_list) -> list[int]:
        """The tensors of `idx` the fused AdamW kernel may take: every tensor it touches qualifies."""
        if group["fused"] is False or group["base"] != "adamw":
            return []
        out = []
        for i in idx:
            g, s = grad_list[i], states[i]
            tensors = (g, s["update"], s["exp_avg"], s["exp_avg_sq"])
            if (g.device.type in FUSED_DEVICES and g.dtype in FUSED_DTYPES and s["step"].dtype == torch.float32
                    and all(t.is_contiguous() and t.dtype == g.dtype and t.device == g.device for t in tensors)):
                out.append(i)
        return out

    def _base_update(self, group, idx, params, grad_list, states, schedule, found_inf) -> None:
        """u_i = the base optimizer's update of tensor i at lr × schedule, into states[i]["update"] (θ unchanged)."""
        lr = float(group["lr"]) * schedule
        wd = float(group["weight_decay"])
        updates = [states[i]["update"] for i in idx]
        torch._foreach_zero_(updates)
        if group["base"] == "muon":
            self._muon_update(group, idx, params, grad_list, states, lr)
        elif group["base"] == "adamw":
            fused = set(self._fused_indices(group, idx, states, grad_list))
            for use_fused in (True, False):
                part = [i for i in idx if (i in fused) == use_fused]
                if not part:
                    continue
                foreach = None if use_fused else group["foreach"] is not False
                adamw_functional([states[i]["update"] for i in part], [grad_list[i] for i in part],
                                 [states[i]["exp_avg"] for i in part], [states[i]["exp_avg_sq"] for i in part], [],
                                 [states[i]["step"] for i in part], foreach=foreach, fused=use_fused,
                                 found_inf=found_inf if use_fused else None, amsgrad=False, beta1=group["betas"][0],
                                 beta2=group["betas"][1], lr=lr, weight_decay=0.0, eps=group["eps"], maximize=False)
            if wd:                                  # decoupled weight decay: u −= lr·wd·θ
                torch._foreach_add_(updates, [params[i] for i in idx], alpha=-lr * wd)
        else:
            gs = [grad_list[i] for i in idx]
            if wd:                                  # SGD's L2 decay enters the gradient (and the momentum)
                gs = torch._foreach_add(gs, [params[i] for i in idx], alpha=wd)
            buffers = [states[i].get("momentum_buffer") for i in idx]
            sgd_functional(updates, gs, buffers, foreach=group["foreach"] is not False, fused=False,
                           weight_decay=0.0, momentum=group["momentum"], lr=lr, dampening=0.0, nesterov=False,
                           maximize=False)
            for i, buf in zip(idx, buffers):
                if buf is not None:
                    states[i]["momentum_buffer"] = buf

    @staticmethod
    def _muon_update(group, idx, params, grad_list, states, lr) -> None:
        """Muon's direction into the update buffers: Nesterov momentum (torch.optim.Muon's lerp form), then
        orthogonalized and scaled to AdamW's update RMS; decoupled weight decay as AdamW's."""
        beta, wd = float(group["momentum"]), float(group["weight_decay"])
        for i in idx:
            g, state = grad_list[i], states[i]
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1.0 - beta)
            direction = _orthogonalize(g.lerp(buf, beta))
            state["update"].copy_(direction).mul_(-lr * 0.2 * math.sqrt(max(g.shape)))
            if wd:
                state["update"].add_(params[i], alpha=-lr * wd)

    def _init_state(self, p, base) -> dict:
        state = self.state[p]
        if "update" not in state:
            # contiguous buffers whatever the parameter's layout: the fused kernel gets only tensors it handles
            state["update"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if base == "adamw":
                # float32 step counters on the parameter's device, as torch's fused AdamW keeps them
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif base == "muon":
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    def _quantization_error(self, params) -> float | None:
        settings = self.param_groups[0]
        bits = settings["quantization_bits"]
        if bits is None or self.controller.steps % int(settings["quantization_every"]):
            return None
        from .quantization import fake_quantize   # only needed when quantization is tracked
        err_sq = total_sq = 0.0
        for p in params:
            if p.dim() < 2:
                continue
            q = fake_quantize(p.detach(), bits, scale_factor=settings["quantization_scale"])
            err_sq += float(torch.sum((p - q) ** 2))
            total_sq += float(torch.sum(p ** 2))
        return math.sqrt(err_sq / total_sq) if total_sq > 0 else None

    def _skip(self, values: dict[str, list[float]], schedule: float) -> StepInfo:
        settings = self.param_groups[0]
        radius = self.controller.skip(settings)
        if settings["trust_region"]:
            for group in self.param_groups:
                group["trust_radius"] = radius
        grad_norm = _total(values["grad_norm"])
        return StepInfo(self._effective_lr(schedule), float(settings["lr_multiplier"]), radius, 0.0, False, 0.0,
                        grad_norm, skipped=True, step=self.controller.steps, lr_schedule=schedule)

    def _effective_lr(self, schedule: float) -> float:
        first = self.param_groups[0]
        return float(first["lr"]) * schedule * float(first["lr_multiplier"])

    def _radius_for_info(self) -> float:
        first = self.param_groups[0]
        return float(first["trust_radius"]) if first["trust_region"] else float("inf")

    # -- introspection and checkpointing ------------------------------------------------------------------------------
    @property
    def constraint_activation_rate(self) -> float:
        return self.controller.constraint_activation_rate

    def set_aux_net(self, aux_net: AuxiliaryNeuralNetwork | None) -> None:
        """Use another auxiliary net from the next step on: it starts from its own prediction (the rule's running
        factor is reset, and the previous step, decided by the old net, gives it no feedback)."""
        self.aux_net = aux_net
        self.controller.forget_previous_step()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["hybrid"] = {"controller": self.controller.state_dict(),
                           "aux_net": self.aux_net.full_state_dict() if self.aux_net is not None else None}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        hybrid = state_dict.pop("hybrid", None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:        # groups saved before a setting existed get today's value
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for state in self.state.values():      # updates saved before per-tensor scales were applied as they are
            if "update" in state and "scale" not in state:
                state.update(scale=1.0, taken=True)
        if hybrid is None:
            return
        if "controller" in hybrid:
            self.controller.load_state_dict(hybrid["controller"])
        else:                                  # the first checkpoint format: one dict of running numbers
            self.controller.load_state_dict({**hybrid["state"], "tracker": hybrid["tracker"]})
        if hybrid["aux_net"] is not None:
            if self.aux_net is None:
                raise ValueError("this checkpoint holds an auxiliary network but the optimizer has none: build the "
                                 "optimizer with aux_net=AuxiliaryNeuralNetwork(...) (or use_auxiliary_nn=True)")
            self.aux_net.load_full_state_dict(hybrid["aux_net"])


class _Measurements:
    """Per-step numbers as 0-dim tensors under names, read back to the host in one go."""

    def __init__(self):
        self._parts: list[tuple[str, list[torch.Tensor]]] = []

    def add(self, name: str, tensors: list[torch.Tensor]) -> None:
        self._parts.append((name, list(tensors)))

    def tensors(self, name: str) -> list[torch.Tensor]:
        return next(t for n, t in self._parts if n == name)

    def read(self) -> dict[str, list[float]]:
        stacked = [torch.stack(ts).to(torch.float64) for _, ts in self._parts if ts]
        numbers = torch.cat(stacked).tolist() if stacked else []
        out, start = {}, 0
        for name, ts in self._parts:
            out[name], start = numbers[start:start + len(ts)], start + len(ts)
        return out


def _orthogonalize(matrix: torch.Tensor) -> torch.Tensor:
    """≈ U·Vᵀ of `matrix` (singular values pushed to ~[0.5, 1.5]) by Muon's quintic Newton–Schulz iteration. In
    float32, not torch.optim.Muon's bfloat16: bf16 matmuls are several times slower than fp32 on CPUs without
    AMX, and on a GPU the matrices here are small."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:                                   # iterate on the wide side: X·Xᵀ is the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)                  # spectral norm ≤ Frobenius norm ≤ 1: inside NS's basin
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


def _total(norms: list[float]) -> float:
    return math.sqrt(sum(x * x for x in norms))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.vdot(a.reshape(-1), b.reshape(-1))


def _host_loss(loss) -> float:
    """The loss as a number when it is one already (a tensor loss is read with the step's statistics)."""
    return 0.0 if loss is None or isinstance(loss, torch.Tensor) else float(loss)


def _loss_value(values: dict[str, list[float]], loss) -> float | None:
    if loss is None:
        return None
    return values["loss"][0] if "loss" in values else float(loss)


def _finite(values: dict[str, list[float]], loss) -> bool:
    loss_value = _loss_value(values, loss)
    return math.isfinite(sum(values["grad_norm"])) and (loss_value is None or math.isfinite(loss_value))


def _checked_settings(s: dict[str, Any]) -> dict[str, Any]:
    """The settings with tuples normalised; a ValueError naming the first bad one and what is allowed."""
    s = dict(s)

    def number(key, low=None, high=None, low_open=False, high_open=False, allow_none=False):
        value = s[key]
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)) \
                or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and (value >= high if high_open else value > high)):
            lo = "" if low is None else f"{'>' if low_open else '≥'} {low}"
            hi = "" if high is None else f"{'<' if high_open else '≤'} {high}"
            raise ValueError(f"{key} must be a finite number {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")

    def integer(key, low, allow_none=False):
        value = s[key]
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
            raise ValueError(f"{key} must be an integer ≥ {low}{' or None' if allow_none else ''}, got {value!r}")

    def choice(key, allowed):
        if s[key] not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {s[key]!r}")

    number("lr", 0.0)
    try:
        s["betas"] = tuple(float(b) for b in s["betas"])
    except (TypeError, ValueError):
        raise ValueError(f"betas must be two numbers in [0, 1), got {s['betas']!r}") from None
    if len(s["betas"]) != 2 or not all(0.0 <= b < 1.0 for b in s["betas"]):
        raise ValueError(f"betas must be two numbers in [0, 1), got {s['betas']!r}")
    number("eps", 0.0)
    number("weight_decay", 0.0)
    number("momentum", 0.0)
    for key in ("foreach", "fused"):
        if s[key] not in (None, True, False):
            raise ValueError(f"{key} must be None, True or False, got {s[key]!r}")
    if s["foreach"] and s["fused"]:
        raise ValueError("foreach=True and fused=True cannot be used together: choose one (or None for the default)")
    choice("base", BASES)
    choice("trust_region", TRUST_REGIONS)
    choice("rho_from", RHO_SOURCES)
    choice("aux_radius", AUX_RADIUS_MODES)
    try:
        lo, hi = (float(x) for x in s["radius_range"])
    except (TypeError, ValueError):
        raise ValueError(f"radius_range must be two numbers 0 < low ≤ high, got {s['radius_range']!r}") from None
    if not (0 < lo <= hi < math.inf):
        raise ValueError(f"radius_range must be two numbers 0 < low ≤ high, got {s['radius_range']!r}")
    s["radius_range"] = (lo, hi)
    number("trust_radius", 0.0, low_open=True)
    if not lo <= s["trust_radius"] <= hi:
        raise ValueError(f"trust_radius must lie in [{lo:g}, {hi:g}], got {s['trust_radius']!r}")
    s["trust_radius"] = float(s["trust_radius"])
    integer("meta_horizon", 1)
    integer("n_clusters", 1, allow_none=True)
    integer("quantization_every", 1)
    number("quantization_scale", 0.0, low_open=True)
    number("quantization_bits", 0.0, low_open=True, allow_none=True)
    integer("warmup_steps", 0)
    integer("decay_steps", 1, allow_none=True)
    number("cluster_meta_lr", 0.0, low_open=True)
    number("cluster_lr_scale", 0.0, low_open=True)
    number("max_update_rms", 0.0, low_open=True)
    for key in ("radius_adaptation", "meta_learning", "projected_hypergradient", "anneal_meta_learning",
                "cluster_multipliers"):
        s[key] = bool(s[key])
    return s


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
    onto ‖ΔW‖ ≤ radius·‖W‖; "bounded": that and an update RMS ≤ 1e-3 per tensor; "rms": ‖ΔΘ‖₂ ≤ radius·1e-3·√N). Returns a StepInfo (update_magnitude, constraint_active, efficiency, ...).
    """

    def __init__(self, use_quantization: bool = True, target_bits: float = 1.58, momentum: float = 0.9,
                 base: str = "adamw", weight_decay: float = 0.0, trust_region: str = "absolute"):
        if base not in BASES:
            raise ValueError(f"base must be one of {', '.join(BASES)}, got {base!r}")
        if trust_region not in TRUST_REGION_MODES:
            raise ValueError(f"trust_region must be one of {', '.join(map(repr, TRUST_REGION_MODES))}, "
                             f"got {trust_region!r}")
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
        if constraint_radius is not None:
            if not constraint_radius > 0:
                raise ValueError(f"constraint_radius must be > 0 (or None for no constraint), got {constraint_radius!r}")
            opt.controller.radius = float(constraint_radius)
        for group in opt.param_groups:
            group["lr"] = learning_rate
            group["trust_region"] = self.trust_region if constraint_radius is not None else None
        opt.step(loss=loss, grads=grads)
        return opt.last_info

    def state_dict(self) -> dict:
        return self.optimizer.state_dict() if self.optimizer is not None else {}


# -- Muon for the hidden matrices + AdamW for the rest (`--optimizer muon`) --------------------------------------------
def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """Muon's share of the student: 2-D weights inside the transformer blocks (not the embedding, not the head)."""
    return param.ndim == 2 and not name.startswith(("embed", "lm_head"))


class _States(Mapping):
    """Read-only view of several optimizers' `state` dicts. (Not collections.ChainMap: its lookups would go through
    the first optimizer's defaultdict, which creates an empty entry for every key it lacks.)"""

    def __init__(self, *maps):
        self.maps = maps

    def __getitem__(self, key):
        for m in self.maps:
            if key in m:
                return m[key]
        raise KeyError(key)

    def __iter__(self):
        for m in self.maps:
            yield from m

    def __len__(self) -> int:
        return sum(len(m) for m in self.maps)


class MuonWithAdamW(Optimizer):
    """One optimizer object over two torch optimizers: torch.optim.Muon for the hidden matrices, AdamW for the
    embedding, the norms and the head, as Muon's authors use it (Jordan et al. 2024; Liu et al. 2025).

    adjust_lr_fn="match_rms_adamw" (Moonlight's rule: update RMS matched to AdamW's, 0.2·√max(A, B)) lets one base
    LR drive both parts. Its `param_groups` are the two inner optimizers' own group dicts, so an LR scheduler (or
    any code that writes group["lr"]) drives both; `state` is a live read-only view of both states; `state_dict()`
    holds both, so a checkpoint resumes exactly."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 1e-5,
                 betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.95):
        hidden = [p for n, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(n, p)]
        other = [p for n, p in model.named_parameters() if p.requires_grad and not is_hidden_matrix(n, p)]
        if not hidden:
            raise ValueError("Muon needs at least one 2-D hidden weight matrix; this model has none")
        super().__init__([*hidden, *other], {"lr": lr})          # hooks and bookkeeping of torch's Optimizer
        self.muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(other, lr=lr, betas=betas, weight_decay=weight_decay) if other else None

    # Live views, not copies: torch's load_state_dict gives the inner optimizers new group dicts and a new state, and
    # an LR scheduler built before a resume must still drive them (a stored list would silently go stale).
    @property
    def _inner(self) -> list:
        return [self.muon] + ([self.adamw] if self.adamw is not None else [])

    @property
    def param_groups(self) -> list[dict]:
        if "muon" not in self.__dict__:                 # inside torch's __init__: its own bookkeeping list
            return self.__dict__.setdefault("_init_groups", [])
        return [g for o in self._inner for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.__dict__["_init_groups"] = value           # torch's __init__ / __setstate__; the inner groups rule

    @property
    def state(self):
        if "muon" not in self.__dict__:
            return self.__dict__.setdefault("_init_state", {})
        return _States(*(o.state for o in self._inner))

    @state.setter
    def state(self, value) -> None:
        self.__dict__["_init_state"] = value

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        if self.adamw is not None:
            self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("this optimizer state is not Muon + AdamW's (keys muon, adamw)")
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
