"""Export a run's trained student to a format other tools read: `python -m hybrid_optimization.export RUN_ID ...`.

The source is the run's packed student (`<run_dir>/student.safetensors`, written by `--export`): it is the trained
student bit for bit, with its config, vocabulary map and tokenizer folder inside. From it:

  packed  the file itself (copied when --out is given)
  gguf    <run_dir>/student.gguf      llama.cpp; ternary Linear layers as TQ2_0 (or --linear_type TQ1_0 / Q8_0 / ...)
  hf      <run_dir>/student-hf/       a LlamaForCausalLM folder for transformers

An export writes only what it creates. The target (`--out`, or the default above) must be a new path, an empty
folder, or an earlier export of the same format (a GGUF named hybrid-student-*, a packed student, a folder holding
EXPORT_MARK); it is never inside the run store except in the run's own folder. Anything else is refused before a
byte is written. The export is built under a temporary name beside the target and swapped in with one atomic
rename (an atomic exchange for folders), so a crash or a full disk leaves the old export whole and no partial file.

Bad input (an unknown run, a failed, diverged or unfinished run, a run without a trained student, a target that is
not ours, an unwritable target, a full disk) is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..schema import EXPORT_FILE_NAMES, EXPORT_FORMATS
from .export import (EXPORT_MARK, MANIFEST_FORMAT, ExportError, _is_empty_folder, _temporary_beside, is_disk_full,
                     read_mark, swap_in, write_failure)

EXPORT_NAMES = EXPORT_FILE_NAMES          # format -> default file / folder name in the run folder (schema.EXPORTS)
# The pre-tokenizer name llama.cpp knows each preset's tokenizer by (its split regex).
PRE_TOKENIZERS = {"smollm2": "smollm", "tiny": "gpt-2"}
GGUF_NAME_PREFIX = "hybrid-student-"        # general.name of every GGUF we write: how a re-export knows its own file
# What export_hf writes (config, weights, generation config, tokenizer files): an unmarked folder of only these at
# the run's default target was written by an export made before the mark existed.
HF_EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
                   "merges.txt", EXPORT_MARK}


@dataclass
class ExportResult:
    format: str
    path: Path
    line: str                 # one human-readable line (size, types, fallbacks)
    report: object = None


def export_packed_student(packed: str | Path, fmt: str, out: str | Path | None = None, *,
                          linear_type: str = "TQ2_0", other_type: str = "F32",   # export_gguf.DEFAULT_LINEAR_TYPE
                          runs_root: str | Path | None = None) -> ExportResult:
    """Write the packed student `packed` as `fmt` (default target: beside it, named as in EXPORT_NAMES).

    `runs_root`: the run store the run belongs to (default: the folder above the run's, when it holds runs.db);
    nothing inside it but the run's own folder is ever written."""
    from .export import load_exported_student

    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"export format {fmt!r} is unknown: choose one of {', '.join(EXPORT_FORMATS)}")
    packed = Path(packed)
    default = packed.with_name(EXPORT_NAMES[fmt])
    target = Path(out).expanduser() if out is not None else default
    if fmt == "packed" and target.exists() and os.path.samefile(target, packed):
        return ExportResult(fmt, target, f"packed student {target} ({target.stat().st_size / 2**20:.2f} MiB)")
    check_export_target(target, fmt, run_dir=packed.parent,
                        runs_root=runs_root if runs_root is not None else _store_above(packed.parent),
                        default=default)
    remove_stale_temporaries(target)
    if fmt == "packed":
        with replacing(target) as build:
            shutil.copyfile(packed, build)
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
    mark = {"format": fmt, "run_id": metadata.get("run_id"), "source": str(packed)} if fmt == "hf" else None
    with replacing(target, mark) as build:
        if fmt == "gguf":
            from .export_gguf import export_gguf
            report = export_gguf(student, vocab, tokenizer_dir, build, linear_type=linear_type,
                                 other_type=other_type,
                                 pre_tokenizer=PRE_TOKENIZERS.get(metadata.get("preset"), "gpt-2"),
                                 name=f"{GGUF_NAME_PREFIX}{metadata.get('run_id', 'export')}",
                                 metadata={k: metadata.get(k) for k in ("run_id", "preset", "teacher")})
        else:
            from .export_hf import export_hf
            report = export_hf(student, vocab, tokenizer_dir, build)
    report.path = str(target)              # the report was made at the temporary name
    return ExportResult(fmt, target, report.summary_line(), report)


# -- the target --------------------------------------------------------------------------------------------------
def check_export_target(target: Path, fmt: str, *, run_dir: Path | None = None, runs_root: Path | None = None,
                        default: Path | None = None) -> None:
    """Refuse (ExportError, one line) a target this export may not write; touches nothing."""
    target = Path(target)
    real = Path(os.path.realpath(target))
    if runs_root is not None:
        store = Path(os.path.realpath(runs_root))
        own = Path(os.path.realpath(run_dir)) if run_dir is not None else None
        if real == own:
            raise ExportError(f"cannot export to {target}: it is the run's own folder; give a new path inside it "
                              f"(e.g. {Path(run_dir) / EXPORT_NAMES[fmt]}) or outside the run store")
        if (real == store or store in real.parents) and not (own is not None and own in real.parents):
            raise ExportError(f"cannot export to {target}: it is inside the run store {runs_root}, where an export "
                              f"may only write in the run's own folder {run_dir}; choose a path outside the store")
    if target.is_symlink():
        raise ExportError(f"cannot export to {target}: it is a symbolic link; give the real path")
    if not target.exists():
        return
    if not target.is_dir() and not target.is_file():          # a FIFO or a device: never opened (a FIFO blocks)
        raise ExportError(f"cannot export to {target}: it is not a regular file or folder; give a new path")
    if fmt == "hf":
        if not target.is_dir():
            raise ExportError(f"cannot export to {target}: it is a file, and the hf export is a folder; give a new "
                              "path or an empty folder")
        if _is_empty_folder(target) or read_mark(target) is not None or (
                default is not None and target == default and _legacy_hf_export(target)):
            return
        raise ExportError(f"cannot export to {target}: the folder holds files an export did not write (only a new "
                          "path, an empty folder or an earlier hf export is replaced); nothing was changed")
    if target.is_dir():
        raise ExportError(f"cannot export to {target}: it is a folder, and the {fmt} export is one file; give a "
                          f"file path such as {target / EXPORT_NAMES[fmt]}")
    if not own_file_export(target, fmt):
        raise ExportError(f"cannot export to {target}: the file exists and is not an earlier {fmt} export (only a "
                          "new path or an export's own file is replaced); nothing was changed")


def own_file_export(path: Path, fmt: str) -> bool:
    """True when `path` is a file an export of format `fmt` wrote (its own header says so)."""
    try:
        if fmt == "gguf":
            import gguf
            field = gguf.GGUFReader(str(path)).fields.get("general.name")
            return field is not None and str(field.contents()).startswith(GGUF_NAME_PREFIX)
        if fmt == "packed":
            from safetensors import safe_open
            from ..quantization.export import METADATA_KEY
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
            return (header.get("user") or {}).get("format") == MANIFEST_FORMAT
    except Exception:          # not a GGUF / safetensors file at all (the readers raise many types)
        return False
    return False


def _legacy_hf_export(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return "config.json" in names and names <= HF_EXPORT_FILES and not any(p.is_dir() for p in folder.iterdir())


def _store_above(run_dir: Path) -> Path | None:
    from ..tracking import DB_NAME
    return run_dir.parent if (run_dir.parent / DB_NAME).is_file() else None


def remove_stale_temporaries(target: Path) -> None:
    """Temporaries an export killed mid-way left beside `target` (named .<name>.<pid>.tmp..., pid no longer alive)."""
    from ..tracking import pid_alive
    pattern = re.compile(r"^\.+" + re.escape(target.name) + r"\.(\d+)\.tmp")
    with contextlib.suppress(OSError):
        for path in target.parent.iterdir():
            found = pattern.match(path.name)
            if found and int(found.group(1)) != os.getpid() and not pid_alive(int(found.group(1))):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(target: Path, mark: dict | None = None):
    """Yield a new path beside `target` to build the export at; then swap it in atomically. Any failure (a full
    disk included) removes what was built and leaves `target` as it was, as one ExportError line."""
    build = _temporary_beside(target)
    try:
        try:
            yield build
            if mark is not None:
                (build / EXPORT_MARK).write_text(json.dumps({"written_by": "hybrid_optimization export", **mark},
                                                            indent=2) + "\n")
            swap_in(build, target)
        except ExportError:
            raise
        except Exception as exc:
            if isinstance(exc, OSError) or is_disk_full(exc):
                raise ExportError(write_failure(target, exc)) from None
            raise
    finally:
        with contextlib.suppress(OSError):        # after the swap `build` holds the old export, if there was one
            shutil.rmtree(build) if build.is_dir() and not build.is_symlink() else build.unlink(missing_ok=True)


def find_trained_student(run_id: str, runs_root: str | Path | None = None) -> Path:
    """The packed student of a finished run, or ExportError saying why there is none."""
    return _find_trained_student(run_id, runs_root)[0]


def _find_trained_student(run_id: str, runs_root: str | Path | None) -> tuple[Path, Path]:
    """(the packed student, the run store's folder)."""
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
    if status == "diverged":
        why = (run.get("error") or "").removeprefix("diverged: ") or "its loss became NaN or infinite"
        raise ExportError(f"run {run_id} diverged ({why}): it has no usable student to export; train a new run "
                          "(for example with a lower learning rate)")
    if status in ("queued", "running"):
        raise ExportError(f"run {run_id} is still {status}: export it when it has finished")
    packed = (run.get("artifacts") or {}).get("export")
    packed = Path(packed) if packed else Path(run["run_dir"]) / EXPORT_NAMES["packed"]
    if packed.is_file():
        return packed, store.root
    if status in ("stopped", "lost"):
        raise ExportError(f"run {run_id} was {status} at step {run.get('step') or 0} before it finished, so no "
                          f"student was exported: finish it with `python distillation.py --resume {run_id} --export`")
    raise ExportError(f"run {run_id} ({status}) has no trained student to export: it was trained without "
                      f"--export (run `python distillation.py --resume {run_id} --export` first)")


def build_parser() -> argparse.ArgumentParser:
    from ..progname import command_name
    from .options import OneLineParser as _Parser
    p = _Parser(prog=command_name("hybrid_optimization.export"),      # hybrid-export, or python -m ...
                description="Export a finished run's student: packed | gguf (llama.cpp) | hf (transformers).")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="gguf", help="what to write (default gguf)")
    p.add_argument("--out", metavar="PATH", help="target file / folder: a new path, an empty folder or an earlier "
                   "export of the same format, outside the run store (default: in the run folder, "
                   + ", ".join(f"{k}: {v}" for k, v in EXPORT_NAMES.items()) + ")")
    p.add_argument("--linear_type", default="TQ2_0", type=str.upper,      # export_gguf.DEFAULT_LINEAR_TYPE
                   choices=("TQ2_0", "TQ1_0", "Q8_0", "F16", "F32"),
                   help="GGUF type of ternary Linear layers: TQ2_0 (default) decodes fastest in llama.cpp, TQ1_0 is "
                        "the smallest file")
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
        packed, runs_root = _find_trained_student(args.run_id, args.runs_root)
        result = export_packed_student(packed, args.format, args.out, linear_type=args.linear_type,
                                       other_type=args.other_type, runs_root=runs_root)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Exported {result.line}")
    return 0
