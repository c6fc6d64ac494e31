"""Export the trained student as a packed quantized file plus a JSON manifest, and load it back.

`<run_dir>/student.safetensors` is written by the core's `export_quantized` (ternary codes 5 per byte, fp16 scales,
embeddings / norms / head as they are); its metadata carries what is needed to rebuild the student (its config and
the reduced vocabulary → tokenizer id map). `<run_dir>/student.json` is the human-readable manifest: the same plus
the measured sizes and compression. `load_exported_student` rebuilds a StudentLM whose logits equal the exported
quantized student's exactly.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:              # torch is imported where a student is written or read: target checks stay fast
    import torch

    from ..quantization import ExportReport
    from .student import StudentLM

MANIFEST_FORMAT = "hybrid-distill-student"


class ExportError(ValueError):
    """An export cannot be made (no trained student, a failed run, an unwritable target, ...): one clear line."""


EXPORT_MARK = "hybrid-export.json"       # inside every exported folder: what wrote it, so only that is replaced


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; rename it to `path` when the block succeeds, delete it otherwise."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise ExportError(f"cannot write the export to {path}: a folder of that name is in the way")
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
def atomic_folder(path: str | Path, mark: dict | None = None) -> Iterator[Path]:
    """Like atomic_file for a folder: build it under a temporary name, mark it as ours (EXPORT_MARK), then swap it
    in. An existing folder is replaced only when it is empty or carries the mark: a folder this code did not write
    is never deleted. The swap is one atomic exchange, so a crash leaves either the old folder or the new one."""
    path = Path(path)
    if path.is_symlink() or path.exists() and not (_is_empty_folder(path) or read_mark(path) is not None):
        raise ExportError(f"cannot write the export to {path}: it exists and was not written by an export "
                          "(only a new path, an empty folder or an earlier export is replaced); nothing was changed")
    tmp = _temporary_beside(path)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / EXPORT_MARK).write_text(json.dumps({"written_by": "hybrid_optimization export", **(mark or {})},
                                                  indent=2) + "\n")
        swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)        # after the swap it holds the old folder, if there was one


def read_mark(folder: str | Path) -> dict | None:
    """The EXPORT_MARK of a folder an export wrote, or None (no mark, unreadable, not a folder)."""
    try:
        mark = json.loads((Path(folder) / EXPORT_MARK).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and mark.get("written_by") == "hybrid_optimization export" else None


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def swap_in(built: Path, path: Path) -> None:
    """Put `built` at `path` in one atomic step. An existing `path` ends up at `built` (the caller removes it)."""
    if path.is_dir() and not path.is_symlink():
        if not _exchange(built, path):
            # No atomic exchange on this file system: two renames; a crash between them leaves the old folder
            # whole under the temporary name (never a mix of old and new files).
            aside = built.with_name(built.name + ".old")
            os.replace(path, aside)
            try:
                os.replace(built, path)
            except OSError:
                os.replace(aside, path)
                raise
            os.replace(aside, built)
    else:
        os.replace(built, path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux renameat2(RENAME_EXCHANGE); False where the system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def is_disk_full(exc: BaseException) -> bool:
    """True for the ways a full disk surfaces: ENOSPC / EDQUOT, safetensors' "No space left" and numpy's short
    write ("N requested and M written")."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left" in text or "os error 28" in text or ("requested and" in text and "written" in text)


def write_failure(path: Path, exc: BaseException) -> str:
    """One line for a failed write of `path`."""
    if is_disk_full(exc):
        return (f"cannot write the export to {path}: disk full (no space left on the device holding "
                f"{path.parent}); nothing was changed")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
    return f"cannot write the export to {path}: {reason}; nothing was changed"


def _temporary_beside(path: Path) -> Path:
    """A temporary name in the target's folder (same file system, so the rename is atomic); checks writability."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot write the export to {path}: {exc.strerror or exc}") from None
    tmp = parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        tmp.touch()
        tmp.unlink()
    except OSError as exc:
        if is_disk_full(exc):
            raise ExportError(write_failure(path, exc)) from None
        raise ExportError(f"cannot write the export to {path}: the folder {parent} is not writable "
                          f"({exc.strerror or exc})") from None
    return tmp


def export_student(student: StudentLM, path: str | Path, vocab: torch.Tensor, extra: dict | None = None
                   ) -> tuple[ExportReport, Path]:
    """Write the packed student and its manifest; returns (report, manifest path)."""
    from ..quantization import export_quantized

    path = Path(path)
    metadata = {"format": MANIFEST_FORMAT, "student": student.config.to_dict(), "vocab": vocab.tolist(),
                **(extra or {})}
    try:
        report = export_quantized(student, path, metadata=metadata)
    except Exception as exc:       # safetensors reports a full disk as its own error type
        if isinstance(exc, OSError) or is_disk_full(exc):
            raise ExportError(write_failure(path, exc)) from None
        raise
    manifest = {**metadata, "vocab_size": int(vocab.numel()), "file": path.name,
                "bit_map": {layer["name"]: layer["bits"] for layer in report.layers},
                "report": {k: v for k, v in report.to_dict().items() if k != "layers"}, "layers": report.layers}
    manifest.pop("vocab")
    manifest_path = path.with_suffix(".json")
    try:
        with atomic_file(manifest_path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2, default=str))
    except OSError as exc:
        raise ExportError(write_failure(manifest_path, exc)) from None
    return report, manifest_path


def load_exported_student(path: str | Path) -> tuple[StudentLM, dict]:
    """A StudentLM rebuilt from an export (its outputs equal the exported model's), and the export's metadata."""
    from ..quantization import load_quantized
    from .student import StudentConfig, StudentLM

    _, metadata = load_quantized(path)
    if metadata.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is a quantized export but not a distilled student (no student config inside)")
    model = StudentLM(StudentConfig.from_dict(metadata["student"]))
    model, metadata = load_quantized(path, model)
    return model.eval(), metadata
