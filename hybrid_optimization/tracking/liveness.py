"""Is a run's trainer still alive? The rule that turns a vanished process into a `lost` run.

On the run's own host the process id decides (a live pid wins over a stale heartbeat: a launcher's queued run
whose CLI is still importing torch, or a trainer busy in one long step, is not lost). For a run of another host,
or one without a pid, only the heartbeat can tell: silent for longer than `stale_after_s` means lost.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

DEFAULT_STALE_AFTER_S = 30.0


def pid_alive(pid: int | None) -> bool:
    """True if a process with this pid exists on this host and is not a zombie (exited, never reaped)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        # /proc/<pid>/stat: "pid (comm) state ..."; comm may contain spaces, so split after the last ')'.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill is all we can know


def lost_reason(pid: int | None, host: str | None, heartbeat: float | None,
                stale_after_s: float = DEFAULT_STALE_AFTER_S, now: float | None = None,
                this_host: str | None = None) -> str | None:
    """Why an active run counts as lost, or None while it may still be alive."""
    now = time.time() if now is None else now
    this_host = socket.gethostname() if this_host is None else this_host
    if pid and host == this_host:
        return None if pid_alive(pid) else f"its process (pid {pid}) is gone"
    if heartbeat is None or now - heartbeat > stale_after_s:
        return f"no heartbeat for more than {stale_after_s:g} s"
    return None
