"""Checkpoints of a distillation run: everything needed to continue exactly where it stopped.

One file, `<run_dir>/checkpoint.pt`, replaced atomically (write to a temporary file, then rename), holding the
student, the optimizer (with the auxiliary net and its meta-optimizer), the LR scheduler, the batch sampler, the
RNG states, the precision plan, the cluster labels and the metric history the summary needs. Everything is plain
tensors / numbers / strings / lists / dicts, so it loads with `torch.load(weights_only=True)` (no pickled code).

A checkpoint is tied to its run: `fingerprint` (dataset hash, student shape, key options) must match, otherwise
resuming would silently train a different model.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "hybrid-distill-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to a different run setup."""


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load and check a checkpoint; any problem becomes one CheckpointError naming the file and the cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run has not saved one yet (it stops, finishes or "
                              "ends an epoch to save one)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a distillation checkpoint ({first_line[:200]})"
                              ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this pipeline (format {FORMAT!r} expected)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')}; this pipeline reads "
                              f"version {VERSION}")
    if fingerprint is not None:
        stored = payload.get("fingerprint", {})
        for key, value in fingerprint.items():
            if stored.get(key) != value:
                raise CheckpointError(f"checkpoint {path} does not match this run: its {key} is "
                                      f"{_short(stored.get(key))}, the run's is {_short(value)}")
    return payload


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
