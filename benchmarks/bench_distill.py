"""Benchmarks of the distillation pipeline (issue 3's "Measure" list). Every number printed comes from a run made
by this script; each run is a separate `distillation.py` process (so its peak memory is its own) writing to a
temporary run store, from which the figures are read back.

    python benchmarks/bench_distill.py                       # everything (~35 min on 2 CPU cores)
    python benchmarks/bench_distill.py --only tiny           # the tiny guide command, cold and warm cache
    python benchmarks/bench_distill.py --only teacher,throughput,compare --steps 300

Parts
- tiny:       the guide's full-hybrid command with --epochs 20 on the tiny preset; wall time with a cold cache
              (tokenizer + teacher trained first) and a warm one. Target ≤ 2 minutes on 2 CPU cores.
- teacher:    smollm2 preset, cold cache: GGUF → fp32 conversion, then the teacher's top-k logits for the default
              chat data (chatterbot-corpus). Target ≤ 5 minutes.
- throughput: smollm2 student training (hybrid, ternary QAT): tokens/s and peak memory. Targets ≥ 1,500 tokens/s,
              ≤ 4 GiB. With --export: compression of the packed ternary student vs FP32 (linear layers and file).
- teacher_speed: the fp32 teacher's forward speed alone on 48 real windows (seconds; run it on a quiet machine
              to project the cache build time; needs the converted teacher in --cache_dir or builds it).
- compare:    smollm2, baseline AdamW vs --hybrid, same seed and steps (ternary QAT): final validation numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybrid_optimization.tracking import RunStore  # noqa: E402
from workbench import queries  # noqa: E402

GUIDE_TINY = ["--hybrid", "--ternary", "--qat", "--epochs", "20", "--data_clusters", "8", "--param_clusters", "4",
              "--lr", "0.001", "--save_metrics", "--eval_every", "2"]


CONTEXT: dict = {}     # CPU seconds and load average of the last run_cli call


def run_cli(args: list[str], cache: Path, runs: Path, timeout: int = 7200) -> tuple[float, dict]:
    """Run distillation.py in its own process; return (wall seconds, the run record).

    The machine may be shared: CONTEXT also records the child's CPU seconds (user + sys) and the 1-minute load
    average before and after, so a slow wall time caused by other processes can be recognised as such."""
    env = {**os.environ, "HYBRID_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()[0]
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "distillation.py"), *args, "--quiet",
                           "--runs_root", str(runs)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    CONTEXT.update(cpu_s=round(usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime, 1),
                   load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))
    if proc.returncode != 0:
        raise RuntimeError(f"distillation.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_id = proc.stdout.splitlines()[0].removeprefix("run_id=")
    return seconds, RunStore(runs).get_run(run_id)


def bench_tiny(work: Path) -> dict:
    cache = work / "cache-tiny"
    cold, run_cold = run_cli(GUIDE_TINY, cache, work / "runs")
    cold_context = dict(CONTEXT)
    warm, run = run_cli(GUIDE_TINY, cache, work / "runs")
    s = run["summary"]
    return {"command": "python distillation.py " + " ".join(GUIDE_TINY),
            "wall_s_cold_cache": round(cold, 1), "cold_cache_context": cold_context,
            "wall_s_warm_cache": round(warm, 1), "warm_cache_context": dict(CONTEXT),
            "teacher_train_and_cache_s_cold": round(run_cold["summary"]["setup_seconds"], 1),
            "train_s": round(s["train_seconds"], 1), "steps": s["steps_completed"],
            "tokens_per_s": round(s["tokens_per_s"]), "final_loss": s["final_loss"], "val_loss": s["val_loss"],
            "first_epoch_loss": _first_epoch_loss(run), "peak_rss_mb": round(s["peak_rss_mb"])}


def _first_epoch_loss(run: dict) -> float:
    steps = queries.read_steps(RunStore(Path(run["run_dir"]).parent), run["run_id"], columns=["loss", "epoch"])
    return float(steps[steps["epoch"] == 0]["loss"].mean())


def bench_teacher(work: Path, cache: Path) -> dict:
    seconds, run = run_cli(["--preset", "smollm2", "--ternary", "--qat", "--max_steps", "1"], cache, work / "runs")
    s = run["summary"]
    return {"wall_s_cold_cache": round(seconds, 1), "context": dict(CONTEXT),
            "teacher_convert_s": round(s["prepare_seconds"], 1),
            "teacher_logits_s": round(s["teacher_cache_seconds"], 1),
            "teacher_tokens": s["teacher_tokens"],
            "teacher_tokens_per_s": round(s["teacher_tokens"] / max(s["teacher_cache_seconds"], 1e-9)),
            "peak_rss_mb": round(s["peak_rss_mb"])}


def bench_teacher_speed(cache: Path, windows: int = 48) -> dict:
    """The teacher's forward speed alone (fp32 SmolLM2, restricted head, top-k) on real windows, in this process:
    a short measurement to take when the machine is quiet, to project the full cache build."""
    os.environ["HYBRID_CACHE_DIR"] = str(cache)
    from hybrid_optimization.distill.data import build_dataset, load_documents
    from hybrid_optimization.distill.teacher import compute_topk, load_teacher, smollm2_gguf_path

    teacher = load_teacher(smollm2_gguf_path(), log=lambda m: None)
    dataset = build_dataset(load_documents(), teacher.tokenizer, seq_len=128)
    model = teacher.load_model()
    compute_topk(model, dataset.train.tokens[:8], dataset.vocab, 32)          # warm-up
    load_before, cpu_before, start = os.getloadavg()[0], time.process_time(), time.perf_counter()
    compute_topk(model, dataset.train.tokens[:windows], dataset.vocab, 32)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_before
    tokens = windows * 128
    total = (len(dataset.train) + len(dataset.val)) * 128
    return {"tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds),
            "cpu_s": round(cpu, 1), "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
            "dataset_tokens": total, "projected_cache_build_s": round(total / (tokens / seconds))}


def bench_throughput(work: Path, cache: Path, steps: int) -> dict:
    args = ["--preset", "smollm2", "--hybrid", "--ternary", "--qat", "--max_steps", str(steps), "--export"]
    seconds, run = run_cli(args, cache, work / "runs")
    s = run["summary"]
    return {"command": "python distillation.py " + " ".join(args), "wall_s": round(seconds, 1),
            "context": dict(CONTEXT), "tokens_per_s": round(s["tokens_per_s"]), "train_s": round(s["train_seconds"], 1),
            "train_peak_rss_mb": round(s["train_peak_rss_mb"] or 0), "peak_rss_mb": round(s["peak_rss_mb"]),
            "export_bytes": s["export_bytes"], "linear_bits_per_weight": round(s["linear_bits_per_weight"], 3),
            "compression_vs_fp32_linear": round(s["compression_vs_fp32_linear"], 2),
            "file_bits_per_weight": round(s["file_bits_per_weight"], 3),
            "compression_vs_fp32_file": round(s["compression_vs_fp32_file"], 2), "val_loss": s["val_loss"]}


def bench_compare(work: Path, cache: Path, steps: int, seed: int) -> dict:
    out = {}
    for name, extra in (("baseline", []), ("hybrid", ["--hybrid"])):
        args = ["--preset", "smollm2", "--ternary", "--qat", "--max_steps", str(steps), "--seed", str(seed),
                "--eval_every", "1", *extra]
        seconds, run = run_cli(args, cache, work / "runs")
        s = run["summary"]
        out[name] = {"command": "python distillation.py " + " ".join(args), "wall_s": round(seconds, 1),
                     "context": dict(CONTEXT),
                     **{k: s.get(k) for k in ("steps_completed", "final_loss", "val_loss", "val_ppl", "val_loss_fp",
                                              "kl_teacher", "top1_agreement", "qdiff_max", "qdiff_mean",
                                              "avg_lr_multiplier", "constraint_activation_rate",
                                              "final_trust_radius", "avg_bits", "tokens_per_s")}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="tiny,teacher,throughput,compare",
                        help="comma-separated parts: tiny, teacher, teacher_speed, throughput, compare")
    parser.add_argument("--steps", type=int, default=300, help="smollm2 training steps for throughput/compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", help="reuse this smollm2 cache (default: a fresh one, so 'teacher' is cold)")
    parser.add_argument("--threads", type=int, help="torch threads per run (OMP_NUM_THREADS; default: torch's own, "
                        "i.e. the number of cores). On a machine shared with other jobs, 1 avoids the stalls of "
                        "multi-threaded small ops whose threads wait for descheduled peers")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)      # inherited by every distillation.py run
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)                   # this process (teacher_speed)

    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU "
               f"cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
               "load_average_at_start": os.getloadavg(), "threads": args.threads, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        work = Path(tmp)
        cache = Path(args.cache_dir) if args.cache_dir else work / "cache-smollm2"
        for part in parts:
            started = time.perf_counter()
            if part == "tiny":
                value = bench_tiny(work)
            elif part == "teacher":
                value = bench_teacher(work, cache)
            elif part == "teacher_speed":
                value = bench_teacher_speed(cache)
            elif part == "throughput":
                value = bench_throughput(work, cache, args.steps)
            elif part == "compare":
                value = bench_compare(work, cache, args.steps, args.seed)
            else:
                raise SystemExit(f"unknown part {part!r}: use tiny, teacher, teacher_speed, throughput, compare")
            results["parts"][part] = value
            print(f"\n## {part} ({time.perf_counter() - started:.0f} s)\n{json.dumps(value, indent=2)}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
