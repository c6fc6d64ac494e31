"""The system-metrics sampler: CPU % and RSS of a process every few seconds into the run folder's CSV, readable
back (a cut last line is skipped), and stopping when the watched process is gone."""
from __future__ import annotations

import subprocess
import sys
import time

from hybrid_optimization.system_metrics import COLUMNS, SystemSampler, read_system_metrics


def test_sampler_records_cpu_and_memory_of_a_busy_child(tmp_path):
    path = tmp_path / "system_metrics.csv"
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    sampler = SystemSampler(path, pid=child.pid, every_s=0.5).start()
    child.wait()
    time.sleep(1.0)                       # the sampler notices the process is gone and ends by itself
    sampler.stop()
    rows = read_system_metrics(path)
    assert len(rows) >= 3
    assert all(r["rss_mb"] > 1 for r in rows)
    assert max(r["cpu_percent"] for r in rows) > 20          # a busy loop shows as CPU time (100 = one core)
    assert all(r["gpu_memory_mb"] is None for r in rows)     # another process: no GPU numbers claimed
    assert [r["wall_time"] for r in rows] == sorted(r["wall_time"] for r in rows)


def test_reading_skips_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "system_metrics.csv"
    path.write_text(",".join(COLUMNS) + "\n1.0,50,100,,\n2.0,5x")
    assert read_system_metrics(path) == [{"wall_time": 1.0, "cpu_percent": 50.0, "rss_mb": 100.0,
                                          "gpu_memory_mb": None, "gpu_utilization": None}]
    assert read_system_metrics(tmp_path / "none.csv") == []
