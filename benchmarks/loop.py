"""One benchmark training run on a prepared workload: the pipeline's training step, timed and evaluated.

This is `hybrid_optimization.distill.train.Trainer.fit` reduced to what changes the weights (same seeding, student,
quantization, samplers, distillation loss, optimizer calls, precision plan at 10 % of the steps, evaluation), with
the run store, checkpoints and per-layer diagnostics left out. `tests/test_benchmarks_smoke.py` checks it gives
the same validation loss as `train(options)` for the baseline and the hybrid.

Timing: each step is timed on its own (wall clock and process CPU time), evaluations excluded, so the time to a
target is the training time it took; the CPU time does not grow when other processes share the cores.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from hybrid_optimization import ClusterBalancedSampler, HybridOptimizer
from hybrid_optimization.distill.evaluate import evaluate
from hybrid_optimization.distill.losses import distillation_loss
from hybrid_optimization.distill.samplers import ShuffleBatchSampler
from hybrid_optimization.distill.student import StudentLM
from hybrid_optimization.distill.train import (PLAN_WARMUP_FRACTION, make_precision_plan, peak_rss_mb,
                                               quantize_student, reset_peak_rss)

from .methods import Method, build_optimizer, hybrid_config
from .workload import Prepared

ALPHA, TEMPERATURE = 0.5, 2.0         # the pipeline's defaults (TrainOptions.alpha / temperature)


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


def run(prepared: Prepared, spec: RunSpec) -> RunResult:
    method, device = spec.method, torch.device(spec.device)
    result = RunResult(spec=spec)
    cfg = hybrid_config(method, spec.lr, spec.bits, spec.steps, spec.batch_size, spec.seed,
                        data_clusters=prepared.data_clusters)
    clusters = prepared.clusters(spec.seed)
    if method.data_clustering:
        result.clustering_s, result.clustering_cpu_s = clusters.seconds, clusters.cpu_seconds

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    student = StudentLM(prepared.student_config).to(device)
    if spec.bits < 16:
        quantize_student(student, spec.bits, cfg.quantizer_scale)
    if method.data_clustering:
        sampler = ClusterBalancedSampler(clusters.train, spec.batch_size, max_repeats=cfg.max_sample_repeats,
                                         seed=cfg.seed, mixed=method.mixed_batches)
    else:
        sampler = ShuffleBatchSampler(len(prepared.dataset.train), spec.batch_size, seed=cfg.seed)
    optimizer, scheduler = build_optimizer(method, student, cfg, spec.steps, clusters.n_clusters)
    _optimizer_mode(optimizer, "train")
    plan_step = max(1, round(PLAN_WARMUP_FRACTION * spec.steps)) \
        if method.param_clustering and spec.bits < 16 else None

    data = prepared.dataset
    values, indices = prepared.logits.train_values, prepared.logits.train_indices
    eval_tokens = data.val.tokens[prepared.eval_index]
    eval_values = prepared.logits.val_values[prepared.eval_index]
    eval_indices = prepared.logits.val_indices[prepared.eval_index]
    eval_clusters = clusters.val[prepared.eval_index]
    reset_peak_rss()
    for step in range(spec.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        if step == plan_step:
            result.plan_avg_bits = _make_plan(student, prepared, cfg, spec, values, indices)
            result.plan_s, result.plan_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
        batch_index = sampler.next_batch()
        cluster_id = int(sampler.last_cluster) if method.data_clustering and not method.mixed_batches else None
        local = torch.from_numpy(np.asarray(batch_index, dtype=np.int64))
        batch = data.train.tokens[local].to(device)
        logits = student(batch[:, :-1])
        loss, _ = distillation_loss(logits, batch[:, 1:], values[local].to(device), indices[local].to(device),
                                    ALPHA, TEMPERATURE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = float(loss.detach())
        if method.clip is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), method.clip)
        if isinstance(optimizer, HybridOptimizer):
            info = optimizer.step(loss=loss_value, cluster_id=cluster_id)
            result.multipliers.append(info.lr_multiplier)
            result.radii.append(info.trust_radius)
            result.constraint_active.append(bool(info.constraint_active))
            result.hypergradients.append(info.hypergradient)
            result.rhos.append(info.rho)
            result.skipped_steps += int(info.skipped)
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.train_s += time.perf_counter() - start
        result.train_cpu_s += time.process_time() - start_cpu
        result.losses.append(loss_value)
        done = step + 1
        if not math.isfinite(loss_value) and not isinstance(optimizer, HybridOptimizer):
            result.diverged = True            # the weights are NaN now: nothing later can recover
            break
        if done % spec.eval_every == 0 or done == spec.steps:
            _optimizer_mode(optimizer, "eval")    # Schedule-Free evaluates at its averaged weights
            metrics = evaluate(student, eval_tokens, eval_values, eval_indices, eval_clusters, device=device)
            _optimizer_mode(optimizer, "train")
            result.evals.append({"step": done, **metrics, "train_s": result.train_s + result.clustering_s,
                                 "train_cpu_s": result.train_cpu_s + result.clustering_cpu_s})
    result.peak_rss_mb = peak_rss_mb()
    result.optimizer_state_mb = optimizer_state_bytes(optimizer) / 2 ** 20
    final = result.evals[-1]["val_loss"] if result.evals else float("nan")
    first = result.losses[0] if result.losses else float("nan")
    # Diverged: a non-finite loss, or a final validation loss no better than the loss at the very first step.
    result.diverged = result.diverged or not math.isfinite(final) or not final < first
    return result


def _make_plan(student, prepared: Prepared, cfg, spec: RunSpec, values, indices) -> float:
    """Parameter clustering → per-layer bits with the pipeline's own recipe (Trainer._make_plan)."""
    plan = make_precision_plan(student, prepared.dataset.train.tokens, values, indices, cfg, spec.bits,
                               spec.batch_size, ALPHA, TEMPERATURE, torch.device(spec.device))
    quantize_student(student, plan.bit_map(), cfg.quantizer_scale)
    return float(plan.avg_bits)


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


def _optimizer_mode(optimizer, mode: str) -> None:
    method = getattr(optimizer, mode, None)       # Schedule-Free optimizers have .train() / .eval()
    if callable(method) and not isinstance(optimizer, torch.nn.Module):
        method()
