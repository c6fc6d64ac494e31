"""Training data chosen in the workbench: uploads (size-capped, stored by content hash) and their validation.

Validation is the pipeline's own file rules (`hybrid_optimization.distill.data_files`, which the reader uses and
which raise one clear `DataError`), run in a short child process: torch-free, so it answers in well under a second
(it imported torch through the reader before: ~25 s at load), while a huge file's memory and time stay out of the
app process (a timeout bounds it). The result is cached per file content.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from workbench.launcher import DATA_SUFFIXES, REPO_ROOT

MAX_UPLOAD_MB = 50            # also server.maxUploadSize in .streamlit/config.toml
UPLOADS_DIR = "uploads"
_CHECK = ("import sys\n"
          "from hybrid_optimization.distill.data_files import DataError, read_data_file\n"
          "try:\n"
          "    print(len(read_data_file(sys.argv[1])[1]))\n"
          "except DataError as exc:\n"
          "    print(exc, file=sys.stderr); sys.exit(2)\n")


class DataFileError(ValueError):
    """An uploaded or chosen data file cannot be used; the message says why and what is allowed."""


def save_upload(name: str, data: bytes, runs_root: Path, max_mb: int = MAX_UPLOAD_MB) -> Path:
    """Store an upload under <runs_root>/uploads/<sha256-prefix>-<safe name> (identical uploads share a file)."""
    suffix = Path(name).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataFileError(f"{name}: unsupported file type {suffix or '(none)'!r}; upload a .txt (plain text) or "
                            ".jsonl (one chat per line) file")
    if len(data) > max_mb * 1024 * 1024:
        raise DataFileError(f"{name} is {len(data) / 2**20:.1f} MB; uploads are limited to {max_mb} MB")
    if not data.strip():
        raise DataFileError(f"{name} is empty")
    digest = hashlib.sha256(data).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem)[:60] or "data"
    folder = Path(runs_root) / UPLOADS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}-{stem}{suffix}"
    if not path.exists():
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def user_message(message: str, path: str | Path, shown_name: str) -> str:
    """A reader's message about an upload as its user sees it: the file's own name instead of the server's upload
    path, and no doubled words from joined messages ("starting at at column 43")."""
    path = Path(path)
    for text in (str(path.resolve()) if path.exists() else str(path), str(path), path.name):
        message = message.replace(text, shown_name)
    return re.sub(r"\b(\w+) \1\b", r"\1", message)


def validate_upload(path: str | Path, shown_name: str, timeout_s: float = 120) -> int:
    """validate_data_file for an upload: messages name the uploaded file, never the server's path."""
    try:
        return validate_data_file(path, timeout_s)
    except DataFileError as exc:
        raise DataFileError(user_message(str(exc), path, shown_name)) from None


def validate_data_file(path: str | Path, timeout_s: float = 120) -> int:
    """Number of documents the pipeline reads from `path`; DataFileError with the pipeline's message if none."""
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except OSError:
        raise DataFileError(f"data file {path} does not exist") from None
    return _validate(str(path.resolve()), stat.st_size, stat.st_mtime_ns, timeout_s)


@lru_cache(maxsize=64)
def _validate(path: str, size: int, mtime_ns: int, timeout_s: float) -> int:
    try:
        done = subprocess.run([sys.executable, "-c", _CHECK, path], cwd=str(REPO_ROOT), capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DataFileError(f"reading {path} took more than {timeout_s:.0f} s; is it very large?") from None
    if done.returncode == 0:
        return int(done.stdout.strip().splitlines()[-1])
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    message = lines[-1] if lines else f"the data reader failed with exit code {done.returncode}"
    if done.returncode != 2:  # not a DataError: say so instead of pretending the file is bad
        message = f"could not check {path} with the pipeline's reader: {message}"
    raise DataFileError(message)
