"""User data at scale (issue 13): how long a big text file takes to become ready to train, and the peak memory.

    python benchmarks/bench_data.py                          # 5 MB and 50 MB of paragraphs, tiny preset, cold cache
    python benchmarks/bench_data.py --sizes 2 --shape single # one 2 MB paragraph (a single long document)
    python benchmarks/bench_data.py --sizes 5 --cli          # also: the CLI with --max_steps 1 on the same file
    python benchmarks/bench_data.py --generate 50 --out big.txt   # only write the text file

The text is generated reproducibly (seed 0) from the chatterbot-corpus sentences: each paragraph is 2–8 random
sentences, a third of them varied (a word swapped in from another sentence, a number appended), so the file is
not a pile of duplicates. Every measurement is a separate process with an empty cache folder (tokenizer and
teacher trained from scratch) and an empty run store in a temporary folder:

- "ready to train": `train(TrainOptions(data=FILE, stop_after_steps=1))` with the preset's default schedule (tiny:
  20 epochs × 10 steps × 32 windows), i.e. what `python distillation.py --data FILE` prepares: the seconds from
  the start of the run to its first training step (setup_time_s) and the process's peak resident memory during
  that time (polled from /proc every 50 ms; the VmHWM high-water mark is read too, so short peaks count).
- `--cli`: `distillation.py --data FILE --max_steps 1` end to end (wall seconds and peak memory).

The machine may be shared: each line also gives the process's CPU seconds and the 1-minute load average before
and after, so a slow wall time caused by other processes can be recognised.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time
from hybrid_optimization.distill import TrainOptions, train
options = TrainOptions(**json.loads(sys.argv[1]))
result = train(options)
s = result.summary
ds = result.dataset
print("RESULT " + json.dumps({
    "ready_s": round(result.setup_time_s, 1), "prepare_s": round(s["prepare_seconds"], 1),
    "teacher_logits_s": round(s["teacher_cache_seconds"], 1), "clustering_s": round(s["clustering_seconds"], 1),
    "tokens": ds.n_tokens_total, "documents": ds.n_documents, "duplicates": ds.n_duplicates,
    "split": ds.split_mode, "train_windows": len(ds.train), "train_windows_available": ds.train.n_available,
    "val_windows": len(ds.val), "val_windows_available": ds.val.n_available, "status": result.status}))
"""


# -- the text ---------------------------------------------------------------------------------------------------
def corpus_sentences() -> list[str]:
    from hybrid_optimization.distill.data import load_chatterbot

    seen, sentences = set(), []
    for document in load_chatterbot():
        for message in document.messages:
            text = " ".join(message["content"].split())
            if text and text not in seen:
                seen.add(text)
                sentences.append(text)
    return sentences


def generate_text(path: Path, megabytes: float, seed: int = 0, shape: str = "paragraphs") -> Path:
    """Write ~`megabytes` MB of English text: paragraphs separated by blank lines, or (shape "single") one
    paragraph without any blank line. Same seed → same bytes."""
    sentences = corpus_sentences()
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    separator = " " if shape == "single" else "\n\n"
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            parts = []
            for _ in range(rng.randint(2, 8)):
                sentence = rng.choice(sentences)
                if rng.random() < 0.33:                     # vary it: a word from another sentence, a number
                    words = sentence.split()
                    words[rng.randrange(len(words))] = rng.choice(rng.choice(sentences).split())
                    sentence = " ".join(words) + f" ({rng.randint(1, 9999)})"
                parts.append(sentence)
            paragraph = " ".join(parts) + separator
            handle.write(paragraph)
            written += len(paragraph.encode("utf-8"))
    return path


# -- measuring a child process ----------------------------------------------------------------------------------
def run_measured(argv: list[str], env: dict, timeout: int) -> dict:
    """Run `argv`; return wall seconds, CPU seconds, peak RSS (MB) and stdout/stderr."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"kb": 0}

    def poll() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        peak["kb"] = max(peak["kb"], int(line.split()[1]))
            except (OSError, ValueError):
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    watcher.join(timeout=1)
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak["kb"] / 1024), "returncode": proc.returncode,
            "stdout": out, "stderr": err, "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def cpu_seconds_of_children() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_ready(data: Path, work: Path, preset: str, timeout: int, extra: dict) -> dict:
    cache, runs = work / f"cache-{data.stem}", work / f"runs-{data.stem}"
    env = {**os.environ, "HYBRID_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    options = {"data": str(data), "preset": preset, "stop_after_steps": 1, "quiet": True, "progress": False,
               "runs_root": str(runs), **extra}
    cpu_before = cpu_seconds_of_children()
    measured = run_measured([sys.executable, "-c", CHILD, json.dumps(options)], env, timeout)
    measured["cpu_s"] = round(cpu_seconds_of_children() - cpu_before, 1)
    line = next((l for l in measured["stdout"].splitlines() if l.startswith("RESULT ")), None)
    if measured["returncode"] != 0 or line is None:
        raise RuntimeError(f"preparation of {data} failed ({measured['returncode']}):\n{measured['stderr'][-3000:]}")
    return {**json.loads(line[len("RESULT "):]), **{k: measured[k] for k in ("wall_s", "cpu_s", "peak_rss_mb",
                                                                            "load_before", "load_after")}}


def measure_cli(data: Path, work: Path, preset: str, timeout: int) -> dict:
    cache, runs = work / f"cache-cli-{data.stem}", work / f"runs-cli-{data.stem}"
    env = {**os.environ, "HYBRID_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, str(ROOT / "distillation.py"), "--data", str(data), "--preset", preset, "--max_steps",
            "1", "--quiet", "--runs_root", str(runs)]
    cpu_before = cpu_seconds_of_children()
    measured = run_measured(argv, env, timeout)
    measured["cpu_s"] = round(cpu_seconds_of_children() - cpu_before, 1)
    if measured["returncode"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({measured['returncode']}):\n{measured['stderr'][-3000:]}")
    return {"command": " ".join(argv[1:]), **{k: measured[k] for k in ("wall_s", "cpu_s", "peak_rss_mb",
                                                                      "load_before", "load_after")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5,50", help="file sizes in MB, comma-separated (default 5,50)")
    parser.add_argument("--shape", choices=["paragraphs", "single"], default="paragraphs")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cli", action="store_true", help="also run distillation.py --max_steps 1 on each file")
    parser.add_argument("--max_tokens", type=int, help="pass --max_tokens to the preparation")
    parser.add_argument("--threads", type=int, help="torch / OpenMP threads of the measured process (default: "
                        "torch's, one per core; 1 is faster on a machine other jobs keep busy)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per measured process")
    parser.add_argument("--work", help="folder for files, caches and runs (default: a temporary folder, deleted)")
    parser.add_argument("--generate", type=float, metavar="MB", help="only write a text file of MB megabytes")
    parser.add_argument("--out", help="with --generate: the file to write")
    args = parser.parse_args(argv)
    if args.generate is not None:
        path = generate_text(Path(args.out or f"text-{args.generate:g}MB.txt"), args.generate, args.seed, args.shape)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    temporary = tempfile.TemporaryDirectory(prefix="bench-data-") if args.work is None else None
    work = Path(args.work or temporary.name)
    work.mkdir(parents=True, exist_ok=True)
    extra = {"max_tokens": args.max_tokens} if args.max_tokens else {}
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    print(f"# bench_data: preset {args.preset}, shape {args.shape}, seed {args.seed}, {os.cpu_count()} CPU cores, "
          f"threads {args.threads or 'default'}, load {os.getloadavg()[0]:.2f}")
    try:
        for size in [float(s) for s in args.sizes.split(",")]:
            data = work / f"{args.shape}-{size:g}MB.txt"
            started = time.perf_counter()
            generate_text(data, size, args.seed, args.shape)
            print(f"generated {data.name}: {data.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s",
                  flush=True)
            ready = measure_ready(data, work, args.preset, args.timeout, extra)
            print(f"{size:g} MB ready to train: {json.dumps(ready)}", flush=True)
            if args.cli:
                print(f"{size:g} MB CLI --max_steps 1: {json.dumps(measure_cli(data, work, args.preset, args.timeout))}",
                      flush=True)
    finally:
        if temporary is not None:
            temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
