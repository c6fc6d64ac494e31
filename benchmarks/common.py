"""Small helpers shared by the benchmark scripts: timing, environment description, report writing."""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment() -> str:
    import torch
    import sklearn
    cpu = platform.processor() or platform.machine()
    return (f"{_dt.datetime.now().isoformat(timespec='seconds')} · Python {platform.python_version()} · "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads) · scikit-learn {sklearn.__version__} · "
            f"{os.cpu_count()} CPU cores ({cpu}) · command: {' '.join(sys.argv)}")
