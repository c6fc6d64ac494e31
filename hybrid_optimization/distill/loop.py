"""The training loop: `train_step(state, batch) -> StepMetrics` and `fit(state, steps, callbacks)`.

Everything that is not the ML — the run store, the console, evaluation, checkpoints, stop requests, flip
tracking, the precision-plan switch, timing — is a callback (callbacks.py), called by their `order` (ties, and
objects without one, in list order; see callbacks.DEFAULT_ORDER):

    on_fit_start(state)                  once, before the first step
    on_step_start(state)                 before a step takes its batch (e.g. the precision-plan switch)
    on_step_end(state, metrics)          after the optimizer step; may fill metrics (flip rate, ...) for the
                                         callbacks after it, and may set `state.stop_reason` to end the loop
    on_fit_end(state)                    once, after the last step (also after a stop)

The pipeline (train.py) and the benchmark harness (benchmarks/bench_hybrid.py) both train through this `fit`.
A `TrainState` holds what changes while training; its `state_dict()` is the checkpoint.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .. import distributed as dist_utils
from ..optimizers import set_optimizer_mode  # noqa: F401  (the menu's one train/eval switch; re-exported)
from ..quantization import quantize_model, quantized_layers
from ..schema import HISTORY_KEYS, StepMetrics
from .checkpoint import rng_state, set_rng_state
from .losses import distillation_loss

DEFAULT_ORDER = 80          # callbacks.DEFAULT_ORDER (callbacks.py imports this module, so the value lives here)


@dataclass
class TrainData:
    """The training windows and the teacher's cached top-k logits for each of them."""
    tokens: torch.Tensor              # [n, seq_len + 1] token ids
    values: torch.Tensor              # [n, seq_len, k] teacher top-k logits
    indices: torch.Tensor             # [n, seq_len, k] their token ids


@dataclass
class TrainState:
    """What a training run changes, and what it needs to take its next step."""
    model: torch.nn.Module            # the student (what is saved and evaluated)
    optimizer: Any                    # a torch optimizer; HybridOptimizer takes the loss and the batch's cluster
    sampler: Any                      # next_batch() -> window indices; last_cluster; state_dict()
    data: TrainData
    total_steps: int
    steps_per_epoch: int
    alpha: float = 0.5                # weight of the hard-label cross-entropy in the loss
    temperature: float = 2.0
    scheduler: Any = None
    forward: torch.nn.Module | None = None    # the DDP wrapper under torchrun (None: the model)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ctx: dist_utils.DistContext = field(default_factory=dist_utils.DistContext)
    batch_clusters: bool = False      # every batch is one cluster's: its cluster id feeds the optimizer
    grad_clip: float | None = None    # clip the gradient norm before the step (a benchmark method)
    measure_updates: bool = True      # plain optimizers: measure ‖g‖ and ‖ΔΘ‖ (costs a copy of the weights)
    quantizer_scale: float = 1.0
    fingerprint: dict = field(default_factory=dict)   # what a checkpoint must match to be resumed
    # -- changed by training -------------------------------------------------------------------------------
    step: int = 0                     # optimizer steps completed
    history: list[StepMetrics] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)   # {"step": s, **metrics}
    train_seconds: float = 0.0        # in the training loop, resumed segments included
    bit_map: dict | None = None       # per-layer bits once the precision plan is applied
    plan: Any = None                  # the PrecisionPlan (hybrid runs)
    flip_tracker: Any = None          # CodeFlipTracker of the quantized codes
    clusters: dict | None = None      # {"train": tensor, "val": tensor} data-cluster labels
    stop_reason: str | None = None    # set by a callback: fit() ends after this step
    diverged: str | None = None       # why the run diverged (set with stop_reason by DivergenceGuard)
    last_info: Any = None             # the hybrid optimizer's StepInfo of the last step

    @property
    def epoch(self) -> int:
        """The 0-based epoch of the next step."""
        return self.step // self.steps_per_epoch

    # -- the checkpoint ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step, "fingerprint": self.fingerprint,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler": _tensorise(self.sampler.state_dict()), "rng": rng_state(),
            "bit_map": self.bit_map, "plan": self.plan.to_json() if self.plan is not None else None,
            "flip_tracker": self.flip_tracker.state_dict() if self.flip_tracker is not None else None,
            "clusters": self.clusters,
            "history": {key: [getattr(h, key) for h in self.history] for key in HISTORY_KEYS},
            "evals": self.evals, "train_seconds": self.train_seconds,
        }

    def load_state_dict(self, payload: dict) -> None:
        """Continue from a checkpoint (raises KeyError / ValueError / RuntimeError when it does not fit)."""
        from ..precision import PrecisionPlan
        if payload.get("bit_map"):                  # the plan's layers first, so the weights' shapes match
            quantize_student(self.model, payload["bit_map"], self.quantizer_scale)
            self.bit_map = payload["bit_map"]
        if payload.get("plan"):
            self.plan = PrecisionPlan.from_json(payload["plan"])
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload.get("scheduler") is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        self.sampler.load_state_dict(_untensorise(payload["sampler"]))
        if self.flip_tracker is not None and payload.get("flip_tracker") is not None:
            self.flip_tracker.load_state_dict(payload["flip_tracker"])
        set_rng_state(payload["rng"])
        columns = payload["history"]
        self.history = [StepMetrics.from_dict({key: columns[key][i] for key in columns})
                        for i in range(len(columns["step"]))]
        self.evals = list(payload.get("evals") or [])
        self.train_seconds = float(payload.get("train_seconds") or 0.0)
        self.step = int(payload["step"])


def train_step(state: TrainState, batch_index: np.ndarray, cluster_id: int | None = None) -> StepMetrics:
    """One optimizer step on the windows `batch_index` (this rank's share of them under torchrun)."""
    local = torch.from_numpy(np.asarray(dist_utils.shard(batch_index, state.ctx), dtype=np.int64))
    batch = state.data.tokens[local].to(state.device)
    logits = (state.forward or state.model)(batch[:, :-1])
    loss, parts = distillation_loss(logits, batch[:, 1:], state.data.values[local].to(state.device),
                                    state.data.indices[local].to(state.device), state.alpha, state.temperature)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loss_value = dist_utils.all_reduce_mean(float(loss.detach()), state.ctx, state.device)
    if state.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.grad_clip)
    metrics = _optimizer_step(state, loss_value, cluster_id)
    if state.scheduler is not None:
        state.scheduler.step()
    metrics.update(loss=loss_value, ce=float(parts["ce"]), kl=float(parts["kl"]), cluster_id=cluster_id)
    return StepMetrics(**metrics)


def fit(state: TrainState, steps: int, callbacks: Sequence[Any] = ()) -> TrainState:
    """Train until `state.step == steps` or a callback sets `state.stop_reason`."""
    callbacks = sorted(callbacks, key=lambda c: getattr(c, "order", DEFAULT_ORDER))     # stable: ties keep list order
    tokens_per_step = state.sampler.batch_size * (state.data.tokens.shape[1] - 1)
    fit_started, seconds_before = time.perf_counter(), state.train_seconds   # wall time, resumed runs included
    _call(callbacks, "on_fit_start", state)
    while state.step < steps and state.stop_reason is None:
        started = time.perf_counter()
        _call(callbacks, "on_step_start", state)
        batch_index = state.sampler.next_batch()
        # A batch drawn from one cluster carries its id to the optimizer; a mixed batch has none of its own.
        cluster_id = int(state.sampler.last_cluster) if state.batch_clusters else None
        metrics = train_step(state, batch_index, cluster_id)
        metrics.epoch = state.epoch
        state.step += 1
        metrics.step = state.step
        metrics.tokens_per_s = tokens_per_step / max(time.perf_counter() - started, 1e-9)
        state.train_seconds = metrics.time = seconds_before + time.perf_counter() - fit_started
        state.history.append(metrics)
        _call(callbacks, "on_step_end", state, metrics)
    state.train_seconds = seconds_before + time.perf_counter() - fit_started
    _call(callbacks, "on_fit_end", state)
    return state


def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(*args)


def _optimizer_step(state: TrainState, loss_value: float, cluster_id: int | None) -> dict:
    from ..optim import HybridOptimizer
    optimizer = state.optimizer
    if isinstance(optimizer, HybridOptimizer):
        returned = optimizer.step(loss=loss_value, cluster_id=cluster_id)
        info = getattr(optimizer, "last_info", None) or returned     # StepInfo
        state.last_info = info
        radius = info.trust_radius if math.isfinite(info.trust_radius) else None
        return {"learning_rate": info.learning_rate, "lr_multiplier": info.lr_multiplier,
                "trust_radius": radius, "constraint_active": bool(info.constraint_active),
                "update_magnitude": info.update_magnitude, "gradient_magnitude": info.gradient_magnitude,
                "skipped": bool(info.skipped)}
    # A plain torch optimizer: measure what it did so the same curves exist for the baseline.
    grad_norm = update = None
    if state.measure_updates:
        params = [p for p in state.model.parameters() if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params]))))
        before = [p.detach().clone() for p in params]
    optimizer.step()
    if state.measure_updates:
        update = float(torch.linalg.vector_norm(torch.stack(
            torch._foreach_norm(torch._foreach_sub([p.detach() for p in params], before)))))
    return {"learning_rate": float(optimizer.param_groups[0]["lr"]), "lr_multiplier": 1.0, "trust_radius": None,
            "constraint_active": None, "update_magnitude": update, "gradient_magnitude": grad_norm,
            "skipped": not math.isfinite(loss_value)}


def quantize_student(student: torch.nn.Module, bits, scale_factor: float) -> None:
    """Quantize the student's Linear layers (one bit-width or a bit map). k-bit layers search their MSE clipping
    ratio at every training step (not every 16th): the ratio then depends only on the current weights, so a
    resumed run and a run with extra evaluations follow exactly the same trajectory."""
    quantize_model(student, bits, scale_factor=scale_factor)
    for layer in quantized_layers(student).values():
        layer.scale_search_interval = 1


def _tensorise(value):
    """Sampler states hold numpy generator states with 128-bit ints: keep them as strings for weights_only."""
    if isinstance(value, dict):
        return {k: _tensorise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tensorise(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2 ** 63:
        return {"__bigint__": str(value)}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _untensorise(value):
    if isinstance(value, dict):
        if set(value) == {"__bigint__"}:
            return int(value["__bigint__"])
        return {k: _untensorise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untensorise(v) for v in value]
    return value
