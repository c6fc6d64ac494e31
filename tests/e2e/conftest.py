"""Fixtures of the end-to-end test: a real `streamlit run app.py` on a free localhost port with a temporary runs
root, and Debian's headless Chromium driven by Playwright (never `playwright install`: no browser download)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _missing_browser() -> str | None:
    if not Path(CHROMIUM).exists():
        return (f"Debian chromium is not installed at {CHROMIUM}: "
                "apt-get update && apt-get install -y chromium chromium-driver")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright for Python is not installed (pip install -r requirements-dev.txt)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _missing_browser()
    if reason:
        for item in items:
            if "e2e" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"streamlit was not healthy within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def screenshots_dir(tmp_path) -> Path:
    folder = tmp_path / "screenshots"
    folder.mkdir()
    yield folder
    # Set WORKBENCH_SCREENSHOTS_DIR to keep the screenshots (e.g. for the project's notes).
    keep = os.environ.get("WORKBENCH_SCREENSHOTS_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in folder.glob("*.png"):
            shutil.copy(shot, Path(keep) / shot.name)


@pytest.fixture
def workbench_server(tmp_path):
    """(url, runs_root): the app on a free port. The training runs it launches use HYBRID_TEST_CACHE_DIR when set
    (a warm cache of the tiny teacher makes a run start in seconds), else the test session's cache."""
    runs_root = tmp_path / "runs"
    port = free_port()
    log = tmp_path / "streamlit.log"
    env = dict(os.environ, HYBRID_RUNS_ROOT=str(runs_root), PYTHONUNBUFFERED="1")
    if os.environ.get("HYBRID_TEST_CACHE_DIR"):
        env["HYBRID_CACHE_DIR"] = os.environ["HYBRID_TEST_CACHE_DIR"]
    argv = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address",
            "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url, runs_root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _stop_training_processes(runs_root)


def _stop_training_processes(runs_root: Path) -> None:
    """Training processes have their own sessions (they outlive the app by design): end the test's ones."""
    from hybrid_optimization.tracking import RunStore, StoreError
    from workbench import queries
    from workbench import launcher
    try:
        runs = queries.list_runs(RunStore(runs_root, create=False), include_archived=True)
    except StoreError:
        return
    for run in runs.to_dict("records"):
        if run["status"] in ("queued", "running"):
            launcher.terminate(run, signal.SIGKILL)


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 2000})  # tall: screenshots show whole pages
        page.set_default_timeout(60_000)
        try:
            yield page
        finally:
            browser.close()
