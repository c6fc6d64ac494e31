"""Files in run folders written atomically: a temporary name, then a rename — and no temporary file left behind.

A writer writes `<name>.tmp<pid>` and renames it over `<name>`, so readers see the old file or the new one, never
half of one. A failed write removes its temporary file at once; a killed one cannot, so opening a store for
writing removes the temporary files of processes that are gone (`remove_stale_temps`).
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from .liveness import pid_alive

_TEMP = re.compile(r"\.tmp(\d+)$")


def temp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def remove_stale_temps(folder: Path, depth: int = 1) -> list[Path]:
    """Remove `*.tmp<pid>` files under `folder` (its run folders at `depth` 1) whose process is gone."""
    removed = []
    pattern = "*/*.tmp*" if depth == 1 else "*.tmp*"
    try:
        candidates = list(Path(folder).glob(pattern))
    except OSError:
        return removed
    for path in candidates:
        match = _TEMP.search(path.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()   # torch's writer and SQLite report it in words
    return "no space left" in text or "database or disk is full" in text or "disk quota" in text


def describe_write_error(exc: BaseException, where: Path) -> str:
    """One line: 'disk full' and where when it is that, else the system's own words."""
    if is_disk_full(exc):
        return f"disk full: no space left on the device holding {where}"
    lines = str(exc).strip().splitlines()
    detail = getattr(exc, "strerror", None) or (lines[0] if lines else type(exc).__name__)
    return f"{detail} ({where})"
