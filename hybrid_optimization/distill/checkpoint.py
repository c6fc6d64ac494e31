"""Checkpoints of a distillation run: everything needed to continue exactly where it stopped.

One file, `<run_dir>/checkpoint.pt`, replaced atomically (write to a temporary file, fsync, then rename), holding
the student, the optimizer (with the auxiliary net and its meta-optimizer), the LR scheduler, the batch sampler,
the RNG states, the precision plan, the cluster labels and the metric history the summary needs. Everything is
plain tensors / numbers / strings / lists / dicts, so it loads with `torch.load(weights_only=True)` (no pickled
code).

Integrity: torch's zip container has no checksum that torch.load verifies (a checkpoint with 20 flipped bytes
loaded and trained on NaN). So the payload is serialised first and stored as bytes next to its sha256; loading
recomputes the digest and refuses a mismatch in one line. Version-1 checkpoints (no digest) still load.

Failed writes: a write that fails (disk full, read-only folder) removes its temporary file and raises
CheckpointWriteError — "disk full" and where — leaving the previous checkpoint untouched and resumable. A killed
write leaves `checkpoint.pt.tmp<pid>`; opening the run store for writing removes such files of dead processes.

A checkpoint is tied to its run: `fingerprint` (dataset hash, student shape, key options) must match, otherwise
resuming would silently train a different model.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tracking.files import describe_write_error, remove_stale_temps, temp_path

FORMAT = "hybrid-distill-checkpoint"
VERSION = 2                     # 2: payload bytes + sha256; 1: the payload itself (still readable)
FILENAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to a different run setup."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder); the previous one is intact."""


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _to_lists(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_to_tuples(state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as the checkpoint at `path` atomically, with its sha256; CheckpointWriteError on failure."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
        inner = buffer.getbuffer()
        outer = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(inner).hexdigest(),
                 "payload": torch.frombuffer(inner, dtype=torch.uint8)}
        data = io.BytesIO()
        torch.save(outer, data)                     # into memory: torch's own writer hides ENOSPC in its message
        del inner, outer, buffer
        with open(tmp, "wb") as handle:
            handle.write(data.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)                 # never leave a temporary file behind (a full disk stays full)
        if isinstance(exc, (OSError, RuntimeError)):
            kept = f"the last good checkpoint {path} is kept" if path.exists() else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"could not save checkpoint: {describe_write_error(exc, path.parent)}; "
                                       f"{kept}") from None
        raise
    return path


def load_checkpoint(path: str | Path, fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load and check a checkpoint; any problem becomes one CheckpointError naming the file and the cause."""
    path = Path(path)
    remove_stale_temps(path.parent, depth=0)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run has not saved one yet (it stops, finishes or "
                              "ends an epoch to save one)")
    payload = _torch_load(path, path.read_bytes())
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this pipeline (format {FORMAT!r} expected)")
    if payload.get("version") == 2:
        data = payload.get("payload")
        if not isinstance(data, torch.Tensor) or not isinstance(payload.get("sha256"), str):
            raise CheckpointError(f"checkpoint {path} is corrupt (its payload or checksum is missing)")
        raw = data.numpy().tobytes()
        if hashlib.sha256(raw).hexdigest() != payload["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: its sha256 does not match its contents (damaged "
                                  "on disk or edited); resume refused")
        payload = _torch_load(path, raw)
    elif payload.get("version") != 1:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')}; this pipeline reads "
                              f"versions 1 and {VERSION}")
    if fingerprint is not None:
        stored = payload.get("fingerprint", {})
        for key, value in fingerprint.items():
            if stored.get(key) != value:
                raise CheckpointError(f"checkpoint {path} does not match this run: its {key} is "
                                      f"{_short(stored.get(key))}, the run's is {_short(value)}")
    return payload


def _torch_load(path: Path, data: bytes) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError,
            IndexError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a distillation checkpoint ({first_line[:200]})"
                              ) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
