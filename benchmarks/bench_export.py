"""GGUF export benchmark: whole-file sizes and llama.cpp generation speed of the same student stored as ternary
(TQ1_0 / TQ2_0), Q8_0 and F16 GGUF files; and the chat's time to first token.

The student is the smollm2 preset's default ("small": d_model 256, 4 blocks, d_ff 768, every Linear ternary) with
SmolLM2's tokenizer (49,152 tokens; a 4,600-token restricted vocabulary expanded into it, as the export does), or
with --preset tiny the tiny preset's student and a 1,024-token BPE. Its weights are random ternary (QAT-converted):
sizes and speed depend on shapes and types, not on training. `--run RUN_ID` uses a trained run's student instead.

Files compared (all with the same tokenizer and shapes):
  ternary TQ1_0 / TQ2_0   Linear layers ternary; embedding + head Q8_0 (so only the Linear type differs from Q8_0)
  ternary, head F16       Linear layers TQ1_0; embedding + head F16 (vs the F16 file: only the Linear type differs)
  Q8_0                    every 2-D tensor Q8_0 (llama-quantize's Q8_0 file)
  F16                     every 2-D tensor F16
llama.cpp speed needs llama-cpp-python in its own interpreter (see tests/test_export_gguf_hf.py's slow test for the
build): LLAMA_PYTHON=/work/llama-venv/bin/python (default). Generation tokens/s is greedy decoding of --tokens new
tokens after a short prompt (decode only: one token per forward pass with the KV cache; sampling, which is the
same for every file, excluded), --threads threads (default 1: on a 2-core machine shared with other jobs, 2 llama.cpp
threads spin on each other and fall to a few tokens/s), median of --repeats runs, variants interleaved per repeat.

    python benchmarks/bench_export.py                 # smollm2 shapes, sizes + llama.cpp speed
    python benchmarks/bench_export.py --preset tiny
    python benchmarks/bench_export.py --chat RUN_ID    # chat: load time, time to first token, tokens/s (student
                                                       # and teacher, 5 prompts, the Chat page's code path)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment  # noqa: E402
from hybrid_optimization.distill.export_gguf import export_gguf  # noqa: E402
from hybrid_optimization.distill.student import StudentConfig, StudentLM  # noqa: E402
from hybrid_optimization.quantization import quantize_model  # noqa: E402

VARIANTS = {   # name: (linear_type, other_type)
    "ternary TQ1_0": ("TQ1_0", "Q8_0"),
    "ternary TQ2_0": ("TQ2_0", "Q8_0"),
    "ternary TQ1_0, head F16": ("TQ1_0", "F16"),
    "Q8_0": ("Q8_0", "Q8_0"),
    "F16": ("F16", "F16"),
}
LLAMA_SCRIPT = r"""
import json, sys, time, llama_cpp
paths, n_new, threads, repeats = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
models = {name: llama_cpp.Llama(path, n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
          for name, path in paths.items()}
prompt = [1, 20, 30, 40, 50, 60, 70, 80]
times = {name: [] for name in paths}
for r in range(repeats + 1):
    for name, m in models.items():
        m.reset()
        m.eval(prompt)
        start = time.perf_counter()
        for i in range(n_new):                     # one token per forward pass with the KV cache, as generation
            m.eval([100 + i])
        if r:                                      # the first round warms caches
            times[name].append(n_new / (time.perf_counter() - start))
print(json.dumps(times))
"""


def build_student(preset: str, run: str | None, runs_root: str | None, size: str | None = None):
    if run is not None:
        from hybrid_optimization.distill.export import load_exported_student
        from hybrid_optimization.distill.run_export import find_trained_student
        student, meta = load_exported_student(find_trained_student(run, runs_root))
        return student, torch.tensor(meta["vocab"]), meta["tokenizer_dir"], meta.get("preset", "tiny")
    from transformers import AutoTokenizer
    size_override = size
    folder = Path(tempfile.mkdtemp(prefix="bench-export-tok-"))
    if preset == "smollm2":
        from hybrid_optimization.distill.teacher import smollm2_gguf_path
        gguf_path = smollm2_gguf_path()
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(folder)
        size, vocab_size, used = "small", 49152, 4600
    else:
        from tests.fixtures.student_run import make_tokenizer_dir
        os.environ.setdefault("HYBRID_CACHE_DIR", str(folder / "cache"))
        folder = Path(make_tokenizer_dir())
        size, vocab_size, used = "tiny", 300, 200
    torch.manual_seed(0)
    vocab = torch.randperm(vocab_size)[:used].sort().values
    student = StudentLM(StudentConfig.from_size(size_override or size, vocab_size=used, max_seq_len=256))
    quantize_model(student, 1.58)
    return student.eval(), vocab, str(folder), preset


CHAT_PROMPTS = ["Hello, how are you?", "What is your favourite book?", "Tell me a joke.", "Do you like music?",
                "What is artificial intelligence?"]


def chat_benchmark(run_id: str, runs_root: str | None, out_dir: Path) -> None:
    from hybrid_optimization.chat import ChatModels, Settings
    start = time.perf_counter()
    models = ChatModels.from_run(run_id, runs_root)
    load_s = time.perf_counter() - start
    lines = [f"# Chat latency: run {run_id}", "", f"{models.description}; models loaded in {load_s:.2f} s (once per "
             "app session: the Chat page caches them).", "",
             "| model | prompt | first token (s) | tokens | tokens/s |", "|---|---|---|---|---|"]
    rows = []
    for prompt in CHAT_PROMPTS:
        for who in ("student", "teacher"):
            answer = models.reply(who, [{"role": "user", "content": prompt}], Settings(max_new_tokens=48, seed=0))
            rows.append({"who": who, "prompt": prompt, "first_token_s": answer.first_token_s,
                         "n_tokens": answer.n_tokens, "tokens_per_s": answer.tokens_per_s, "text": answer.text})
            first = f"{answer.first_token_s:.3f}" if answer.first_token_s is not None else "—"
            lines.append(f"| {who} | {prompt} | {first} | {answer.n_tokens} | {answer.tokens_per_s:.1f} |")
    worst = max(r["first_token_s"] or 0 for r in rows if r["who"] == "student")
    lines += ["", f"Worst student time to first token: {worst:.3f} s (target ≤ 2 s). Load average "
              f"{os.getloadavg()[0]:.1f}. Command: `python benchmarks/bench_export.py --chat {run_id}`"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "chat_latency.json").write_text(json.dumps({"run_id": run_id, "load_s": load_s, "rows": rows},
                                                          indent=2))
    (out_dir / "chat_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--size", choices=("micro", "tiny", "small", "base"), help="student size (default: the preset's)")
    p.add_argument("--run", metavar="RUN_ID", help="a trained run's student instead of a random one")
    p.add_argument("--runs_root")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per timed generation")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "export"))
    p.add_argument("--chat", metavar="RUN_ID", help="measure the chat's latency on this run instead")
    args = p.parse_args()
    if args.chat:
        chat_benchmark(args.chat, args.runs_root, Path(args.out))
        return

    student, vocab, tokenizer_dir, preset = build_student(args.preset, args.run, args.runs_root, args.size)
    pre = "smollm" if preset == "smollm2" else "gpt-2"
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows = {}
    for name, (linear_type, other_type) in VARIANTS.items():
        path = work / (name.replace(" ", "_").replace(",", "") + ".gguf")
        report = export_gguf(student, vocab, tokenizer_dir, path, linear_type=linear_type, other_type=other_type,
                             pre_tokenizer=pre)
        rows[name] = {"path": str(path), "file_bytes": report.file_bytes, "linear_type": linear_type,
                      "other_type": other_type, "fallbacks": report.fallbacks}
    n_linear = sum(m.weight.numel() for n, m in student.named_modules()
                   if isinstance(m, torch.nn.Linear) and n != "lm_head")
    python = os.environ.get("LLAMA_PYTHON", "/work/llama-venv/bin/python")
    speed_note = ""
    if Path(python).exists():
        out = subprocess.run([python, "-c", LLAMA_SCRIPT, json.dumps({k: v["path"] for k, v in rows.items()}),
                              str(args.tokens), str(args.threads), str(args.repeats)],
                             capture_output=True, text=True, timeout=900)
        if out.returncode == 0:
            for name, values in json.loads(out.stdout.strip().splitlines()[-1]).items():
                rows[name]["tokens_per_s"] = statistics.median(values)
                rows[name]["tokens_per_s_runs"] = values
        else:
            speed_note = f"llama.cpp failed: {out.stderr.strip().splitlines()[-1:]}"
    else:
        speed_note = f"llama.cpp speed not measured: no llama-cpp-python interpreter at {python}"

    f16 = rows["F16"]["file_bytes"]
    q8_speed = rows["Q8_0"].get("tokens_per_s")
    lines = [f"# GGUF export: sizes and llama.cpp generation speed ({preset} student shapes)", "",
             f"Student: d_model {student.config.d_model}, {student.config.n_layers} blocks, d_ff "
             f"{student.config.d_ff}; {n_linear / 1e6:.2f} M Linear weights; vocabulary {vocab.numel()} of "
             f"the tokenizer's tokens, expanded into it. "
             f"{'Trained run ' + args.run if args.run else 'Random ternary weights (speed and size depend on shapes only).'}",
             "", "| file | Linear | embedding + head | size | vs F16 | tokens/s | vs Q8_0 |", "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        speed = row.get("tokens_per_s")
        lines.append(f"| {name} | {row['linear_type']} | {row['other_type']} | {row['file_bytes'] / 2**20:.2f} MiB | "
                     f"{row['file_bytes'] / f16:.3f}× | {f'{speed:.1f}' if speed else '—'} | "
                     f"{f'{speed / q8_speed:.2f}×' if speed and q8_speed else '—'} |")
    lines += ["", f"llama.cpp (llama-cpp-python 0.3.16): {args.tokens} decoded tokens after an 8-token prompt, one "
              f"token per forward pass, {args.threads} thread(s), median of {args.repeats} interleaved repeats. "
              f"{speed_note}",
              f"Machine: {environment()}; load average {os.getloadavg()[0]:.1f} at the end (other jobs share "
              "these cores).", "", "Command: `python benchmarks/bench_export.py "
              + " ".join(sys.argv[1:]) + "`"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gguf_{preset}" + (f"_{args.size}" if args.size else "") + (f"_{args.run}" if args.run else "")
    (out_dir / f"{stem}.json").write_text(json.dumps({"preset": preset, "rows": rows, "args": vars(args),
                                                      "time": time.time()}, indent=2))
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
