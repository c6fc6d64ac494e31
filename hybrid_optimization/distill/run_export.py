"""Export a run's trained student to a format other tools read: `python -m hybrid_optimization.export RUN_ID ...`.

The source is the run's packed student (`<run_dir>/student.safetensors`, written by `--export`): it is the trained
student bit for bit, with its config, vocabulary map and tokenizer folder inside. From it:

  packed  the file itself (copied when --out is given)
  gguf    <run_dir>/student.gguf      llama.cpp; ternary Linear layers as TQ1_0 (or --linear_type TQ2_0 / Q8_0 / ...)
  hf      <run_dir>/student-hf/       a LlamaForCausalLM folder for transformers

Bad input (an unknown run, a failed or unfinished run, a run without a trained student, an unwritable target) is one
line on stderr and exit code 2; nothing is written (every export goes to a temporary name, then is renamed).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..schema import EXPORT_FORMATS
from .export import ExportError, atomic_file

EXPORT_NAMES = {"packed": "student.safetensors", "gguf": "student.gguf", "hf": "student-hf"}
# The pre-tokenizer name llama.cpp knows each preset's tokenizer by (its split regex).
PRE_TOKENIZERS = {"smollm2": "smollm", "tiny": "gpt-2"}


@dataclass
class ExportResult:
    format: str
    path: Path
    line: str                 # one human-readable line (size, types, fallbacks)
    report: object = None


def export_packed_student(packed: str | Path, fmt: str, out: str | Path | None = None, *,
                          linear_type: str = "TQ1_0", other_type: str = "F32") -> ExportResult:
    """Write the packed student `packed` as `fmt` (default target: beside it, named as in EXPORT_NAMES)."""
    from .export import load_exported_student

    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"export format {fmt!r} is unknown: choose one of {', '.join(EXPORT_FORMATS)}")
    packed = Path(packed)
    target = Path(out) if out is not None else packed.with_name(EXPORT_NAMES[fmt])
    if fmt == "packed":
        if target.resolve() != packed.resolve():
            with atomic_file(target) as tmp:
                shutil.copyfile(packed, tmp)
        return ExportResult(fmt, target, f"packed student {target} ({target.stat().st_size / 2**20:.2f} MiB)")
    try:
        student, metadata = load_exported_student(packed)
    except ValueError as exc:
        raise ExportError(f"cannot read the trained student {packed}: {exc}") from None
    import torch
    vocab = torch.tensor(metadata["vocab"], dtype=torch.long)
    tokenizer_dir = metadata.get("tokenizer_dir")
    if not tokenizer_dir:
        raise ExportError(f"{packed} does not name its tokenizer folder; re-export the run with --export")
    if fmt == "gguf":
        from .export_gguf import export_gguf
        report = export_gguf(student, vocab, tokenizer_dir, target, linear_type=linear_type, other_type=other_type,
                             pre_tokenizer=PRE_TOKENIZERS.get(metadata.get("preset"), "gpt-2"),
                             name=f"hybrid-student-{metadata.get('run_id', 'export')}",
                             metadata={k: metadata.get(k) for k in ("run_id", "preset", "teacher")})
    else:
        from .export_hf import export_hf
        report = export_hf(student, vocab, tokenizer_dir, target)
    return ExportResult(fmt, target, report.summary_line(), report)


def find_trained_student(run_id: str, runs_root: str | Path | None = None) -> Path:
    """The packed student of a finished run, or ExportError saying why there is none."""
    from ..tracking import RunStore, StoreError

    try:
        store = RunStore(runs_root, create=False)
        run = store.get_run(run_id)
    except (StoreError, KeyError, ValueError) as exc:
        raise ExportError(f"cannot export run {run_id!r}: {exc}") from None
    status = run.get("status")
    if status == "failed":
        raise ExportError(f"run {run_id} failed: it has no trained student to export (see its traceback on the "
                          "Summary page)")
    if status in ("queued", "running"):
        raise ExportError(f"run {run_id} is still {status}: export it when it has finished")
    packed = (run.get("artifacts") or {}).get("export")
    packed = Path(packed) if packed else Path(run["run_dir"]) / EXPORT_NAMES["packed"]
    if not packed.is_file():
        raise ExportError(f"run {run_id} ({status}) has no trained student to export: it was trained without "
                          f"--export (run `python distillation.py --resume {run_id} --export` first)")
    return packed


def build_parser() -> argparse.ArgumentParser:
    from .cli import _Parser
    p = _Parser(prog="python -m hybrid_optimization.export",
                description="Export a finished run's student: packed | gguf (llama.cpp) | hf (transformers).")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="gguf", help="what to write (default gguf)")
    p.add_argument("--out", metavar="PATH", help="target file / folder (default: in the run folder, "
                   + ", ".join(f"{k}: {v}" for k, v in EXPORT_NAMES.items()) + ")")
    p.add_argument("--linear_type", default="TQ1_0", type=str.upper,
                   choices=("TQ1_0", "TQ2_0", "Q8_0", "F16", "F32"), help="GGUF type of ternary Linear layers")
    p.add_argument("--other_type", default="F32", type=str.upper, choices=("F32", "F16", "Q8_0"),
                   help="GGUF type of the embedding, the head and non-ternary Linear layers (F32: exact logits)")
    p.add_argument("--runs_root", metavar="DIR", help="run store folder (default $HYBRID_RUNS_ROOT or "
                   "~/.cache/hybrid-workbench/runs)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        packed = find_trained_student(args.run_id, args.runs_root)
        result = export_packed_student(packed, args.format, args.out, linear_type=args.linear_type,
                                       other_type=args.other_type)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Exported {result.line}")
    return 0
