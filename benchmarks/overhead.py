"""Overhead and compression figures for the hybrid report, measured by the existing benchmark scripts' functions
(bench_core.py: optimizer step; bench_quantization.py: QAT speed and exported sizes) plus the aux net's own cost.
Nothing here is duplicated from those scripts: they are called with this report's budget."""
from __future__ import annotations

import argparse
import contextlib
import io

import torch

from hybrid_optimization import AuxiliaryNeuralNetwork, TrainingState
from hybrid_optimization.auxiliary_nn import features as state_features

from . import bench_core, bench_quantization
from .common import median_time


def optimizer_step(repeats: int, batch: int) -> list[dict]:
    """bench_core: each optimizer's step (same gradients) and train step on a ~10M-parameter MLP."""
    with contextlib.redirect_stdout(io.StringIO()):
        rows = bench_core.bench_optimizer_step(repeats=repeats, batch=batch)
    base_step, base_train = rows[0][1], rows[0][2]
    return [{"optimizer": name, "step_ms": step * 1e3, "step_vs_adamw": step / base_step,
             "train_step_ms": train * 1e3, "train_step_vs_adamw": train / base_train} for name, step, train in rows]


def qat_speed(repeats: int, batch: int, seq: int, device: str) -> dict:
    """bench_quantization: forward+backward of QAT variants vs full precision (ratios within each repeat)."""
    args = argparse.Namespace(repeats=repeats, batch=batch, seq=seq)
    result = bench_quantization.bench_speed(args, torch.device(device))
    return {"n_params": result["n_params"], "tokens": result["tokens"],
            "rows": [{"variant": label, **row} for label, row in result["rows"].items()]}


def compression(vocab: int, plan_batches: int, hutchinson: int) -> dict:
    """bench_quantization: exported file sizes at 1, 1.58, 2, 4, 8 bits and a mixed plan, vs FP32 and FP16."""
    args = argparse.Namespace(vocab=vocab, plan_batches=plan_batches, hutchinson=hutchinson)
    result = bench_quantization.bench_size(args, torch.device("cpu"))
    rows = []
    for label, r in result["rows"]:
        rows.append({"weights": label, "linear_bits_per_weight": r.linear_bits_per_weight if r.n_params_linear else None,
                     "linear_vs_fp32": r.compression_vs_fp32_linear if r.n_params_linear else None,
                     "linear_vs_fp16": 16.0 / r.linear_bits_per_weight if r.n_params_linear else None,
                     "file_mb": r.file_bytes / 1e6, "file_bits_per_weight": r.file_bits_per_weight,
                     "file_vs_fp32": r.compression_vs_fp32_file, "file_vs_fp16": r.fp16_bytes / r.file_bytes})
    return {"n_params": result["n_params"], "n_linear": result["n_linear"], "plan_counts": result["plan_counts"],
            "plan_seconds": result["plan_seconds"], "rows": rows}


def aux_net_cost(repeats: int = 200, rounds: int = 5) -> dict:
    """One prediction and one meta-learning update of the default auxiliary net (what a hybrid step adds): the
    median over `rounds` of the mean time of `repeats` back-to-back calls (microsecond-scale calls are timed in
    blocks, not one by one)."""
    aux = AuxiliaryNeuralNetwork()
    features = state_features(TrainingState(current_loss=2.5, gradient_magnitude=0.1, cluster_id=0, loss_trend=0.98,
                                            gradient_variance=0.01, step_number=100))

    def block(fn) -> float:
        def many():
            for _ in range(repeats):
                fn()
        return median_time(many, repeats=rounds, warmup=1) / repeats

    predict = block(lambda: aux.predict(features))
    update = block(lambda: aux.update_with_feedback(features, hypergradient=0.1, rho=0.5))
    return {"predict_ms": predict * 1e3, "update_ms": update * 1e3, "total_ms": (predict + update) * 1e3}
