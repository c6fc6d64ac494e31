"""Export the trained student as a packed quantized file plus a JSON manifest, and load it back.

`<run_dir>/student.safetensors` is written by the core's `export_quantized` (ternary codes 5 per byte, fp16 scales,
embeddings / norms / head as they are); its metadata carries what is needed to rebuild the student (its config and
the reduced vocabulary → tokenizer id map). `<run_dir>/student.json` is the human-readable manifest: the same plus
the measured sizes and compression. `load_exported_student` rebuilds a StudentLM whose logits equal the exported
quantized student's exactly.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch

from ..quantization import ExportReport, export_quantized, load_quantized
from .student import StudentConfig, StudentLM

MANIFEST_FORMAT = "hybrid-distill-student"


class ExportError(ValueError):
    """An export cannot be made (no trained student, a failed run, an unwritable target, ...): one clear line."""


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; rename it to `path` when the block succeeds, delete it otherwise."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Like atomic_file for a folder: build it under a temporary name, then swap it in (an old one is replaced)."""
    path = Path(path)
    tmp = _temporary_beside(path)
    tmp.mkdir()
    old = tmp.with_name(tmp.name + ".old")
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)


def _temporary_beside(path: Path) -> Path:
    """A temporary name in the target's folder (same file system, so the rename is atomic); checks writability."""
    parent = path.parent
    if path.is_dir() and path.suffix:
        raise ExportError(f"cannot write the export to {path}: a folder of that name is in the way")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot write the export to {path}: {exc.strerror or exc}") from None
    tmp = parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        tmp.touch()
        tmp.unlink()
    except OSError as exc:
        raise ExportError(f"cannot write the export to {path}: the folder {parent} is not writable "
                          f"({exc.strerror or exc})") from None
    return tmp


def export_student(student: StudentLM, path: str | Path, vocab: torch.Tensor, extra: dict | None = None
                   ) -> tuple[ExportReport, Path]:
    """Write the packed student and its manifest; returns (report, manifest path)."""
    path = Path(path)
    metadata = {"format": MANIFEST_FORMAT, "student": student.config.to_dict(), "vocab": vocab.tolist(),
                **(extra or {})}
    report = export_quantized(student, path, metadata=metadata)
    manifest = {**metadata, "vocab_size": int(vocab.numel()), "file": path.name,
                "bit_map": {layer["name"]: layer["bits"] for layer in report.layers},
                "report": {k: v for k, v in report.to_dict().items() if k != "layers"}, "layers": report.layers}
    manifest.pop("vocab")
    manifest_path = path.with_suffix(".json")
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str))
    return report, manifest_path


def load_exported_student(path: str | Path) -> tuple[StudentLM, dict]:
    """A StudentLM rebuilt from an export (its outputs equal the exported model's), and the export's metadata."""
    _, metadata = load_quantized(path)
    if metadata.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is a quantized export but not a distilled student (no student config inside)")
    model = StudentLM(StudentConfig.from_dict(metadata["student"]))
    model, metadata = load_quantized(path, model)
    return model.eval(), metadata
