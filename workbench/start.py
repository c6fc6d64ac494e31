"""`hybrid-workbench`: start the Streamlit app (`streamlit run app.py`) from any directory.

app.py is installed beside the `workbench` package (pyproject.toml), so it is found next to this package whether it
runs from a checkout or from site-packages. Streamlit reads `.streamlit/config.toml` only from the working directory,
so the checkout's settings (listen on 127.0.0.1 only, the upload cap, no usage statistics) are passed as flags;
flags given after `--` go to `streamlit run` as they are (e.g. `hybrid-workbench -- --server.port 8600`).
"""
from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app.py"
CHECKOUT_CONFIG = APP.parent / ".streamlit" / "config.toml"
# The same settings as the checkout's .streamlit/config.toml (tests/test_install.py checks they agree).
SETTINGS = {
    "server": {"address": "127.0.0.1", "headless": True, "maxUploadSize": 50, "runOnSave": False,
               "fileWatcherType": "none"},
    "browser": {"gatherUsageStats": False, "serverAddress": "127.0.0.1"},
    "client": {"toolbarMode": "minimal"},
    "runner": {"fastReruns": True},
}


def settings() -> dict:
    """The checkout's .streamlit/config.toml when there is one (its values win), else the built-in copy."""
    if CHECKOUT_CONFIG.is_file():
        with open(CHECKOUT_CONFIG, "rb") as f:
            return tomllib.load(f)
    return SETTINGS


def streamlit_argv(extra: list[str]) -> list[str]:
    flags = []
    for section, values in settings().items():
        for key, value in values.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            flags.append(f"--{section}.{key}={text}")
    return [sys.executable, "-m", "streamlit", "run", str(APP), *flags, *extra]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="hybrid-workbench",
        description="Start the Hybrid Optimization Workbench (Streamlit) on http://127.0.0.1:8501. Runs are read "
                    "from --runs_root (default $HYBRID_RUNS_ROOT or ~/.cache/hybrid-workbench/runs).",
        epilog="Arguments after -- go to `streamlit run` (e.g. -- --server.port 8600).")
    parser.add_argument("--runs_root", metavar="DIR", help="run store folder shown by the app")
    args = parser.parse_args(own)
    if not APP.is_file():
        print(f"error: the workbench app {APP} is missing: reinstall with pip install '.[workbench]'",
              file=sys.stderr)
        return 2
    try:
        import streamlit  # noqa: F401
    except ImportError:
        print("error: the workbench needs the 'workbench' extra: pip install 'hybrid-optimization[workbench]' "
              "(or pip install -r requirements.txt in a checkout)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.runs_root:
        env["HYBRID_RUNS_ROOT"] = str(Path(args.runs_root).expanduser().resolve())
    # Run from the app's folder, as `streamlit run app.py` in the checkout does.
    os.chdir(APP.parent)
    os.execvpe(sys.executable, streamlit_argv(extra), env)
    return 0          # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
