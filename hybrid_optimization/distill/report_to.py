"""`--report_to`'s names and their check, torch-free (options.py validates with it before anything is imported;
the reporting itself is reporting.py)."""
from __future__ import annotations

import importlib.util
from typing import Any

REPORT_TO = ("tensorboard", "mlflow")
# name -> (the module it needs, the pyproject extra that installs it, the pinned requirement)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard", "tensorboard==2.21.0"),
            "mlflow": ("mlflow", "mlflow", "mlflow-skinny==3.17.2")}


def parse_report_to(value: Any) -> tuple[str, ...]:
    """"tensorboard,mlflow" / ["tensorboard"] / "none" / "" -> a tuple of lower-case names (not yet checked)."""
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = [p.strip().lower() for p in parts if p.strip()]
    return () if names in ([], ["none"]) else tuple(dict.fromkeys(names))


def report_to_error(names) -> str | None:
    """One line naming the first problem with `names` (an unknown back-end, or one whose package is missing), else
    None. Cheap: looks for the packages without importing them."""
    for name in parse_report_to(names):
        if name not in BACKENDS:
            return f"--report_to {name} is invalid: it must be a comma-separated list of {', '.join(REPORT_TO)}"
        module, extra, requirement = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            return (f"--report_to {name} needs the '{extra}' extra: pip install 'hybrid-optimization[{extra}]' "
                    f"(in a checkout: pip install {requirement})")
    return None
