"""Which trust region should `--hybrid` default to? (issue 16, "Defaults from the data")

    nice -n 19 python -m benchmarks.hybrid_default run --workload chat          # runs / resumes one workload's grid
    nice -n 19 python -m benchmarks.hybrid_default run --workload python-docs
    python -m benchmarks.hybrid_default report                                  # the ratio table, no training

The grid: the hybrid with each trust region (absolute, relative, bounded, rms — each named explicitly, so a row keeps
its meaning when the default changes) and AdamW at constant LR as the reference, at LR 1e-4, 1e-3, 1e-2 (the
100x grid), ternary QAT, seeds 0, 1, 2 (then 3, 4 if time allows), 150 steps at batch 16 (issue 16's chat
budget; batch 16 rather than the CLI's 32 halves the cost on the shared 2-core machine), one evaluation at the end.
Every run goes through the benchmark harness (harness.run: the pipeline's own set-up and training loop, as
`distillation.py` trains), on the two workloads of issue 16's robustness protocol (tracks.ROBUST_WORKLOADS), both at
the tiny preset's shapes:

- chat: chatterbot-corpus conversations, the workbench's default data (the `quick` workload);
- python-docs: the first 400 k tokens of the Python documentation pages (medium.SCALES["docs-quick"]).

Each finished run is appended to results/hybrid-default/<workload>.jsonl at once; an interrupted invocation
resumes there. The report gives, per workload and per metric (final held-out cross-entropy, final KL to the
teacher), each method's worst-LR and median-over-grid ratio to the best median run of any method (median over
seeds at each LR), with 95 % paired-bootstrap intervals over the seeds (the same seeds resampled for every method
and LR: seed s means the same initial weights and data order everywhere). It uses the seeds every method has
finished at every LR.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks import tracks
from benchmarks.harness import RunSpec
from hybrid_optimization.schema import TRUST_REGION_MODES

OUT = Path(__file__).resolve().parent / "results" / "hybrid-default"
GRID = (1e-4, 1e-3, 1e-2)
BITS = 1.58
MODES = TRUST_REGION_MODES               # every trust region the product offers (schema.py)
METHODS = {"AdamW": tracks.ADAMW,
           **{f"H-{mode}": replace(tracks.HYB, key=f"H-{mode}", label=f"--hybrid --trust_region_mode {mode}",
                                   config={"trust_region_mode": mode}) for mode in MODES}}
# workload → (tracks' workload name, steps, batch size)
WORKLOADS = {"chat": ("quick", 150, 16), "python-docs": ("docs-quick", 150, 16)}
METRICS = {"cross-entropy": "val_loss", "KL to the teacher": "kl_teacher"}


def specs(workload: str, seeds: tuple[int, ...], methods: tuple[str, ...]) -> list[RunSpec]:
    _, steps, batch = WORKLOADS[workload]
    # seeds first, so that an interrupted grid holds whole seeds of every method
    return [RunSpec("W2", METHODS[m], BITS, lr, seed, steps, batch, steps)
            for seed in seeds for m in methods for lr in GRID]


def journal(workload: str) -> Path:
    return OUT / f"{workload}.jsonl"


def run(workload: str, seeds: tuple[int, ...], methods: tuple[str, ...]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # the hybrids first within a seed (the decision is between them), AdamW (the reference) after them
    order = {m: i for i, m in enumerate((*[k for k in METHODS if k != "AdamW"], "AdamW"))}
    tracks.run_all(specs(workload, seeds, methods), WORKLOADS[workload][0], "cpu", 1, 1, print,
                   journal=journal(workload), priority=lambda s: (s.seed, order[s.method.key], s.lr))


def load_rows(workload: str) -> dict[tuple, dict]:
    """(method, lr, seed) → row of this grid's journal."""
    rows = {}
    if journal(workload).exists():
        for key, r in tracks.read_journal(journal(workload)).items():
            rows[(key[0], key[1], key[2])] = r
    return rows


def final_value(row: dict, key: str) -> float:
    v = row["evals"][-1].get(key, math.nan) if row["evals"] else math.nan
    return v if math.isfinite(v) else math.inf          # a diverged run is the worst run there is


def complete_seeds(rows: dict[tuple, dict], method: str, key: str) -> set[int]:
    """The seeds on which `method` has a finished run with the metric at every LR of the grid."""
    return {s for (m, lr, s) in rows if m == method and all(
        (method, g, s) in rows and (math.isfinite(rows[(method, g, s)]["evals"][-1].get(key, math.nan))
                                    or rows[(method, g, s)]["diverged"]) for g in GRID)}


def table(workload: str, metric: str, methods: list[str] | None = None, n_boot: int = 4000) -> list[dict]:
    """Per method: worst-LR and median-over-grid of (median over seeds) ÷ the best (method, LR) median of any
    of these methods, on the seeds all of them finished at every LR, with paired-bootstrap 95 % intervals; and the
    worst-LR value ÷ H-absolute's (the default before rms), paired likewise."""
    key = METRICS[metric]
    rows = load_rows(workload)
    seed_sets = {m: complete_seeds(rows, m, key) for m in (methods or METHODS)}
    methods = [m for m, seeds in seed_sets.items() if seeds]
    if not methods:
        return []
    seeds = sorted(set.intersection(*(seed_sets[m] for m in methods)))
    if not seeds:
        return []
    # values[m][lr_index, seed_index]
    values = {m: np.array([[final_value(rows[(m, lr, s)], key) for s in seeds] for lr in GRID]) for m in methods}

    def scores(idx) -> dict[str, tuple[float, float, float]]:
        med = {m: np.median(values[m][:, idx], axis=1) for m in methods}
        best = min(float(v.min()) for v in med.values())
        ref = float(med["H-absolute"].max()) if "H-absolute" in med else math.nan
        return {m: (float(med[m].max()) / best, float(np.median(med[m])) / best, float(med[m].max()) / ref)
                for m in methods}

    def interval(samples) -> tuple[float, float]:
        return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))

    point = scores(np.arange(len(seeds)))
    rng = np.random.default_rng(0)
    boot = [scores(rng.integers(0, len(seeds), len(seeds))) for _ in range(n_boot)]
    out = []
    for m in methods:
        per_lr = {f"{lr:g}": float(np.median(values[m][i])) for i, lr in enumerate(GRID)}
        out.append({"method": m, "seeds": seeds, "worst": point[m][0], "worst_ci": interval([b[m][0] for b in boot]),
                    "median": point[m][1], "median_ci": interval([b[m][1] for b in boot]),
                    "vs_absolute": point[m][2], "vs_absolute_ci": interval([b[m][2] for b in boot]),
                    "per_lr": per_lr})
    return out


def _lines(workload: str, metric: str, rows: list[dict]) -> list[str]:
    lines = [f"\n{workload}, final {metric} (seeds {', '.join(map(str, rows[0]['seeds']))}; ratio to the best median "
             f"run of these methods; 95 % paired bootstrap over the seeds)",
             "| method | worst LR ÷ best | median over grid ÷ best | worst ÷ H-absolute's worst | median at " +
             " / ".join(f"{lr:g}" for lr in GRID) + " |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["worst"]):
        lines.append(f"| {r['method']} | {r['worst']:.3f} [{r['worst_ci'][0]:.3f}, {r['worst_ci'][1]:.3f}] | "
                     f"{r['median']:.3f} [{r['median_ci'][0]:.3f}, {r['median_ci'][1]:.3f}] | "
                     f"{r['vs_absolute']:.3f} [{r['vs_absolute_ci'][0]:.3f}, {r['vs_absolute_ci'][1]:.3f}] | " +
                     " / ".join(f"{v:.3f}" for v in r["per_lr"].values()) + " |")
    return lines


def report(n_boot: int = 4000) -> str:
    """Per workload and metric: every method on the seeds all of them finished; then, where the candidates for the
    default (H-absolute, H-bounded) have more seeds than that, the two of them (plus any method as complete)."""
    lines = []
    for workload in WORKLOADS:
        for metric in METRICS:
            rows = table(workload, metric, n_boot=n_boot)
            if not rows:
                lines.append(f"\n{workload}, {metric}: no complete grid yet")
                continue
            lines += _lines(workload, metric, rows)
            key, data = METRICS[metric], load_rows(workload)
            pair = complete_seeds(data, "H-absolute", key) & complete_seeds(data, "H-bounded", key)
            if len(pair) > len(rows[0]["seeds"]):
                subset = [m for m in METHODS if pair <= complete_seeds(data, m, key)]
                lines += _lines(workload, metric, table(workload, metric, subset, n_boot))
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Trust-region modes of --hybrid over the 100x LR grid, two workloads")
    p.add_argument("what", choices=("run", "report"))
    p.add_argument("--workload", choices=tuple(WORKLOADS), default="chat")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    a = p.parse_args(argv)
    if a.what == "run":
        methods = tuple(a.methods.split(","))
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            p.error(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
        run(a.workload, tuple(int(s) for s in a.seeds.split(",")), methods)
    else:
        text = report()
        (OUT / "report.md").write_text("# --hybrid's default trust region: ratios over the 100x LR grid\n\n"
                                       "`python -m benchmarks.hybrid_default report`\n" + text + "\n")


if __name__ == "__main__":
    main()
