"""Does the hybrid optimizer help, against what, and by how much? (issue 6, protocol after MLCommons AlgoPerf)

    python benchmarks/bench_hybrid.py --quick              # ≤ 10 min on 2 CPU cores → benchmarks/results/quick/
    python benchmarks/bench_hybrid.py --full --device cuda # ≥ 5 seeds, longer runs, + smollm2 → results/full/

Workloads (the distillation pipeline's `tiny` preset: a 0.4 M-parameter student distilled from the project's tiny
teacher on chatterbot-corpus; `smollm2` in full mode): W1 full precision, W2 ternary QAT (the main one), W3 1-bit
QAT, W4 = W2 with every method's base LR ×10 and ×0.1. Methods: see methods.py (R, B1, B2, B3, H, ablations, and
the hybrid before issue 6). Phases, in this order so that nothing is tuned on the evaluation seeds:

  1. tune R's LR on a separate seed over a small grid (extended once when the best LR is at its edge);
  2. run R on the evaluation seeds: the target of W1/W2/W3 = the median over seeds of R's best validation loss
     (W4 uses W2's target), fixed before any other method runs;
  3. run every other method on every evaluation seed.

Then the overhead and compression figures (bench_core.py / bench_quantization.py functions), and the report
(markdown + plotly figures + raw per-seed CSV) — every number from this run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import overhead, stats  # noqa: E402
from benchmarks.harness import RunResult, RunSpec, Timing, optimizer_state_bytes, run, run_plan  # noqa: E402,F401
from benchmarks.methods import ALL, CHANGES, GUIDE_LR, MAIN, R  # noqa: E402
from benchmarks.workload import prepare  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    bits: float
    lr_scale: float = 1.0
    target_of: str | None = None      # W4 is judged against W2's target
    tuned_from: str | None = None     # ... with W2's tuned LR


WORKLOADS = {
    "W1": Workload("W1", "tiny, full precision", 32.0),
    "W2": Workload("W2", "tiny, ternary (1.58-bit) QAT", 1.58),
    "W3": Workload("W3", "tiny, 1-bit QAT", 1.0),
    "W4x10": Workload("W4x10", "W2 with base LR ×10", 1.58, 10.0, target_of="W2", tuned_from="W2"),
    "W4/10": Workload("W4/10", "W2 with base LR ×0.1", 1.58, 0.1, target_of="W2", tuned_from="W2"),
}


@dataclass
class Budget:
    mode: str
    seeds: tuple[int, ...]
    tuning_seed: int
    steps: int
    batch_size: int
    eval_every: int
    eval_windows: int | None
    grid: tuple[float, ...]
    methods: dict                     # workload -> method keys
    preset: str = "tiny"
    overhead: dict = field(default_factory=dict)


def budget(mode: str) -> Budget:
    everything = [m.key for m in MAIN]
    w2 = [*everything, "H-aux", "H-TR", "H-data", "H-param", "H-frozen", "H0"]
    if mode == "quick":
        robust = ["R", "B1", "B3", "H"]
        return Budget("quick", (0, 1, 2), 100, 100, 16, 10, 64, (3e-4, 1e-3, 3e-3),
                      {"W1": ["R", "B1", "H"], "W2": w2, "W3": ["R", "B1", "H"], "W4x10": robust,
                       "W4/10": robust},
                      overhead=dict(core_repeats=3, core_batch=64, qat_repeats=3, qat_batch=4, qat_seq=128,
                                    vocab=4096, plan_batches=1, hutchinson=0))
    if mode == "full":
        return Budget("full", (0, 1, 2, 3, 4), 100, 600, 32, 25, None, (3e-4, 1e-3, 3e-3, 1e-2),
                      {"W1": everything, "W2": w2, "W3": everything, "W4x10": [*everything, "H0"],
                       "W4/10": [*everything, "H0"]},
                      overhead=dict(core_repeats=20, core_batch=64, qat_repeats=7, qat_batch=8, qat_seq=256,
                                    vocab=4096, plan_batches=2, hutchinson=2))
    if mode == "changes":               # issue 6's changes one at a time (W2, quick budget)
        q = budget("quick")
        return Budget("changes", q.seeds, q.tuning_seed, q.steps, q.batch_size, q.eval_every, q.eval_windows,
                      q.grid, {"W2": ["R", "B1", "H", "H0", *(m.key for m in CHANGES)]})
    if mode == "smoke":                 # CI: seconds, one seed, every row of the report
        return Budget("smoke", (0,), 100, 6, 4, 3, 8, (1e-3, 3e-3),
                      {"W1": ["R", "B1", "H"], "W2": w2, "W3": ["R", "B1", "H"], "W4x10": everything,
                       "W4/10": everything},
                      overhead=dict(core_repeats=1, core_batch=4, qat_repeats=1, qat_batch=1, qat_seq=16,
                                    vocab=256, plan_batches=1, hutchinson=0))
    raise ValueError(f"unknown mode {mode!r}: use quick, full or smoke")


# -- running jobs (in worker processes with one torch thread each, or in this process) --------------------------
_PREPARED = None


def _init_worker(prepare_kwargs: dict, threads: int) -> None:
    global _PREPARED
    torch.set_num_threads(threads)
    _PREPARED = prepare(**prepare_kwargs)


def _run_job(spec: RunSpec) -> dict:
    result = run(_PREPARED, spec)
    n = len(result.multipliers)
    every = max(1, n // 60)                        # a light trace of the aux net's decisions for the figures
    return {
        "spec": spec, "evals": result.evals, "diverged": result.diverged, "skipped_steps": result.skipped_steps,
        "train_s": result.train_s, "train_cpu_s": result.train_cpu_s, "clustering_s": result.clustering_s,
        "clustering_cpu_s": result.clustering_cpu_s, "plan_s": result.plan_s, "plan_cpu_s": result.plan_cpu_s,
        "plan_avg_bits": result.plan_avg_bits,
        "peak_rss_mb": result.peak_rss_mb, "optimizer_state_mb": result.optimizer_state_mb,
        "train_spikes": stats.count_train_spikes(result.losses), "steps_done": len(result.losses),
        "first_loss": result.losses[0] if result.losses else math.nan,
        "mean_multiplier": float(np.mean(result.multipliers)) if n else 1.0,
        "constraint_rate": float(np.mean(result.constraint_active)) if result.constraint_active else 0.0,
        "trace": {"step": list(range(1, n + 1, every)), "multiplier": result.multipliers[::every],
                  "radius": result.radii[::every]},
    }


class Runner:
    def __init__(self, prepare_kwargs: dict, jobs: int, threads: int):
        self.jobs, self.pool = jobs, None
        self.threads_before = torch.get_num_threads()
        if jobs > 1:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(jobs, initializer=_init_worker, initargs=(prepare_kwargs, threads))
        else:
            _init_worker(prepare_kwargs, threads)
        self.done = 0

    def map(self, specs: list[RunSpec], log) -> list[dict]:
        order = sorted(range(len(specs)), key=lambda i: -_cost(specs[i]))    # long jobs first
        results = [None] * len(specs)
        iterator = (self.pool.imap_unordered(_indexed, [(i, specs[i]) for i in order]) if self.pool
                    else map(_indexed, [(i, specs[i]) for i in order]))
        for i, out in iterator:
            results[i] = out
            self.done += 1
            s = out["spec"]
            best = min((e["val_loss"] for e in out["evals"]), default=math.nan)
            log(f"  [{self.done}] {s.workload} {s.method.key} seed {s.seed} lr {s.lr:g}: best val {best:.4f} "
                f"({out['train_cpu_s']:.1f} s CPU)")
        return results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
        torch.set_num_threads(self.threads_before)     # in-process runs changed it


def _indexed(item):
    i, spec = item
    return i, _run_job(spec)


def _cost(spec: RunSpec) -> float:
    return spec.steps * (1.3 if spec.method.is_hybrid else 1.0) * (1.2 if spec.bits < 16 else 1.0)


# -- the protocol ----------------------------------------------------------------------------------------------
def run_protocol(b: Budget, runner: Runner, device: str, log) -> dict:
    started = time.perf_counter()
    spec = lambda w, m, lr, seed: RunSpec(w.key, m, w.bits, lr, seed, b.steps, b.batch_size, b.eval_every,  # noqa
                                          device)
    own = [w for w in WORKLOADS.values() if w.tuned_from is None and w.key in b.methods]

    # 1. Tuning R's LR on the tuning seed.
    log(f"Phase 1: tuning R's LR on seed {b.tuning_seed} over {list(b.grid)} for {[w.key for w in own]}")
    tuning = {w.key: {} for w in own}
    grid = {w.key: list(b.grid) for w in own}
    for _round in range(2):
        todo = [(w, lr) for w in own for lr in grid[w.key] if lr not in tuning[w.key]]
        for out in runner.map([spec(w, R, lr, b.tuning_seed) for w, lr in todo], log):
            s = out["spec"]
            tuning[s.workload][s.lr] = out
        for w in own:                                # best at the grid's edge: one more LR beyond it
            scores = {lr: min(e["val_loss"] for e in o["evals"]) for lr, o in tuning[w.key].items()}
            best = min(scores, key=scores.get)
            if best == max(scores):
                grid[w.key].append(best * 3)
            elif best == min(scores):
                grid[w.key].append(best / 3)
    tuned = {}
    for w in own:
        scores = {lr: min(e["val_loss"] for e in o["evals"]) for lr, o in tuning[w.key].items()}
        tuned[w.key] = min(scores, key=scores.get)
    for w in WORKLOADS.values():
        if w.tuned_from is not None:
            tuned[w.key] = tuned[w.tuned_from]
    tuning_cost = {"runs": sum(len(t) for t in tuning.values()),
                   "train_s": sum(o["train_s"] for t in tuning.values() for o in t.values()),
                   "train_cpu_s": sum(o["train_cpu_s"] for t in tuning.values() for o in t.values())}
    log(f"  tuned LR: {tuned}; tuning cost {tuning_cost['runs']} runs, {tuning_cost['train_cpu_s']:.0f} s CPU")

    def lr_for(w: Workload, method) -> float:
        return (tuned[w.key] if method.tuned_lr else GUIDE_LR) * w.lr_scale

    # 2. R on the evaluation seeds → targets, fixed before the other methods run.
    log("Phase 2: R on the evaluation seeds → targets")
    workloads = [WORKLOADS[k] for k in b.methods]
    r_specs = [spec(w, R, lr_for(w, R), seed) for w in workloads if "R" in b.methods[w.key] for seed in b.seeds]
    runs = runner.map(r_specs, log)
    targets = {}
    for w in own:
        bests = [min(e["val_loss"] for e in o["evals"]) for o in runs if o["spec"].workload == w.key]
        targets[w.key] = float(np.median(bests))
    for w in workloads:
        if w.target_of is not None:
            targets[w.key] = targets[w.target_of]
    log(f"  targets (median best val loss of R): {targets}")

    # 3. Everything else.
    others = [spec(w, ALL[k], lr_for(w, ALL[k]), seed) for w in workloads for k in b.methods[w.key] if k != "R"
              for seed in b.seeds]
    log(f"Phase 3: {len(others)} runs of the other methods")
    runs += runner.map(others, log)
    return {"tuning": {w: {str(lr): _tuning_row(o) for lr, o in t.items()} for w, t in tuning.items()},
            "tuned_lr": tuned, "tuning_cost": tuning_cost, "targets": targets, "runs": runs,
            "protocol_seconds": time.perf_counter() - started}


def _tuning_row(out: dict) -> dict:
    return {"best_val_loss": min(e["val_loss"] for e in out["evals"]), "train_cpu_s": out["train_cpu_s"]}


# -- per-run rows ------------------------------------------------------------------------------------------------
def run_rows(protocol: dict) -> list[dict]:
    rows = []
    for out in protocol["runs"]:
        s = out["spec"]
        target = protocol["targets"][s.workload]
        evals = out["evals"]
        last = evals[-1] if evals else {}
        vals = [e["val_loss"] for e in evals]
        rows.append({
            "workload": s.workload, "method": s.method.key, "seed": s.seed, "lr": s.lr, "bits": s.bits,
            "steps": s.steps, "batch_size": s.batch_size, "target": target,
            "steps_to_target": stats.first_reaching(evals, target, "step"),
            "wall_s_to_target": stats.first_reaching(evals, target, "train_s"),
            "cpu_s_to_target": stats.first_reaching(evals, target, "train_cpu_s"),
            "best_val_loss": min(vals) if vals else math.nan, "final_val_loss": last.get("val_loss", math.nan),
            "final_val_loss_fp": last.get("val_loss_fp", math.nan),
            "quant_gap": last.get("val_loss", math.nan) - last.get("val_loss_fp", math.nan) if s.bits < 16 else math.nan,
            "abs_quant_gap": abs(last.get("val_loss", math.nan) - last.get("val_loss_fp", math.nan))
            if s.bits < 16 else math.nan,
            "qdiff_mean": last.get("qdiff_mean", math.nan) if s.bits < 16 else math.nan,
            "qdiff_max": last.get("qdiff_max", math.nan) if s.bits < 16 else math.nan,
            "kl_teacher": last.get("kl_teacher", math.nan), "top1_agreement": last.get("top1_agreement", math.nan),
            "val_spikes": stats.count_spikes(vals), "train_spikes": out["train_spikes"],
            "diverged": bool(out["diverged"]), "skipped_steps": out["skipped_steps"],
            "train_s": out["train_s"], "train_cpu_s": out["train_cpu_s"],
            "cpu_ms_per_step": 1e3 * (out["train_cpu_s"] - out["plan_cpu_s"]) / max(out["steps_done"], 1),
            "clustering_s": out["clustering_s"], "plan_s": out["plan_s"], "plan_avg_bits": out["plan_avg_bits"],
            "peak_rss_mb": out["peak_rss_mb"], "optimizer_state_mb": out["optimizer_state_mb"],
            "mean_lr_multiplier": out["mean_multiplier"], "constraint_rate": out["constraint_rate"],
        })
    return rows


# -- the environment -----------------------------------------------------------------------------------------------
def environment(args, argv: list[str]) -> dict:
    import schedulefree
    import sklearn
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:                 # the code that ran is not exactly that commit: say so
            commit += " + uncommitted changes"
    except (OSError, subprocess.SubprocessError):
        commit = ""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = args.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name()})"
    return {"command": "python " + " ".join(argv), "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu})",
            "device": device, "jobs": args.jobs, "threads_per_job": args.threads,
            "load_average_start": [round(x, 2) for x in load], "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "transformers": transformers.__version__, "schedulefree": schedulefree.__version__
            if hasattr(schedulefree, "__version__") else _dist_version("schedulefree"), "git_commit": commit}


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help="3 seeds, ≤ 10 min on 2 cores")
    mode.add_argument("--medium", action="store_const", const="medium", dest="mode",
                      help="issue 10: both AlgoPerf tracks on the medium workload (benchmarks/tracks.py, medium.py)")
    mode.add_argument("--variants", action="store_const", const="variants", dest="mode",
                      help="issue 10: candidate changes to H scored against the --medium runs (reused, not re-run)")
    mode.add_argument("--full", action="store_const", const="full", dest="mode",
                      help="the --medium protocol scaled up (for a GPU: --full --device cuda)")
    mode.add_argument("--changes", action="store_const", const="changes", dest="mode",
                      help="W2 only: issue 6's hybrid changes taken out one at a time (quick budget)")
    mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode", help="CI: seconds, 1 seed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (full mode on a GPU machine)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel runs (default: 2 on CPU, 1 on a GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--add-method", action="append", default=[], metavar="KEY",
                        help="--medium/--variants/--full: also run this method (e.g. the variant H-rel) on the "
                             "whole LR grid, in both tracks")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of evaluation seeds")
    parser.add_argument("--steps", type=int, default=None, help="override the step budget of every run")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<mode>)")
    parser.add_argument("--skip-overhead", action="store_true", help="no overhead/compression section")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if args.device not in ("cpu",) and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device!r}: use cpu or cuda")
    if args.jobs is None:
        args.jobs = 1 if args.device.startswith("cuda") else 2
    for name in ("jobs", "threads", "seeds", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be ≥ 1")
    if args.mode in ("medium", "variants", "full"):   # issue 10: both tracks (benchmarks/tracks.py)
        from benchmarks import tracks_report
        env = environment(args, ["benchmarks/bench_hybrid.py", *argv])
        reuse = RESULTS / "medium" / "runs.jsonl" if args.mode == "variants" else None
        return tracks_report.main(args.mode, args.out or RESULTS / args.mode, args.device, args.jobs, args.threads,
                                  args.seeds, args.steps, env=env, log=print if not args.quiet else (lambda m: None),
                                  reuse=reuse, extra_methods=tuple(args.add_method))
    b = budget(args.mode)
    if args.seeds:
        b.seeds = tuple(range(args.seeds))
    if args.steps:
        b.steps = args.steps
    out = Path(args.out) if args.out else RESULTS / args.mode
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))

    started = time.perf_counter()
    env = environment(args, ["benchmarks/bench_hybrid.py", *argv])
    log(f"{env['command']} · {env['date']} · {env['machine']} · load {env['load_average_start']}")
    prepare_kwargs = dict(preset=b.preset, eval_windows=b.eval_windows, device=args.device)
    prepared = prepare(**prepare_kwargs, log=log)          # builds the caches before the workers load them
    workload_info = {"preset": b.preset, "train_windows": len(prepared.dataset.train),
                     "val_windows": len(prepared.dataset.val), "eval_windows": len(prepared.eval_index),
                     "seq_len": prepared.seq_len, "vocab": prepared.dataset.vocab_size,
                     "student_params": sum(v for v in _student_params(prepared)),
                     "prepare_s": prepared.prepare_seconds,
                     "clustering_s": {s: prepared.clusters(s).seconds for s in b.seeds}}
    runner = Runner(prepare_kwargs, args.jobs, args.threads)
    try:
        protocol = run_protocol(b, runner, args.device, log)
        if args.mode == "full":
            protocol["smollm2"] = run_smollm2(b, args, protocol["tuned_lr"]["W2"], log)
    finally:
        runner.close()
    rows = run_rows(protocol)
    extra = {}
    if not args.skip_overhead and b.overhead:
        log("Overhead and compression (bench_core.py / bench_quantization.py)")
        o = b.overhead
        extra["optimizer_step"] = overhead.optimizer_step(o["core_repeats"], o["core_batch"])
        extra["qat_speed"] = overhead.qat_speed(o["qat_repeats"], o["qat_batch"], o["qat_seq"], args.device)
        extra["aux_net"] = overhead.aux_net_cost(repeats=20 if args.mode == "smoke" else 200)
        extra["compression"] = overhead.compression(o["vocab"], o["plan_batches"], o["hutchinson"])
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    env["total_seconds"] = time.perf_counter() - started
    from benchmarks.report import write_report
    path = write_report(out, b, env, workload_info, protocol, rows, extra)
    log(f"Report written to {path} ({env['total_seconds']:.0f} s in total)")
    if args.mode == "smoke":                            # issue 10's tracks at smoke size: every row present
        from benchmarks import tracks_report
        tracks_report.main("smoke", out / "tracks", args.device, 1, args.threads, env=env, log=log)
    return path


def _student_params(prepared):
    from hybrid_optimization.distill.student import StudentLM
    yield StudentLM(prepared.student_config).n_params()


def run_smollm2(b: Budget, args, tuned_lr: float, log) -> dict:
    """Full mode: W2 on the smollm2 preset (the real teacher), R at the tiny W2's tuned LR vs B1 vs H."""
    try:
        prep = prepare(preset="smollm2", device=args.device, log=log)
    except Exception as exc:       # the 98 MB teacher package is optional: say so instead of failing the report
        log(f"smollm2 skipped: {exc}")
        return {"skipped": str(exc)}
    torch.set_num_threads(max(1, args.threads))
    rows = []
    for key in ("R", "B1", "H"):
        for seed in b.seeds:
            spec = RunSpec("smollm2-W2", ALL[key], 1.58, tuned_lr if ALL[key].tuned_lr else GUIDE_LR, seed,
                           b.steps, b.batch_size, b.eval_every, args.device)
            result = run(prep, spec)
            rows.append({"method": key, "seed": seed, "best_val_loss": min(e["val_loss"] for e in result.evals),
                         "final_val_loss": result.evals[-1]["val_loss"], "train_s": result.train_s})
            log(f"  smollm2 {key} seed {seed}: final val {rows[-1]['final_val_loss']:.4f}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
