"""Core package overheads (issue 2): hybrid optimizer step vs torch AdamW, and K-means on 100,000 × 384.

    python benchmarks/bench_core.py            # full (~1-2 min on 2 cores)
    python benchmarks/bench_core.py --quick
    python benchmarks/bench_core.py --quick --threads 1 --optimizer-only    # the issue-9 target, one thread

Prints a markdown table; every number comes from this run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, median_time  # noqa: E402
from hybrid_optimization import AuxiliaryNeuralNetwork, HybridOptimizer, KMeansClustering  # noqa: E402


def model_10m(width: int = 1280, depth: int = 6) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers)


def optimizers(params):
    yield "torch AdamW (default)", torch.optim.AdamW(params(), lr=1e-3, weight_decay=1e-5)
    yield "torch AdamW (foreach)", torch.optim.AdamW(params(), lr=1e-3, weight_decay=1e-5, foreach=True)
    yield "torch AdamW (fused)", torch.optim.AdamW(params(), lr=1e-3, weight_decay=1e-5, fused=True)
    yield "Hybrid, identity (no aux, no TR)", HybridOptimizer(params(), lr=1e-3, weight_decay=1e-5, trust_region=None)
    yield "Hybrid, aux net + absolute TR", HybridOptimizer(params(), lr=1e-3, weight_decay=1e-5,
                                                           aux_net=AuxiliaryNeuralNetwork(), trust_region="absolute")
    yield "Hybrid, aux net + relative TR", HybridOptimizer(params(), lr=1e-3, weight_decay=1e-5,
                                                           aux_net=AuxiliaryNeuralNetwork(), trust_region="relative")


def bench_optimizer_step(repeats: int, batch: int) -> list[tuple[str, float, float]]:
    """Median step time of each optimizer, measured in interleaved rounds so that background load hits all alike."""
    model = model_10m()
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 1280)
    contenders = []
    for name, opt in optimizers(model.parameters):
        def train_step(opt=opt):
            opt.zero_grad(set_to_none=False)
            loss = model(x).pow(2).mean()
            loss.backward()
            return opt.step(loss=loss) if isinstance(opt, HybridOptimizer) else opt.step()

        def step_only(opt=opt):          # the same gradients, the optimizer step alone
            return opt.step(loss=1.0) if isinstance(opt, HybridOptimizer) else opt.step()

        train_step()
        contenders.append((name, step_only, train_step))
    step_times = {name: [] for name, _, _ in contenders}
    train_times = {name: [] for name, _, _ in contenders}
    for _ in range(repeats):
        for name, step_only, train_step in contenders:
            train_times[name].append(median_time(train_step, repeats=1, warmup=0))
            step_times[name].append(median_time(step_only, repeats=1, warmup=0))
    rows = [(name, statistics.median(step_times[name]), statistics.median(train_times[name]))
            for name, _, _ in contenders]
    print(f"\nOptimizer step on a {n_params / 1e6:.1f}M-parameter MLP (batch {batch}), median of {repeats} "
          "interleaved rounds:\n")
    base_step, base_train = rows[0][1], rows[0][2]
    print("| optimizer | step (ms) | × AdamW step | train step (ms) | × AdamW train step |")
    print("|---|---|---|---|---|")
    for name, step, train in rows:
        print(f"| {name} | {step * 1e3:.1f} | {step / base_step:.2f}× | {train * 1e3:.1f} | {train / base_train:.2f}× |")
    return rows


def bench_kmeans(n: int, dim: int, k: int) -> float:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    X = centres[rng.integers(0, k, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    t0 = time.perf_counter()
    KMeansClustering(n_clusters=k).fit(X)
    elapsed = time.perf_counter() - t0
    print(f"\nK-means (KMeansClustering, k={k}) on {n:,} × {dim} float32: {elapsed:.2f} s")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--optimizer-only", action="store_true", help="skip the K-means benchmark")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    print(environment())
    bench_optimizer_step(repeats=5 if args.quick else 20, batch=64)
    if not args.optimizer_only:
        bench_kmeans(100_000, 384, 8)


if __name__ == "__main__":
    main()
