"""Probe toward "a budget that decides" (issue 16, item 4): does tuned warmup + cosine beat tuned constant LR (the
AlgoPerf sanity check the medium report fails at 200 steps: 1.01 [1.00, 1.02]) at a given workload and budget?

    nice -n 19 python -m benchmarks.budget_probe --steps 400 --out benchmarks/results/budget-probe/quick-400

Only the two methods the check needs (AdamW constant, AdamW + 5 % warmup + cosine), each tuned on a separate seed
over the grid, then the evaluation seeds at the tuned LR: the tracks protocol (tracks.protocol) restricted to them,
so the ratio is computed exactly as the report's sanity row. Every finished run goes to runs.jsonl (an interrupted
probe resumes); probe.json keeps the sanity row, the CPU seconds the runs took, and the budget.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks import tracks


def budget(workload: str, steps: int, seeds: int, grid: tuple[float, ...], batch_size: int = 16) -> tracks.TrackBudget:
    return tracks.TrackBudget(f"budget-probe-{workload}-{steps}", workload, tuple(range(seeds)), 100, steps,
                              batch_size, max(1, steps // 20), grid, ("AdamW", tracks.REFERENCE), ())


def main(out: Path, workload: str = "quick", steps: int = 400, seeds: int = 3,
         grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2), jobs: int = 1, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    b = budget(workload, steps, seeds, grid)
    started, cpu0 = time.perf_counter(), time.process_time()
    tracks.prepare_workload(b.workload, "cpu", log)             # caches first (the teacher of the workload)
    result = tracks.protocol(b, "cpu", jobs, 1, log, journal=out / "runs.jsonl")
    sanity = next((t for t in result["targets"] if t["target"].startswith("sanity")), None)
    ext = result["analysis"]["external"]
    record = {"budget": {k: v for k, v in b.__dict__.items()}, "sanity": sanity,
              "tuned_lr": result["analysis"]["tuned_lr"],
              "final_val": {m: ext[m]["final_val"] for m in ext},
              "final_vs": {m: ext[m]["final_vs"] for m in ext},
              "runs": len(result["rows"]), "reused_runs": result["reused_runs"],
              "runs_cpu_seconds": result["run_cpu_seconds"],
              "this_invocation_wall_s": time.perf_counter() - started,
              "this_invocation_cpu_s_main_process": time.process_time() - cpu0}
    (out / "probe.json").write_text(json.dumps(record, indent=1, default=str))
    log(f"sanity (tuned cosine ÷ tuned constant, final val loss): {sanity['measured'] if sanity else '–'} → "
        f"{'decides' if sanity and sanity['met'] else 'does not decide'}; runs' CPU time "
        f"{result['run_cpu_seconds'] / 3600:.2f} h")
    return record


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Does tuned cosine beat tuned constant LR at this budget?")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--workload", default="quick", choices=("quick", "medium"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", default="1e-3,3e-3,1e-2", help="comma-separated LRs")
    parser.add_argument("--jobs", type=int, default=1)
    ns = parser.parse_args()
    main(ns.out, ns.workload, ns.steps, ns.seeds, tuple(float(x) for x in ns.grid.split(",")), ns.jobs)
