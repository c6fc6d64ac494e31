"""One benchmark run: the pipeline's own RunPlan and set-up (distill/plan.py, distill/setup.py: seeding, student,
quantization, sampler, optimizer), trained by the pipeline's `fit` with a timing callback. bench_hybrid.py (the
quick / full protocols) and tracks.py (both AlgoPerf tracks) run every job through `run` here.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from benchmarks.methods import Method, build_optimizer, hybrid_config
from benchmarks.workload import Prepared
from hybrid_optimization.distill.callbacks import DivergenceGuard, Evaluation, PrecisionPlanSwitch
from hybrid_optimization.distill.loop import TrainState, fit
from hybrid_optimization.distill.options import TrainOptions
from hybrid_optimization.distill.plan import PLAN_WARMUP_FRACTION, RunPlan, plan_run
from hybrid_optimization.distill.setup import Prepared as StatePrepared
from hybrid_optimization.distill.setup import build_state, make_precision_plan, validation
from hybrid_optimization.distill.summary import peak_rss_mb, reset_peak_rss

ALPHA, TEMPERATURE = 0.5, 2.0         # the pipeline's defaults (TrainOptions.alpha / temperature)


# -- one training run: the pipeline's own loop (distill.loop.fit) with a timing callback ---------------------------
@dataclass(frozen=True)
class RunSpec:
    workload: str                     # W1 | W2 | W3 | W4x10 | W4/10 | tune-W2 ...
    method: Method
    bits: float                       # 32 = full precision; 1.58 ternary; 1 binary
    lr: float                         # base LR (already scaled for W4)
    seed: int
    steps: int
    batch_size: int
    eval_every: int
    device: str = "cpu"


@dataclass
class RunResult:
    spec: RunSpec
    evals: list[dict] = field(default_factory=list)       # {"step", "val_loss", "val_loss_fp", "qdiff_*", ...,
                                                            #  "train_s", "train_cpu_s"} (training time so far)
    losses: list[float] = field(default_factory=list)     # training loss of each step
    multipliers: list[float] = field(default_factory=list)
    radii: list[float] = field(default_factory=list)
    constraint_active: list[bool] = field(default_factory=list)
    hypergradients: list[float] = field(default_factory=list)   # the aux net's LR signal of each step
    rhos: list[float] = field(default_factory=list)             # the trust-region agreement ratio of each step
    skipped_steps: int = 0
    diverged: bool = False
    clustering_s: float = 0.0         # charged to the run when it samples by cluster
    clustering_cpu_s: float = 0.0
    train_s: float = 0.0
    train_cpu_s: float = 0.0
    peak_rss_mb: float | None = None  # during the training loop (Linux VmHWM, reset at the start)
    optimizer_state_mb: float = 0.0   # tensors the optimizer keeps (moments, buffers, aux net), at the end
    plan_avg_bits: float | None = None
    plan_s: float = 0.0               # the precision plan (once; inside the step that makes it)
    plan_cpu_s: float = 0.0


class Timing:
    """Each step timed on its own (wall clock and process CPU time; evaluations excluded, so the time to a target
    is the training time it took, and the CPU time does not grow when other processes share the cores), plus the
    hybrid optimizer's per-step decisions. First in the callback list, so a precision plan made before a step is
    charged to that step."""
    order = 0

    def __init__(self, result: RunResult, device: torch.device):
        self.result, self.device = result, device

    def on_step_start(self, state: TrainState) -> None:
        self.started, self.started_cpu = time.perf_counter(), time.process_time()

    def on_step_end(self, state: TrainState, metrics) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        r = self.result
        r.train_s += time.perf_counter() - self.started
        r.train_cpu_s += time.process_time() - self.started_cpu
        r.losses.append(metrics.loss)
        info = state.last_info
        if info is not None:
            r.multipliers.append(info.lr_multiplier)
            r.radii.append(info.trust_radius)
            r.constraint_active.append(bool(info.constraint_active))
            r.hypergradients.append(info.hypergradient)
            r.rhos.append(info.rho)
            r.skipped_steps += int(info.skipped)


def run_plan(spec: RunSpec, n_clusters: int, data_clusters: int = 8) -> RunPlan:
    """The pipeline's RunPlan of one benchmark run: `spec.steps` steps in one epoch, the method's config, its
    optimizer (methods.build_optimizer) as the options' optimizer_factory, its clustering switches."""
    method = spec.method
    cfg = hybrid_config(method, spec.lr, spec.bits, spec.steps, spec.batch_size, spec.seed,
                        data_clusters=data_clusters)
    options = TrainOptions(
        hybrid=method.is_hybrid, bits=spec.bits, max_steps=spec.steps, steps_per_epoch=spec.steps,
        batch_size=spec.batch_size, seed=spec.seed, hybrid_config=cfg, alpha=ALPHA, temperature=TEMPERATURE,
        cluster_batches="mixed" if method.mixed_batches else "single", track=False, device=spec.device,
        optimizer_factory=lambda model, options: build_optimizer(method, model, cfg, spec.steps, n_clusters))
    return dataclasses.replace(plan_run(options), data_clustering=method.data_clustering,
                               param_clustering=method.param_clustering and spec.bits < 16)


def run(prepared: Prepared, spec: RunSpec) -> RunResult:
    """One benchmark run on data prepared once: the pipeline's own set-up (setup.build_state: seeding, student,
    quantization, sampler, optimizer) and precision plan, trained by the pipeline's `fit`; no run store,
    checkpoints or per-layer diagnostics. `tests/test_benchmarks_smoke.py` checks it gives the same validation
    loss as `train(options)`."""
    method, device = spec.method, torch.device(spec.device)
    result = RunResult(spec=spec)
    clusters = prepared.clusters(spec.seed)
    if method.data_clustering:
        result.clustering_s, result.clustering_cpu_s = clusters.seconds, clusters.cpu_seconds
    plan = run_plan(spec, clusters.n_clusters, prepared.data_clusters)
    data = StatePrepared(dataset=prepared.dataset, logits=prepared.logits, eval_index=prepared.eval_index,
                         train_clusters=clusters.train, val_clusters=clusters.val,
                         student_config=prepared.student_config)
    state = build_state(plan, data, device=device)
    state.grad_clip, state.measure_updates = method.clip, False
    optimizer = state.optimizer

    callbacks = [Timing(result, device)]      # first: its timer starts before the plan is made in a step
    switch = None
    if plan.param_clustering:
        at = method.plan_fraction if method.plan_fraction is not None else PLAN_WARMUP_FRACTION
        switch = PrecisionPlanSwitch(max(1, round(at * spec.steps)), lambda s: make_precision_plan(plan, s))
        callbacks.append(switch)
    if not method.is_hybrid:                  # a plain optimizer's weights are NaN after one non-finite loss
        guard = DivergenceGuard(patience=1)
        guard.order = Evaluation.order - 1     # checked before evaluating: a diverged step is not evaluated
        callbacks.append(guard)
    callbacks.append(Evaluation(validation(data, device), every_steps=spec.eval_every, annotate=lambda: {
        "train_s": result.train_s + result.clustering_s, "train_cpu_s": result.train_cpu_s + result.clustering_cpu_s}))
    reset_peak_rss()
    fit(state, spec.steps, callbacks)
    if state.plan is not None:
        result.plan_avg_bits = float(state.plan.avg_bits)
        result.plan_s, result.plan_cpu_s = switch.seconds, switch.cpu_seconds
    result.evals = state.evals
    result.peak_rss_mb = peak_rss_mb()
    result.optimizer_state_mb = optimizer_state_bytes(optimizer) / 2 ** 20
    final = result.evals[-1]["val_loss"] if result.evals else float("nan")
    first = result.losses[0] if result.losses else float("nan")
    # Diverged: a non-finite loss, or a final validation loss no better than the loss at the very first step.
    result.diverged = state.diverged is not None or not math.isfinite(final) or not final < first
    return result


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors an optimizer keeps between steps (plus the aux net and its meta-optimizer)."""
    total = 0
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    aux = getattr(optimizer, "aux_net", None)
    if aux is not None:
        total += sum(p.numel() * p.element_size() for p in aux.parameters())
        for state in aux.meta_optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total
