"""System metrics of a training process: CPU %, resident memory and, on CUDA, GPU memory and utilisation, sampled
every few seconds by a background thread and appended to `<run folder>/system_metrics.csv` (the workbench's Live
page draws them as curves).

    sampler = SystemSampler(run_dir / SYSTEM_METRICS_FILE)        # this process
    sampler.start(); ...; sampler.stop()
    SystemSampler(path, pid=child.pid).start()                    # or watch another process (e.g. a sweep's trial)

A file next to the run rather than a store table: the sampler never contends with the trainer's store writer, and
it works for any process id. GPU numbers come from torch only when this process already uses CUDA (the sampler
never initialises CUDA itself); utilisation needs NVML (pynvml) and is left empty without it.
"""
from __future__ import annotations

import csv
import os
import sys
import threading
import time
from pathlib import Path

SYSTEM_METRICS_FILE = "system_metrics.csv"
COLUMNS = ("wall_time", "cpu_percent", "rss_mb", "gpu_memory_mb", "gpu_utilization")
DEFAULT_EVERY_S = 2.0


def _gpu_numbers() -> tuple[float | None, float | None]:
    torch = sys.modules.get("torch")       # only if this process already imported torch …
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():   # … and uses CUDA
        return None, None
    try:
        memory = torch.cuda.memory_reserved() / 2 ** 20
    except Exception:
        memory = None
    try:
        utilization = float(torch.cuda.utilization())
    except Exception:                       # no NVML
        utilization = None
    return memory, utilization


class SystemSampler:
    """Samples one process every `every_s` seconds into a CSV file (appending: a resumed run continues it)."""

    def __init__(self, path: str | os.PathLike, pid: int | None = None, every_s: float = DEFAULT_EVERY_S,
                 gpu: bool | None = None):
        import psutil

        self.path = Path(path)
        self.pid = pid or os.getpid()
        self.every_s = float(every_s)
        self.gpu = self.pid == os.getpid() if gpu is None else gpu   # torch's CUDA numbers are this process's
        self.process = psutil.Process(self.pid)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0

    def sample(self) -> dict:
        """One row: CPU % since the previous sample (100 = one core), RSS in MiB, GPU memory (MiB) / utilisation."""
        import psutil

        try:
            with self.process.oneshot():
                if self.process.status() == psutil.STATUS_ZOMBIE:     # exited, not yet reaped: nothing to measure
                    return {}
                cpu = self.process.cpu_percent(None)
                rss = self.process.memory_info().rss / 2 ** 20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return {}
        memory, utilization = _gpu_numbers() if self.gpu else (None, None)
        return {"wall_time": time.time(), "cpu_percent": cpu, "rss_mb": rss, "gpu_memory_mb": memory,
                "gpu_utilization": utilization}

    def write(self, row: dict) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(COLUMNS)
            writer.writerow(["" if row.get(c) is None else f"{row[c]:.6g}" if c != "wall_time" else f"{row[c]:.3f}"
                             for c in COLUMNS])
        self.samples += 1

    def _loop(self) -> None:
        self.sample()                       # primes cpu_percent (its first call has no interval to measure)
        while not self._stop.wait(self.every_s):
            row = self.sample()
            if not row:                     # the process is gone
                return
            try:
                self.write(row)
            except OSError:                 # the run folder was removed: nothing left to record
                return

    def start(self) -> "SystemSampler":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name=f"system-metrics-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "SystemSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_system_metrics(path: str | os.PathLike) -> list[dict]:
    """The samples of a run as dicts (numbers or None); [] when the run recorded none."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return []
    out = []
    for row in rows:
        try:
            out.append({c: (float(row[c]) if row.get(c) not in (None, "") else None) for c in COLUMNS})
        except ValueError:                  # a line cut by a crash mid-write
            continue
    return out
