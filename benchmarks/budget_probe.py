"""Probe toward "a budget that decides" (issue 16, item 4): does tuned warmup + cosine beat tuned constant LR (the
AlgoPerf sanity check the medium report fails at 200 steps: 1.01 [1.00, 1.02]) at a given workload and budget?

    nice -n 19 python -m benchmarks.budget_probe --steps 400 --out benchmarks/results/budget-probe/quick-400
    nice -n 19 python -m benchmarks.budget_probe --workload docs-quick --steps 400 --seeds 5 \
        --grid 1e-4,3e-4,1e-3,3e-3,1e-2 --out benchmarks/results/budget-probe/docs-400

Only the two methods the check needs (AdamW constant, AdamW + 5 % warmup + cosine), each tuned on a separate seed
over the grid, then the evaluation seeds at the tuned LR: the tracks protocol (tracks.protocol) restricted to them,
so the ratio is computed exactly as the report's sanity row. The runs that decide go first (the tuning seed over
the grid, then the evaluation seeds at the tuned LRs), then the rest of the grid. Every finished run goes to
runs.jsonl (an interrupted probe resumes); probe.json keeps the sanity row, the CPU seconds the runs took, and the
budget.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import stats, tracks


def budget(workload: str, steps: int, seeds: int, grid: tuple[float, ...], batch_size: int = tracks.BATCH) -> tracks.TrackBudget:
    return tracks.TrackBudget(f"budget-probe-{workload}-{steps}", workload, tuple(range(seeds)), 100, steps,
                              batch_size, max(1, steps // 20), grid, ("AdamW", tracks.REFERENCE), ())


def sanity(rows: list[dict], b: tracks.TrackBudget) -> dict | None:
    """The sanity row from whatever finished: each method's LR tuned on the tuning seed over the whole grid, then
    tuned cosine ÷ tuned constant final validation loss over the evaluation seeds both have at their tuned LRs
    (paired bootstrap, as tracks.analyse). None until the tuning runs are complete."""
    runs = tracks.Runs(rows)
    if not all((m, float(lr), b.tuning_seed) in runs.by for m in b.methods for lr in b.grid):
        return None
    tuned = tracks.tuned_lrs(runs, b)
    seeds = [s for s in b.seeds if all((m, float(tuned[m]), s) in runs.by for m in b.methods)]
    if not seeds:
        return None
    cos, const = (runs.values(m, tuned[m], seeds, tracks.final) for m in (tracks.REFERENCE, "AdamW"))
    v = tracks.paired_bootstrap(cos, const, stats.median, b.n_boot)
    # A constant LR whose held-out loss bottomed out before half the budget and rose after has overfit: cosine's
    # decay then "wins" by overfitting less, which says nothing about the schedule as an optimizer. No decision.
    best, overfit = tracks.overfit(runs, "AdamW", tuned["AdamW"], seeds, b.steps)
    return {"target": "sanity: the tuned cosine reference beats constant LR at this budget",
            "measured": f"{tracks.fmt_ci(v, 3)} over {len(seeds)} seeds (AdamW-cos {stats.median(cos):.4f} "
                        f"at lr {tuned[tracks.REFERENCE]:g} vs AdamW {stats.median(const):.4f} at lr "
                        f"{tuned['AdamW']:g}; the tuned constant LR's held-out loss lowest at step {best:g} of "
                        f"{b.steps}" + (", then rising: the final losses measure overfitting, not the schedule"
                                        if overfit else "") + ")",
            "ratio": v, "seeds": seeds, "tuned_lr": tuned, "met": v[2] < 1, "constant_best_step": best,
            "overfit": overfit, "decides": v[2] < 1 and not overfit}


def main(out: Path, workload: str = "quick", steps: int = 400, seeds: int = 3,
         grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2), log=print, bits: float = tracks.BITS,
         decisive_only: bool = False, batch_size: int = tracks.BATCH) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    b = budget(workload, steps, seeds, grid, batch_size)
    journal = out / "runs.jsonl"
    started, cpu0 = time.perf_counter(), time.process_time()
    prepared = tracks.prepare_workload(b.workload, "cpu", log)   # once (the teacher of the workload is cached)
    info = tracks.workload_info(prepared, b)
    specs = tracks.specs_for(b, "cpu")
    if bits != tracks.BITS:      # a diagnostic probe: the same runs without ternary QAT (W1, full precision)
        specs = [replace(s, workload="W1", bits=bits) for s in specs]

    def record(rows: list[dict], complete: bool) -> dict:
        row = sanity(rows, b)
        data = {"budget": dict(b.__dict__), "bits": bits, "sanity": row, "complete_grid": complete, "runs": len(rows),
                "workload": info, "passes": b.steps * b.batch_size * info["seq_len"] / info["train_tokens"],
                "runs_cpu_seconds": float(sum(r["train_cpu_s"] for r in rows)),
                "this_invocation_wall_s": time.perf_counter() - started,
                "this_invocation_cpu_s_main_process": time.process_time() - cpu0}
        (out / "probe.json").write_text(json.dumps(data, indent=1, default=str))
        return data

    # The decision first (an interrupted probe still decides): the tuning seed over the grid, then the evaluation
    # seeds at the tuned LRs; then the rest of the grid (the robustness tables reuse those runs).
    tracks.run_prepared([s for s in specs if s.seed == b.tuning_seed], prepared, log, journal)
    tuned = tracks.tuned_lrs(tracks.Runs(list(tracks.read_journal(journal).values())), b)
    tracks.run_prepared([s for s in specs if s.seed != b.tuning_seed and s.lr == tuned[s.method.key]], prepared, log,
                        journal)
    early = record(list(tracks.read_journal(journal).values()), complete=False)
    log(f"sanity (tuned cosine ÷ tuned constant, final val loss): "
        f"{early['sanity']['measured'] if early['sanity'] else '–'}")
    if decisive_only:
        return early
    from benchmarks.robustness import priority         # the rest in the robustness protocol's order
    rows = tracks.run_prepared(sorted(specs, key=priority(b)), prepared, log, journal)
    final = record(rows, complete=True)
    log(f"the whole grid: {len(rows)} runs, {final['runs_cpu_seconds'] / 3600:.2f} CPU-h")
    return final

if __name__ == "__main__":
    import argparse
    import functools
    parser = argparse.ArgumentParser(description="Does tuned cosine beat tuned constant LR at this budget?")
    parser.add_argument("--out", required=True, type=Path)
    # quick = the chat workload; docs-quick = its python-docs twin (the robustness protocol's two workloads)
    parser.add_argument("--workload", default="quick", choices=("quick", "docs-quick", "medium"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", default="1e-3,3e-3,1e-2", help="comma-separated LRs")
    parser.add_argument("--bits", type=float, default=tracks.BITS, choices=(tracks.BITS, 32.0),
                        help="1.58: ternary QAT (the protocol's); 32: full precision (is QAT why a budget fails?)")
    # A smaller batch takes more (noisier) steps over the same tokens: the lever for a corpus too small for more passes
    parser.add_argument("--batch", type=int, default=tracks.BATCH,
                        help=f"sequences per step (default {tracks.BATCH}, the protocol's)")
    parser.add_argument("--decisive-only", action="store_true",
                        help="stop once the sanity row is decided (skip the rest of the grid)")
    ns = parser.parse_args()
    if ns.batch < 1:
        parser.error(f"--batch must be a positive number of sequences, got {ns.batch}")
    main(ns.out, ns.workload, ns.steps, ns.seeds, tuple(float(x) for x in ns.grid.split(",")),
         log=functools.partial(print, flush=True), bits=ns.bits, decisive_only=ns.decisive_only,
         batch_size=ns.batch)
