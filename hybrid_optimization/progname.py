"""The name a command was run as, for its `usage:` and `error:` lines.

One CLI runs four ways: a console script (`hybrid-distill`), a script in the checkout (`distillation.py`), a module
(`python -m hybrid_optimization.distill`) or, in tests, a function called in-process. A fixed argparse `prog` names
only one of them, so `hybrid-distill --help` printed `usage: distillation.py`. argparse's own default
(the basename of sys.argv[0]) is right for the first two but gives `__main__.py` or the module's file name for `-m`.
"""
from __future__ import annotations

import sys
from pathlib import Path


def command_name(module: str, argv0: str | None = None) -> str:
    """`hybrid-distill` / `distillation.py` as typed, or `python -m MODULE` when run with -m (or with no argv[0])."""
    argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
    name = Path(argv0).name
    module_file = module.rsplit(".", 1)[-1] + ".py"
    if name in ("", "-c", "-m", "__main__.py", module_file):
        return f"python -m {module}"
    return name
