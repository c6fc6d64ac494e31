"""LR robustness on two workloads (issue 16): every method of the product's menu at every LR of the 100× grid.

    nice -n 19 python -m benchmarks.robustness --mode robust-chat    # → benchmarks/results/robust-chat/
    nice -n 19 python -m benchmarks.robustness --mode robust-docs    # → benchmarks/results/robust-docs/
    python -m benchmarks.robustness --report                         # → benchmarks/results/robustness/report.md
    python -m benchmarks.tracks_report --regenerate benchmarks/results/robustness   # the same, from the journals

    nice -n 19 python -m benchmarks.robustness --mode robust-docs-1600   # the budget that decides (see below)

The two workloads (tracks.ROBUST_WORKLOADS), both at the tiny preset's shapes, ternary QAT:
- chat: the quick workload, the chatterbot-corpus conversations the workbench trains on by default (the pipeline's
  own `load_documents(None)`, benchmarks/workload.py);
- python-docs: the pages of the Python 3.11 documentation (`--data_source python-docs`, Debian python3.11-doc),
  first 400 k tokens (medium.SCALES["docs-quick"]).
Two budgets: 400 steps at batch 16 (the first protocol, where tuned warmup + cosine does not yet beat tuned constant
LR, the AlgoPerf sanity check) and 1600 steps, where it does: python-docs at batch 16
(benchmarks/results/budget-probe/docs-1600), chat at batch 4 (budget-probe/quick-1600-b4: the chat corpus is too
small for 1600 steps at batch 16, which overfit, budget-probe/quick-1600).
The report reads the verdict and the targets at the longest budget with complete sets on both workloads, and
shows every other budget's targets beside it (`budgets_of`, `headline`).

The protocol is tracks.protocol's (same specs, same journal format, the same robustness statistics as
tracks_report.robustness), with the runs ordered by how much the decision needs them (`priority`): the grid's ends
and middle (1e-4, 1e-2, 1e-3) on seeds 0–2 first (seed by seed; the eight methods the targets need before the other
candidates of tracks.ROBUST_METHODS), then the tuning seed there, then the other two LRs, then seeds
3–4. An interrupted protocol therefore leaves complete sets of runs, and the report is written from the largest
complete set (`complete_set`): every table says which seeds and LRs it rests on and which methods it lacks.

Rows of another journal with the same specs (the budget probe's AdamW runs on the chat workload) are read too
(`ALSO_FROM`), never re-run.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks import stats, tracks
from benchmarks.methods import GUIDE_LR, product_flags
from benchmarks.tracks import ALL_TRACK, ROBUST_WORKLOADS, Runs, TrackBudget, fmt_ci, track_budget

RESULTS = Path(__file__).resolve().parent / "results"
REPORT_DIR = RESULTS / "robustness"
WORKLOAD_NAMES = {"quick": "chat (chatterbot-corpus)", "docs-quick": "python-docs"}
# Same workload, steps, batch, evaluation cadence and method definitions → the same runs (tracks._row_key).
# (Chat's 1600 steps are at batch 4, budget-probe/quick-1600-b4; the batch-16 probe, quick-1600, overfits.)
ALSO_FROM = {"robust-chat": [RESULTS / "budget-probe" / "quick-400" / "runs.jsonl"],
             "robust-chat-1600": [RESULTS / "budget-probe" / "quick-1600-b4" / "runs.jsonl"],
             "robust-docs": [RESULTS / "budget-probe" / "docs-400" / "runs.jsonl"],
             "robust-docs-1600": [RESULTS / "budget-probe" / "docs-1600" / "runs.jsonl"]}
CORE_LRS = (1e-4, 1e-2, 1e-3)             # the 100× grid's ends and middle: worst and median need these first
# The first methods of tracks.ROBUST_METHODS (AdamW, the hybrid's absolute, rms and bounded trust regions, its
# whole-update default H-rms-free, the two self-tuning anchors, Muon) are what the targets need; the other candidates
# (AdamW-cos, H-rel, the hybrid over Muon and with a schedule) follow them.
FIRST_METHODS = 8
MIN_SEEDS = 3                             # fewer complete seeds: the verdict names the leaders, decides nothing
# `--hybrid`'s trust region → the pinned method that runs it (tracks.HYB_ABS / H-rel / HYB_BOUNDED)
DEFAULT_KEY = {"absolute": "H-abs", "relative": "H-rel", "bounded": "H-bounded", "rms": "H-rms"}
SF_KEY, PRODIGY_KEY = "SF-AdamW", "Prodigy"


FREE = "-free"    # suffix of the pinned method with the LR head's hypergradient over the whole update (H-rms-free)


# `--hybrid`'s default schedule (schema.HYBRID_DEFAULT_SCHEDULE) over a pinned default → the pinned method that runs
# both (a pair not listed has no pinned method: the report shows the default as not measured).
SCHEDULED_KEY = {("H-rms-free", "cosine"): "H-cos", ("H-rms-free", "hybrid-cosine"): "H-sched-free"}


def default_words(key: str) -> str:
    """'trust region `rms`, the LR head's hypergradient over the whole update' for a default key (+ its schedule)."""
    unscheduled = {v: k for k, v in SCHEDULED_KEY.items()}.get(key, (key, "constant"))
    base = unscheduled[0].removesuffix(FREE)
    mode = {v: k for k, v in DEFAULT_KEY.items()}.get(base, base)
    how = "over the whole update" if unscheduled[0].endswith(FREE) else "through the trust-region projection"
    return f"trust region `{mode}`, the LR head's hypergradient {how}, schedule `{unscheduled[1]}`"


def hybrid_default_key() -> str:
    """The pinned method that is today's `--hybrid`: the product's default trust region, + FREE when the optimizer's
    LR head learns from the whole update by default, under its default schedule (SCHEDULED_KEY); a key with no runs
    shows in the report as not measured."""
    import inspect

    from hybrid_optimization import HybridOptimizer, HybridTrainingConfig
    from hybrid_optimization.schema import HYBRID_DEFAULT_SCHEDULE
    projected = inspect.signature(HybridOptimizer).parameters["projected_hypergradient"].default
    key = DEFAULT_KEY[HybridTrainingConfig().trust_region_mode] + ("" if projected else FREE)
    if HYBRID_DEFAULT_SCHEDULE == "constant":
        return key
    return SCHEDULED_KEY.get((key, HYBRID_DEFAULT_SCHEDULE), f"{key}+{HYBRID_DEFAULT_SCHEDULE}")


def priority(b: TrackBudget):
    """Sort key of a RunSpec: the runs the decision needs most first, seed by seed, so a cut leaves whole sets."""
    methods = list(b.methods)

    def key(spec) -> tuple:
        core = any(math.isclose(spec.lr, lr) for lr in CORE_LRS)
        late_seed = spec.seed not in (*b.seeds[:3], b.tuning_seed)
        tuning = spec.seed == b.tuning_seed
        seed_order = b.seeds.index(spec.seed) if spec.seed in b.seeds else -1
        method = methods.index(spec.method.key) if spec.method.key in methods else len(methods)
        return (late_seed, not core, tuning, method >= FIRST_METHODS, seed_order, method, spec.lr)
    return key


# -- the statistics: worst and median over the grid ÷ the best tuned run of any method ----------------------------
def _finite_or_inf(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x), x, np.inf)          # a diverged run (NaN / inf loss) is the worst possible


def _robustness_scores(cube: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """cube [methods, LRs, seeds] of final losses → (worst ÷ best, median ÷ best, best) where per-LR values are
    medians over seeds and best = the lowest of them over every method and LR (the best tuned run of any method)."""
    per_lr = np.median(cube, axis=2)
    best = float(np.min(per_lr))
    return per_lr.max(axis=1) / best, np.median(per_lr, axis=1) / best, best


def robustness(rows: list[dict], b: TrackBudget, n_boot: int = 4000, key: str = "val_loss") -> dict | None:
    """For every grid method: the worst and the median over the LR grid of the final `key` (median over the
    evaluation seeds at each LR), divided by the best tuned run of any method; 95 % paired bootstrap intervals
    (seeds resampled with the same draws for every method and LR, the best recomputed on each draw), and each
    method's worst-case ratio ÷ Schedule-Free's and ÷ Prodigy's (paired the same way). None when a grid method
    lacks a run or (for `key` other than val_loss) a run lacks the metric."""
    runs, seeds = Runs(rows), list(b.seeds)
    methods = list(b.methods)
    try:
        cube = np.stack([np.vstack([runs.values(m, lr, seeds, lambda r: tracks.final(r, key)) for lr in b.grid])
                         for m in methods])
    except KeyError:
        return None
    if key != "val_loss" and np.isnan(cube).any():      # some runs did not record this metric
        return None
    cube = _finite_or_inf(cube)
    worst, median, best = _robustness_scores(cube)
    per_lr = np.median(cube, axis=2)
    at = np.unravel_index(int(np.argmin(per_lr)), per_lr.shape)
    idx = np.random.default_rng(0).integers(0, len(seeds), size=(n_boot, len(seeds)))
    boot_w, boot_m = zip(*(_robustness_scores(cube[..., i])[:2] for i in idx))
    boot_w, boot_m = np.array(boot_w), np.array(boot_m)            # [n_boot, methods]
    # each method's tuned loss (its best LR of the grid, median over seeds) on the same draws
    tuned, boot_t = per_lr_min(cube), np.array([per_lr_min(cube[..., i]) for i in idx])

    def interval(samples: np.ndarray) -> tuple[float, float]:
        return (float(np.percentile(samples, 2.5, method="lower")),
                float(np.percentile(samples, 97.5, method="higher")))
    out = {"best": best, "best_method": methods[at[0]], "best_lr": b.grid[at[1]], "key": key, "methods": {}}
    anchors = [m for m in ("SF-AdamW", "Prodigy") if m in methods]
    for i, m in enumerate(methods):
        row = {"worst": (float(worst[i]), *interval(boot_w[:, i])),
               "median": (float(median[i]), *interval(boot_m[:, i])),
               "range": (float(per_lr[i].min()), float(per_lr[i].max())),
               "worst_lr": b.grid[int(np.argmax(per_lr[i]))],
               "per_lr": {f"{lr:g}": float(v) for lr, v in zip(b.grid, per_lr[i])}, "vs": {}}
        for ref in anchors:
            j = methods.index(ref)
            with np.errstate(invalid="ignore", divide="ignore"):
                row["vs"][ref] = (float(worst[i] / worst[j]), *interval(boot_w[:, i] / boot_w[:, j]))
        out["methods"][m] = row
    # The leader and its runner-up, paired on the same draws: a leader whose interval against the runner-up holds 1
    # is level with it, and the verdict says "X or Y" rather than crown a point estimate.
    for which, point, draws in (("unknown", worst, boot_w), ("tuned", tuned, boot_t)):
        if len(methods) < 2:
            break
        top, nxt = (int(i) for i in np.argsort(point, kind="stable")[:2])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"leader_{which}"] = {"method": methods[top], "runner_up": methods[nxt],
                                      "ratio": (float(point[top] / point[nxt]),
                                                *interval(draws[:, top] / draws[:, nxt]))}
    return out


def per_lr_min(cube: np.ndarray) -> np.ndarray:
    """cube [methods, LRs, seeds] → each method's loss at its best LR (median over seeds at each LR)."""
    return np.median(cube, axis=2).min(axis=1)


def robustness_table(r: dict, b: TrackBudget, what: str) -> list[str]:
    anchors = [m for m in ("SF-AdamW", "Prodigy") if m in r["methods"]]
    ranked = sorted(r["methods"], key=lambda m: r["methods"][m]["worst"][0])
    lines = [f"Best tuned run of any method ({what}, median over {len(b.seeds)} seeds): **{r['best_method']}** at lr "
             f"{r['best_lr']:g}, {r['best']:.4f}. Each method at every LR of the {b.grid[-1] / b.grid[0]:.0f}× grid "
             f"(nothing tuned), divided by it; lower is better, 1.00 = as good as the best tuned run.", "",
             "| method | worst LR of the grid ÷ best tuned [95 % CI] | median over the grid ÷ best tuned [95 % CI] | "
             "range over the grid | worst at lr |"
             + "".join(f" worst-case ratio ÷ {ref}'s [95 % CI] |" for ref in anchors),
             "|---|---|---|---|---|" + "---|" * len(anchors)]
    for m in ranked:
        v = r["methods"][m]
        lines.append(f"| **{m}** | {fmt_ci(v['worst'], 3)} | {fmt_ci(v['median'], 3)} | {v['range'][0]:.3f} … {v['range'][1]:.3f} | {v['worst_lr']:g} |"
                     + "".join(f" {fmt_ci(v['vs'][ref], 3)} |" for ref in anchors))
    return lines


# -- which runs a partial protocol has -----------------------------------------------------------------------------
def _complete(runs: Runs, methods, grid, seeds) -> bool:
    return all((m, float(lr), int(s)) in runs.by for m in methods for lr in grid for s in seeds)


def grids(b: TrackBudget) -> list[tuple[float, ...]]:
    core = tuple(lr for lr in b.grid if any(math.isclose(lr, c) for c in CORE_LRS))
    return [b.grid] + ([core] if core != b.grid else [])


def complete_set(runs: Runs, b: TrackBudget, methods=None, tuning: bool = False):
    """(methods, grid, seeds) of the largest complete set of runs: as many of the methods as the targets need
    (FIRST_METHODS; a table of one method says nothing), then at least 3 seeds if there are, then more methods,
    then the whole grid over its ends and middle, then more seeds. None when nothing is complete. With `methods`
    fixed, only those (all of them) count."""
    best, best_score = None, None
    for grid in grids(b):
        for k in range(len(b.seeds), 0, -1):
            seeds = b.seeds[:k] + ((b.tuning_seed,) if tuning else ())
            candidates = [m for m in (methods or b.methods) if _complete(runs, [m], grid, seeds)]
            if methods is not None and len(candidates) < len(methods):
                continue
            if not candidates:
                continue
            score = (min(len(candidates), FIRST_METHODS), min(k, 3), len(candidates), len(grid), k)
            if best_score is None or score > best_score:
                best, best_score = (tuple(candidates), grid, b.seeds[:k]), score
    return best


def sub_budget(b: TrackBudget, methods, grid, seeds) -> TrackBudget:
    return replace(b, methods=tuple(methods), grid=tuple(grid), seeds=tuple(seeds), ablations=())


# -- analysis of one workload ------------------------------------------------------------------------------------
def _tuned(runs: Runs, b: TrackBudget, m: str) -> float:
    return min(b.grid, key=lambda lr: (tracks.best_val(runs.get(m, lr, b.tuning_seed)), lr))


def tuned_ratio(runs: Runs, b: TrackBudget, a: str, ref: str) -> dict | None:
    """Final validation loss of `a` at its tuned LR ÷ `ref` at its own, median over the evaluation seeds both ran
    at their tuned LRs, paired bootstrap. Each LR is tuned on the tuning seed over the whole grid, or over its ends
    and middle while the rest is missing (budget_probe runs exactly these first), or over any ≥ 3 LRs of it both
    were tuned on (a budget probe's narrower grid). None without those runs."""
    # the whole grid, its ends and middle, or (a budget probe's) any ≥ 3 LRs both tuned on — the widest first
    both = tuple(lr for lr in b.grid if _complete(runs, [a, ref], [lr], [b.tuning_seed]))
    for grid in (*grids(b), *([both] if len(both) >= 3 else [])):
        if _complete(runs, [a, ref], grid, [b.tuning_seed]):
            break
    else:
        return None
    sb = sub_budget(b, [a, ref], grid, b.seeds)
    lr_a, lr_r = _tuned(runs, sb, a), _tuned(runs, sb, ref)
    seeds = [s for s in b.seeds if (a, float(lr_a), s) in runs.by and (ref, float(lr_r), s) in runs.by]
    if not seeds:
        return None
    fa = runs.values(a, lr_a, seeds, tracks.final)
    fr = runs.values(ref, lr_r, seeds, tracks.final)
    v = tracks.paired_bootstrap(fa, fr, stats.median, b.n_boot)
    # where `ref`'s held-out loss bottomed out (budget_probe.sanity: before half the budget = overfit since)
    best, overfit = tracks.overfit(runs, ref, lr_r, seeds, b.steps)
    return {"ratio": v, "lr": lr_a, "ref_lr": lr_r, "final": float(np.median(fa)), "ref_final": float(np.median(fr)),
            "grid": list(grid), "seeds": seeds, "ref_best_step": best, "ref_overfit": overfit}


def cost_ratio(rows: list[dict], a: str, ref: str = "AdamW", n_boot: int = 4000) -> dict | None:
    """CPU ms per step of `a` ÷ `ref` over the (LR, seed) pairs both ran: ratio of medians, paired bootstrap."""
    by = {(r["method"], float(r["lr"]), int(r["seed"])): r["cpu_ms_per_step"] for r in rows}
    pairs = [(by[(a, lr, s)], by[(ref, lr, s)]) for (m, lr, s) in by if m == a and (ref, lr, s) in by]
    if len(pairs) < 2:
        return None
    x, y = np.array(pairs).T
    return {"ratio": tracks.paired_bootstrap(x, y, stats.median, n_boot), "runs": len(pairs),
            "ms": float(np.median(x)), "ref_ms": float(np.median(y))}


def measure_cost(mode: str, pairs: int = 6, steps: int = 200, log=print, results: Path = RESULTS) -> dict:
    """The cost row, measured as the target says — the same run: `--hybrid`'s default and AdamW alternate (A, B, A,
    B, …) in one process on the prepared workload, `pairs` runs of `steps` steps each at LR 1e-3 (seed = the pair's
    index), one torch thread. The protocol's journal rows also carry a CPU time per step, but its runs are hours
    apart on a shared machine (a run started beside the test suite costs ~40 % more CPU per step), so their ratio
    measures the machine's load as much as the method. Writes results/MODE/cost.json, which the report prefers."""
    from hybrid_optimization.distill.teacher import cache_lock
    target = results / mode / "cost.json"
    # Two cost measurements at once would each slow the other (their ratio would measure the contention) and the
    # later would overwrite the earlier's file: a second one waits for the first (its lock, cost.json.lock), and
    # says so.
    with cache_lock(target, f"the cost row of {mode}", log):
        return _measure_cost(mode, pairs, steps, log, target)


def _measure_cost(mode: str, pairs: int, steps: int, log, target: Path) -> dict:
    import os

    import torch

    from benchmarks.harness import RunSpec
    b = track_budget(mode)
    prepared = tracks.prepare_workload(b.workload, "cpu", log)
    default, threads = hybrid_default_key(), torch.get_num_threads()
    torch.set_num_threads(1)
    measured: list[list[float]] = []
    load_before = os.getloadavg()[0]
    try:
        for i in range(pairs):
            ms = []
            for key in (default, "AdamW") if i % 2 == 0 else ("AdamW", default):     # alternate which goes first
                spec = RunSpec("W2", ALL_TRACK[key], tracks.BITS, 1e-3, i, steps, b.batch_size, steps, "cpu")
                result = tracks._train(prepared, spec)
                ms.append(1e3 * (result.train_cpu_s - result.plan_cpu_s) / max(len(result.losses), 1))
            measured.append(ms if i % 2 == 0 else ms[::-1])
            log(f"  pair {i + 1}/{pairs}: {default} {measured[-1][0]:.1f} vs AdamW {measured[-1][1]:.1f} CPU ms/step")
    finally:
        torch.set_num_threads(threads)
    out = {"method": default, "ref": "AdamW", "steps": steps, "lr": 1e-3, "batch_size": b.batch_size,
           "pairs": measured, "loadavg_1min": [load_before, os.getloadavg()[0]]}
    from hybrid_optimization.distill.export import atomic_file
    with atomic_file(target) as tmp:         # a kill mid-write leaves the previous cost.json, never a torn one
        tmp.write_text(json.dumps(out, indent=1))
    return out


def cost_from_file(path: Path, default: str, n_boot: int = 4000) -> dict | None:
    """cost.json (measure_cost) → the cost row, when it measured today's default."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("method") != default or len(data.get("pairs", [])) < 2:
        return None
    x, y = np.array(data["pairs"], dtype=float).T
    return {"ratio": tracks.paired_bootstrap(x, y, stats.median, n_boot), "runs": len(x),
            "ms": float(np.median(x)), "ref_ms": float(np.median(y)), "interleaved": True, "steps": data["steps"]}


def read_rows(mode: str, folder: Path | None = None) -> list[dict]:
    folder = folder or RESULTS / mode
    done = {}
    for extra in ALSO_FROM.get(mode, []):
        done.update(tracks.read_journal(extra))
    done.update(tracks.read_journal(folder / "runs.jsonl"))
    b = track_budget(mode)
    wanted = {tracks._row_key(s.method.key, s.lr, s.seed, s.steps) for s in tracks.specs_for(b, "cpu")}
    return [row for key, row in done.items() if key in wanted]


def analyse_workload(mode: str, rows: list[dict], n_boot: int = 4000) -> dict:
    b = track_budget(mode)
    b.n_boot = n_boot
    runs = Runs(rows)
    out = {"mode": mode, "name": WORKLOAD_NAMES[b.workload] + tracks.batch_suffix(b.batch_size),
           "runs": len(rows),
           "cpu_seconds": float(sum(r["train_cpu_s"] for r in rows)), "budget": b.__dict__}
    out["default_key"] = default = hybrid_default_key()
    out["sanity"] = tuned_ratio(runs, b, "AdamW-cos", "AdamW")
    out["external_vs_muon"] = tuned_ratio(runs, b, default, "Muon")
    out["cost"] = cost_ratio(rows, default, "AdamW", n_boot)
    found = complete_set(runs, b)
    if found is None:
        return {**out, "complete": None}
    methods, grid, seeds = found
    sb = sub_budget(b, methods, grid, seeds)
    out["complete"] = {"methods": list(methods), "grid": list(grid), "seeds": list(seeds),
                       "missing": [m for m in b.methods if m not in methods]}
    out["robustness"] = {key: robustness(rows, sb, n_boot, key) for key in ("val_loss", "kl_teacher")}
    out["mean_multiplier"] = {m: {f"{lr:g}": float(np.median([runs.get(m, lr, s)["mean_multiplier"] for s in seeds]))
                                  for lr in grid} for m in methods if m.startswith("H")}
    return out


# -- targets of issue 16 (bars exactly as filed; never loosened) -----------------------------------------------------
TARGETS = (
    ("`--hybrid` default: worst LR of the 100× grid ÷ best tuned run of any method", "≤ 1.03×"),
    ("`--hybrid` default: median over the grid ÷ best tuned run of any method", "≤ 1.01×"),
    ("worst-case ratio of `--hybrid` ÷ that of Schedule-Free, and ÷ that of Prodigy", "≤ 0.85×, interval below 1"),
    ("external tuning: `--hybrid` tuned ÷ Muon tuned, final validation loss", "≤ 1.00×"),
    ("sanity: tuned cosine beats tuned constant LR", "interval below 1"),
    ("cost per step ÷ AdamW (CPU, same run)", "≤ 1.05×"),
)


def _full_grid(w: dict) -> bool:
    c = w.get("complete") or {}
    return len(c.get("grid", ())) == len(w["budget"]["grid"])


def target_cells(w: dict) -> list[tuple[str, bool | None]]:
    """(measured text, met) per target for one workload; met None = not measured."""
    ce = (w.get("robustness") or {}).get("val_loss")
    d = w.get("default_key")
    cells = []
    row = ce["methods"].get(d) if ce else None
    c = w.get("complete") or {}
    caveats = [] if not c else ([] if _full_grid(w) else ["grid 1e-4, 1e-3, 1e-2 only"]) + (
        [f"{len(c['seeds'])} seed{'s' if len(c['seeds']) > 1 else ''}"] if len(c.get("seeds", ())) < 5 else []) + (
        [f"best of {len(c['methods'])} methods only: {', '.join(c['missing'])} not complete"] if c.get("missing") else [])
    note = f" ({'; '.join(caveats)})" if caveats else ""
    if row:
        cells.append((f"{d} {fmt_ci(row['worst'], 3)}{note}", row["worst"][0] <= 1.03))
        cells.append((f"{d} {fmt_ci(row['median'], 3)}{note}", row["median"][0] <= 1.01))
        vs = row["vs"]
        if SF_KEY in vs and PRODIGY_KEY in vs:
            met = all(vs[k][0] <= 0.85 and vs[k][2] < 1 for k in (SF_KEY, PRODIGY_KEY))
            cells.append((f"÷ SF {fmt_ci(vs[SF_KEY], 3)}; ÷ Prodigy {fmt_ci(vs[PRODIGY_KEY], 3)}", met))
        else:
            cells.append(("not measured (" + ", ".join(k for k in (SF_KEY, PRODIGY_KEY) if k not in vs)
                          + " lacks a complete set)", None))
    else:
        cells += [(f"not measured ({d} lacks a complete set of runs)", None)] * 3
    e = w.get("external_vs_muon")
    cells.append((f"{fmt_ci(e['ratio'], 3)} ({d} at lr {e['lr']:g} vs Muon at {e['ref_lr']:g}; "
                  f"{len(e['seeds'])} seeds)", e["ratio"][0] <= 1.0) if e else
                 ("not measured (no tuning-seed runs for both)", None))
    s = w.get("sanity")
    overfit = bool(s and s.get("ref_overfit"))
    cells.append((f"{fmt_ci(s['ratio'], 3)} (AdamW-cos {s['final']:.4f} at lr {s['lr']:g} vs AdamW "
                   f"{s['ref_final']:.4f} at lr {s['ref_lr']:g}; {len(s['seeds'])} seeds, grid of "
                   f"{len(s['grid'])}" + ("; AdamW's held-out loss lowest at step "
                                          f"{s['ref_best_step']:g} of {w['budget']['steps']}, then rising: "
                                          "overfitting, not a decision" if overfit else "") + ")",
                   s["ratio"][2] < 1 and not overfit) if s else ("not measured", None))
    cost = w.get("cost")
    how = (f"{cost['runs']} pairs of {cost['steps']}-step runs alternating in one process (`--cost`)"
           if cost and cost.get("interleaved") else
           f"{cost['runs']} paired runs of the protocol, hours apart on a shared, loaded machine" if cost else "")
    cells.append((f"{fmt_ci(cost['ratio'], 3)} ({cost['ms']:.0f} vs {cost['ref_ms']:.0f} CPU ms per step, {how})",
                  cost["ratio"][0] <= 1.05) if cost else ("not measured", None))
    return cells


def targets(workloads: list[dict]) -> list[dict]:
    """One row per target: the measurement on each workload; met only when met on every workload, "not measured"
    when any workload lacks it and none fails it."""
    per = [target_cells(w) for w in workloads]
    rows = []
    for i, (target, bar) in enumerate(TARGETS):
        cells = [p[i] for p in per]
        mets = [c[1] for c in cells]
        met = False if False in mets else (None if None in mets else True)
        rows.append({"target": target, "bar": bar, "measured": {w["name"]: c[0] for w, c in zip(workloads, cells)},
                     "met": met})
    return rows


# -- the report ------------------------------------------------------------------------------------------------------
def _best_by(w: dict, which: str, key: str = "val_loss") -> str | None:
    r = (w.get("robustness") or {}).get(key)
    if not r:
        return None
    if which == "tuned":
        return r["best_method"]
    return min(r["methods"], key=lambda m: r["methods"][m]["worst"][0])


def _leader(w: dict, which: str, key: str = "val_loss") -> dict | None:
    return ((w.get("robustness") or {}).get(key) or {}).get(f"leader_{which}")


def _level_leaders(w: dict, which: str, key: str = "val_loss") -> list[str]:
    """[leader] or, when its paired interval against the runner-up holds 1, [leader, runner-up]."""
    lead = _leader(w, which, key)
    if lead is None:                        # a report without the paired leader rows: the point estimate alone
        return [_best_by(w, which, key)]
    return [lead["method"]] + ([lead["runner_up"]] if lead["ratio"][2] >= 1 else [])


# The verdict's two metrics: the held-out cross-entropy decides "which optimizer"; the KL to the teacher (how close
# the student gets to the model it distils) is said beside it, because the two can disagree (issue 16).
VERDICT_WORDS = {
    "val_loss": (("unknown", "When you do not know the learning rate"), ("tuned", "With a tuned learning rate")),
    "kl_teacher": (("unknown", "Closest to the teacher when you do not know the learning rate"),
                   ("tuned", "Closest to the teacher with a tuned learning rate")),
}


def _advice(have: list[dict], key: str) -> list[str]:
    """One sentence per situation (LR unknown, LR tuned) by one metric: the method that leads on every workload,
    "X or Y" when a paired interval cannot tell the leader from its runner-up, or "no single method"."""
    parts = []
    metric = "loss" if key == "val_loss" else "KL to the teacher"
    for which, words in VERDICT_WORDS[key]:
        what = (f"the smallest worst-case {metric} over the 100× grid" if which == "unknown" else
                f"the lowest {metric} at its best LR")
        # per workload: the leader, and its runner-up too when the paired interval between them holds 1
        level = {w["name"]: _level_leaders(w, which, key) for w in have}
        common = [m for m in level[have[0]["name"]] if all(m in ms for ms in level.values())]
        ties = [f"{n}: {' ÷ '.join(ms)} {fmt_ci(_leader(w, which, key)['ratio'], 3)}"
                for (n, ms), w in zip(level.items(), have) if len(ms) > 1]
        # (the page quotes the sentence up to its first full stop: the numbers go in the next sentence)
        paired = f" Level (paired 95 % interval holding 1): {'; '.join(ties)}." if ties else ""
        if len(common) == 1:
            m = common[0]
            parts.append(f"**{words}: {m}** ({ALL_TRACK[m].label}) — {what} on both workloads"
                         + (", level with its runner-up on " + ", ".join(n for n, ms in level.items() if len(ms) > 1)
                            if ties else "") + "." + paired)
        elif common:
            parts.append(f"**{words}: {' or '.join(common)}** — not told apart, {what} on both workloads." + paired)
        else:
            parts.append(f"**{words}: no single method on both workloads** — "
                         + "; ".join(f"{n}: {' or '.join(ms)}" for n, ms in level.items()) + ".")
    return parts


def verdict(workloads: list[dict]) -> str:
    """Which optimizer when the LR is unknown, which when it is tuned: only what every workload supports."""
    def compared(w: dict) -> int:
        return len(((w.get("robustness") or {}).get("val_loss") or {}).get("methods", ()))
    have = [w for w in workloads if compared(w) >= 2]
    if len(have) < len(workloads):
        lacking = ", ".join(f"{w['name']} ({compared(w)} method(s) complete)" for w in workloads if w not in have)
        return f"No verdict: no comparison of methods yet on {lacking}."
    parts = []
    seeds = min(len(w["complete"]["seeds"]) for w in have)
    if seeds < MIN_SEEDS:        # a point estimate from one or two seeds is no basis for advice
        parts.append(f"**Not decided**: the complete runs have only {seeds} seed{'s' if seeds > 1 else ''} per "
                     f"method and LR (a decision needs ≥ {MIN_SEEDS}; issue 16 asks 5). Leading so far — LR unknown: "
                     + "; ".join(f"{w['name']} {_best_by(w, 'unknown')}" for w in have) + "; LR tuned: "
                     + "; ".join(f"{w['name']} {_best_by(w, 'tuned')}" for w in have) + ".")
    else:
        parts += _advice(have, "val_loss")
        if all((w.get("robustness") or {}).get("kl_teacher") for w in have):
            parts += _advice(have, "kl_teacher")
    for w in have:
        said = []
        for key, what in (("val_loss", "worst LR ÷ best tuned"), ("kl_teacher", "by KL to the teacher")):
            r = w["robustness"].get(key)
            if not r:
                continue
            ranked = sorted(r["methods"], key=lambda m: r["methods"][m]["worst"][0])
            top = ranked[0]
            vs = ""
            if len(ranked) > 1:
                a, b_ = r["methods"][top]["worst"], r["methods"][ranked[1]]["worst"]
                vs = f", then {ranked[1]} {fmt_ci(b_, 3)}" + (" (the intervals overlap)" if b_[1] <= a[2] else "")
            said.append(f"{what} — {top} {fmt_ci(r['methods'][top]['worst'], 3)}{vs}; best tuned run "
                        f"{r['best_method']} at lr {r['best_lr']:g} ({r['best']:.4f})")
        parts.append(f"{w['name']}: " + "; ".join(said) + ".")
    return " ".join(parts)


def robustness_md(w: dict, steps: int) -> list[str]:
    c = w.get("complete")
    if not c:
        return [f"## {w['name']}, {steps} steps", "", f"No complete set of runs yet ({w['runs']} runs).", ""]
    b = sub_budget(TrackBudget(**{k: tuple(v) if isinstance(v, list) else v for k, v in w["budget"].items()}),
                   c["methods"], c["grid"], c["seeds"])
    lines = [f"## {w['name']}, {steps} steps", "",
             f"{w['runs']} runs ({w['cpu_seconds'] / 3600:.2f} CPU-h of training). This section rests on the "
             f"complete set: seeds {c['seeds']}, LRs {', '.join(f'{x:g}' for x in c['grid'])}"
             + (f"; **not yet run to completion: {', '.join(c['missing'])}**" if c["missing"] else "") + ".", ""]
    lines += ["By the held-out cross-entropy (final validation loss):", "",
              *robustness_table(w["robustness"]["val_loss"], b, "cross-entropy"), ""]
    kl = w["robustness"].get("kl_teacher")
    if kl:
        lines += ["By the KL to the teacher on the same held-out windows:", "",
                  *robustness_table(kl, b, "KL to the teacher"), ""]
    t = w.get("teacher_val_loss")
    lines += ["Reference: the teacher's own held-out cross-entropy on the same windows: "
              + (f"**{t:.4f}**." if t is not None else "not measured (the teacher logits cache has no val_ce).")
              , ""]
    head = " | ".join(f"lr {lr:g}" for lr in c["grid"])
    lines += ["Median final validation loss (cross-entropy) at each LR:", "", f"| method | {head} |",
              "|---|" + "---|" * len(c["grid"])]
    for m, v in w["robustness"]["val_loss"]["methods"].items():
        lines.append(f"| **{m}** | " + " | ".join(f"{x:.4f}" for x in v["per_lr"].values()) + " |")
    if w.get("mean_multiplier"):
        lines += ["", "The hybrid's learned LR multiplier (mean over steps, median over seeds) at each LR:", "",
                  f"| method | {head} |", "|---|" + "---|" * len(c["grid"])]
        for m, v in w["mean_multiplier"].items():
            lines.append(f"| **{m}** | " + " | ".join(f"×{x:.2f}" for x in v.values()) + " |")
    return lines + [""]


def probes_md(probes: list[dict]) -> list[str]:
    """The report's budget paragraph: whether a probed budget decides, then one line per probe."""
    if not probes:
        return []
    decided = [p for p in probes if (p.get("sanity") or {}).get("decides", (p.get("sanity") or {}).get("met"))]
    lines = ["**A budget that decides** (tuned warmup + cosine ÷ tuned constant LR, final validation loss, "
             "interval below 1; `benchmarks/budget_probe.py`, each folder's NOTE.md): "
             + (f"found at {', '.join(p['name'] for p in decided)}." if decided else
                f"none of the {len(probes)} probed budgets passes, in "
                f"{sum(p.get('runs_cpu_seconds', 0) for p in probes) / 3600:.2f} CPU-h of probe runs (issue 16 "
                "allows 8 before the GPU `--full` mode must decide)."), ""]
    for p in probes:
        s = p.get("sanity") or {}
        passes = f" ({p['passes']:.1f} passes over the training tokens)" if p.get("passes") else ""
        lines.append(f"- {p['name']}{passes} (`{p['command']}`): {s.get('measured', 'not decided yet')}; "
                     f"{p.get('runs')} runs, {p.get('runs_cpu_seconds', 0) / 3600:.2f} CPU-h.")
    return lines + [""]


def why_not_deciding(workloads: list[dict]) -> str | None:
    """None when this budget decides (both workloads, tuned cosine beats tuned constant on each without the
    constant LR overfitting); else why not, in words."""
    if len(workloads) < len({w for w, *_ in ROBUST_WORKLOADS.values()}):
        return "the protocol has runs here on " + ", ".join(w["name"] for w in workloads) + " only."
    reasons = []
    for w in workloads:
        s = w.get("sanity") or {}
        if s.get("ratio") is None:
            reasons.append(f"the sanity row is not measured yet on {w['name']}")
        elif s.get("ref_overfit"):
            reasons.append(f"the constant LR overfits on {w['name']}")
        elif s["ratio"][2] >= 1:
            reasons.append(f"tuned cosine does not beat tuned constant LR on {w['name']}")
    return "; ".join(reasons) + " (the sanity row)." if reasons else None


def targets_md(steps: int, workloads: list[dict]) -> list[str]:
    lines = [f"## Targets at {steps} steps (issue 16; ternary QAT, paired 95 % intervals)", ""]
    why = why_not_deciding(workloads)
    if why:
        lines += [f"Not a budget that decides: {why}", ""]
    lines += ["| target (each on both workloads) | bar | " + " | ".join(w["name"] for w in workloads) + " | met |",
              "|---|---|" + "---|" * len(workloads) + "---|"]
    both = len(workloads) == len({w for w, *_ in ROBUST_WORKLOADS.values()})
    for t in targets(workloads):
        met = {True: "**yes**", False: "**no**", None: "not measured"}[t["met"]]
        met = met if both or t["met"] is None else f"{met} on {workloads[0]['name']} only"
        lines.append(f"| {t['target']} | {t['bar']} | " + " | ".join(t["measured"][w["name"]] for w in workloads)
                     + f" | {met} |")
    return lines + [""]


def render(budgets: list[tuple[int, list[dict]]], probes: list[dict], status: str | None) -> str:
    """budgets: [(steps, workloads)], the one the verdict is read at first."""
    steps, workloads = budgets[0]
    d = workloads[0].get("default_key") or hybrid_default_key()
    lines = ["# LR robustness on two workloads (issue 16)", ""]
    if status:
        lines += [f"> **{status}**", ""]
    lines += ["## Verdict", "", verdict(workloads), "",
              f"Read at {steps} steps, the longest budget with complete sets of runs on both workloads. `--hybrid` "
              f"today = **{d}** ({default_words(d)}).", ""]
    for st, ws in budgets:
        lines += targets_md(st, ws)
    lines += ["A target is **yes** only when met on both workloads; a bar is never loosened. Issue 16 asks "
              "≥ 5 seeds: a table resting on fewer says so above it.", ""]
    lines += probes_md(probes)
    for st, ws in budgets:
        for w in ws:
            lines += robustness_md(w, st)
    lines += ["## Setup", "",
              "- Both workloads: the tiny preset's shapes (student d_model 256, 1 block, d_ff 512; teacher hidden 128,"
              " 2 layers), 64-token windows, 64 fixed held-out windows per evaluation, ternary (1.58-bit) QAT, "
              " or ".join(f"{st} steps (an evaluation every {st // 20}; batch " + ", ".join(
                  f"{track_budget(w['mode']).batch_size} on {WORKLOAD_NAMES[track_budget(w['mode']).workload]}"
                  for w in ws) + ")" for st, ws in budgets)
              + "; LR grid 1e-4, 3e-4, 1e-3, 3e-3, 1e-2; tuning seed 100, evaluation seeds 0–4. Chat = "
              "chatterbot-corpus (the workbench's default data); python-docs = the first 400 k tokens of the Python "
              "3.11 documentation pages.",
              "- Methods, all built by `hybrid_optimization.optimizers.build_optimizer` (`benchmarks/methods.py`): "
              + "; ".join(f"{k} = {ALL_TRACK[k].label}" for k in track_budget('robust-chat').methods) + ".",
              "- Best tuned run of any method = the lowest median-over-seeds final loss of any method at any grid LR "
              "(tuned on the evaluation seeds: an optimistic reference, which makes every ratio conservative).",
              "- Wall and CPU times were measured on a 2-core machine shared with other jobs (`nice -n 19`): "
              "pessimistic.", ""]
    lines += product_commands_md(track_budget("robust-chat").methods)
    return "\n".join(lines) + "\n"


def product_commands_md(keys) -> list[str]:
    """Every method as a user runs it: the `distillation.py` flags that build the optimizer and schedule the
    benchmark built (methods.product_flags; tests/test_tracks_smoke.py checks the two build the same)."""
    lines = ["## Run any method yourself", "",
             "Each method is a `distillation.py` command: these flags build the optimizer and LR schedule the "
             "benchmark ran (shown at LR 1e-3; the grid changes `--lr`), on top of `--ternary --qat --max_steps N "
             "--batch_size B` and your data (`--data FILE`; the chat workload is the default data). Fields under "
             "`--config` go in a JSON file passed as `--config FILE.json`.", "",
             "| method | flags | `--config FILE.json` |", "|---|---|---|"]
    for key in keys:
        flags, config = product_flags(ALL_TRACK[key], GUIDE_LR)
        lines.append(f"| {key} | `{' '.join(flags)}` | " + (f"`{json.dumps(config)}`" if config else "") + " |")
    return lines + [""]


def figures_html(workloads: list[dict]) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    titles = [f"{w['name']}: final {what} against LR" for w in workloads for what in ("cross-entropy", "KL to teacher")]
    fig = make_subplots(rows=len(workloads), cols=2, subplot_titles=titles)
    for i, w in enumerate(workloads, start=1):
        for j, key in enumerate(("val_loss", "kl_teacher"), start=1):
            r = (w.get("robustness") or {}).get(key)
            if not r:
                continue
            for m, v in r["methods"].items():
                xs = [float(x) for x in v["per_lr"]]
                ys = [y if math.isfinite(y) else None for y in v["per_lr"].values()]
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=m, legendgroup=m,
                                         showlegend=(i == 1 and j == 1)), row=i, col=j)
            if key == "val_loss" and w.get("teacher_val_loss") is not None:
                fig.add_hline(y=w["teacher_val_loss"], line_dash="dot", annotation_text="teacher", row=i, col=j)
            fig.update_xaxes(type="log", title_text="base LR", row=i, col=j)
    fig.update_layout(height=420 * len(workloads), width=1300, title="Final loss against LR (median over seeds)")
    return fig.to_html(include_plotlyjs="cdn", full_html=True)


PROBE_WORKLOADS = {"quick": "chat", "docs-quick": "python-docs", "medium": "medium"}


def read_probes(folder: Path) -> list[dict]:
    """Every budget probe's probe.json (benchmarks/budget_probe.py), named and with the command that resumes it,
    in order of workload then steps."""
    probes = []
    for path in sorted(folder.glob("*/probe.json")):
        p = json.loads(path.read_text())
        b, bits = p["budget"], float(p.get("bits", tracks.BITS))
        precision = "full precision" if bits >= 16 else "ternary QAT"
        batch_size = b.get("batch_size", tracks.BATCH)
        workload = PROBE_WORKLOADS.get(b["workload"], b["workload"])
        p["name"] = f"{workload}, {b['steps']} steps{tracks.batch_suffix(batch_size)}, {precision}"
        p["command"] = (f"python -m benchmarks.budget_probe --workload {b['workload']} --steps {b['steps']} --seeds "
                        f"{len(b['seeds'])} --grid " + ",".join(f"{x:g}" for x in b["grid"])
                        + (f" --bits {bits:g}" if bits != tracks.BITS else "")
                        + (f" --batch {batch_size}" if batch_size != tracks.BATCH else "")
                        + f" --out benchmarks/results/budget-probe/{path.parent.name}")
        probes.append(p)
    return sorted(probes, key=lambda p: (p["budget"]["workload"] != "quick", p["budget"]["steps"],
                                         p.get("bits", tracks.BITS)))


def budgets_of(modes: dict[str, list[dict]]) -> list[tuple[int, list[str]]]:
    """[(steps, modes)] for the budgets with runs (the first protocol's 400 steps always), the headline first: the
    longest budget at which every workload has a complete set of runs (tuned cosine beats tuned constant only from
    some budget on, and the targets are read there), else 400 steps; then the others, longest first."""
    by_steps: dict[int, list[str]] = {}
    for mode, (_, steps, _) in ROBUST_WORKLOADS.items():
        if steps == 400 or modes.get(mode):
            by_steps.setdefault(steps, []).append(mode)
    return sorted(by_steps.items(), key=lambda kv: -kv[0])


def headline(budgets: list[tuple[int, list[dict]]]) -> int:
    """Index of the budget the verdict is read at (see budgets_of)."""
    for i, (_, workloads) in enumerate(budgets):
        if len(workloads) == len({w for w, *_ in ROBUST_WORKLOADS.values()}) and all(w.get("complete")
                                                                                      for w in workloads):
            return i
    return next(i for i, (steps, _) in enumerate(budgets) if steps == 400)


def report(out: Path = REPORT_DIR, n_boot: int = 4000, status: str | None = None, rows: dict | None = None,
           results: Path = RESULTS) -> Path:
    """Analyse every budget's journals (whatever finished; `rows`: {mode: rows} instead) and write report.md,
    results.json, figures.html into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else {mode: read_rows(mode) for mode in ROBUST_WORKLOADS}
    budgets = []
    for steps, modes in budgets_of(rows):
        workloads = []
        for mode in modes:
            w = analyse_workload(mode, rows.get(mode, []), n_boot)
            info = Path(results) / mode / "workload.json"
            w["workload"] = json.loads(info.read_text()) if info.exists() else {}
            w["teacher_val_loss"] = w["workload"].get("teacher_val_loss")
            w["cost"] = cost_from_file(Path(results) / mode / "cost.json", w["default_key"], n_boot) or w["cost"]
            workloads.append(w)
        budgets.append((steps, workloads))
    first = headline(budgets)
    budgets.insert(0, budgets.pop(first))
    probes = read_probes(Path(results) / "budget-probe")
    if status is None:
        short = [f"{w['name']} at {steps} steps" for steps, ws in budgets for w in ws
                 if not w.get("complete") or w["complete"]["missing"] or len(w["complete"]["seeds"]) < 5
                 or not _full_grid(w)]
        if short:
            status = ("Partial: the protocol (≈ 10 methods × 5 LRs × 6 seeds per workload and budget) did not finish "
                      "within this session's CPU; " + ", ".join(short) + " rest on the complete subsets named below. "
                      "`python -m benchmarks.robustness --mode MODE` resumes it (modes: "
                      + ", ".join(ROBUST_WORKLOADS) + ").")
    (out / "report.md").write_text(render(budgets, probes, status))
    steps, workloads = budgets[0]
    (out / "results.json").write_text(json.dumps({
        "protocol": "robustness", "status": status, "steps": steps, "workloads": workloads,
        "targets": targets(workloads), "verdict": verdict(workloads),
        "other_budgets": [{"steps": st, "workloads": ws, "targets": targets(ws)} for st, ws in budgets[1:]],
        "methods": {k: ALL_TRACK[k].label for k in track_budget("robust-chat").methods},
        "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1, default=str))
    try:
        (out / "figures.html").write_text(figures_html([dict(w, name=f"{w['name']}, {st} steps")
                                                        for st, ws in budgets for w in ws]))
    except ImportError:                      # plotly is a workbench dependency; the report stands without it
        pass
    return out / "report.md"


def write_workload_info(folder: Path, info: dict) -> bool:
    """results/MODE/workload.json, rewritten only when the workload itself changed. Its `prepare_s` is the time
    this invocation took to prepare (seconds on a warm cache, minutes on a cold one): compared too, every resume
    would rewrite the committed file for nothing but that timing; its teacher_val_loss is compared to 1e-6 for the
    same reason. Returns whether it wrote."""
    path = folder / "workload.json"
    text = json.dumps(info, indent=1, default=str)
    try:
        old = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        old = None
    if old is not None:
        new = json.loads(text)
        old.pop("prepare_s", None), new.pop("prepare_s", None)
        # the teacher's held-out loss is a float sum over the cached logits: its last digits vary between processes
        loss_old, loss_new = old.pop("teacher_val_loss", None), new.pop("teacher_val_loss", None)
        same_loss = (loss_old is None) == (loss_new is None) and (
            loss_old is None or math.isclose(loss_old, loss_new, rel_tol=1e-6))
        if old == new and same_loss:
            return False
    path.write_text(text)
    return True


def run(mode: str, methods: tuple[str, ...] | None = None, log=print, limit: int | None = None,
        seeds: tuple[int, ...] | None = None) -> list[dict]:
    """Run (or resume) one workload's protocol in priority order, journaled in results/<mode>/runs.jsonl; with
    `limit`, only the next `limit` runs of that order (to interleave the two workloads); with `methods` or `seeds`,
    only those runs of the order (to fill one set first, e.g. the last two seeds the ≥ 5-seed targets need)."""
    b = track_budget(mode)
    if methods:
        unknown = [m for m in methods if m not in b.methods]
        if unknown:
            raise SystemExit(f"unknown method {', '.join(unknown)}: use {', '.join(b.methods)}")
        b.methods = tuple(methods)
    if seeds:
        allowed = (*b.seeds, b.tuning_seed)
        unknown = [str(s) for s in seeds if s not in allowed]
        if unknown:
            raise SystemExit(f"unknown seed {', '.join(unknown)}: use {', '.join(map(str, allowed))} "
                             f"({b.tuning_seed} is the tuning seed)")
    folder = RESULTS / mode
    folder.mkdir(parents=True, exist_ok=True)
    prepared = tracks.prepare_workload(b.workload, "cpu", log)
    info = tracks.workload_info(prepared, b)
    teacher_loss = getattr(prepared.logits, "val_loss", None)
    info["teacher_val_loss"] = teacher_loss(prepared.eval_index) if callable(teacher_loss) else None
    write_workload_info(folder, info)
    done = read_rows(mode)
    have = {tracks._row_key(r["method"], r["lr"], r["seed"], r["steps"]) for r in done}
    specs = [s for s in tracks.specs_for(b, "cpu")
             if tracks._row_key(s.method.key, s.lr, s.seed, s.steps) not in have and (not seeds or s.seed in seeds)]
    order = sorted(specs, key=priority(b))
    log(f"{mode}: {len(done)} runs done (incl. {', '.join(map(str, ALSO_FROM.get(mode, []))) or 'none'}), "
        f"{len(order)} to run, in priority order" + (f"; the next {limit} now" if limit else ""))
    order = order[:limit] if limit else order
    return tracks.run_prepared(order, prepared, log, folder / "runs.jsonl")

if __name__ == "__main__":
    import argparse
    import functools
    parser = argparse.ArgumentParser(description="Issue 16's LR robustness protocol on two workloads")
    parser.add_argument("--mode", choices=tuple(ROBUST_WORKLOADS), help="run (resume) this workload's protocol")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods to run now")
    parser.add_argument("--limit", type=int, default=None, help="run only the next N runs of the priority order")
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the seeds to run now")
    parser.add_argument("--report", action="store_true", help="write the report from whatever finished")
    parser.add_argument("--cost", action="store_true",
                        help="with --mode: measure the cost row (the default vs AdamW, alternating in one process)")
    ns = parser.parse_args()
    if not ns.mode and not ns.report:
        parser.error("give --mode MODE and/or --report")
    if ns.mode:
        if ns.limit is not None and ns.limit < 1:
            parser.error(f"--limit must be a positive number of runs, got {ns.limit}")
        try:
            seeds = tuple(int(s) for s in ns.seeds.split(",")) if ns.seeds else None
        except ValueError:
            parser.error(f"--seeds must be comma-separated whole numbers, got {ns.seeds!r}")
        if ns.cost:
            measure_cost(ns.mode, log=functools.partial(print, flush=True))
        else:
            run(ns.mode, tuple(ns.methods.split(",")) if ns.methods else None,
                log=functools.partial(print, flush=True), limit=ns.limit, seeds=seeds)
    if ns.report:
        print(report())
