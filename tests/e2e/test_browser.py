"""End to end in a real browser: launch a `tiny` run from the form, watch its loss chart grow live, stop it, and
look at every page of the finished-by-stop run. Screenshots go to a temporary folder (see conftest.py)."""
from __future__ import annotations

import time

import pytest

from hybrid_optimization.tracking import RunStore
from tests.e2e.app_utils import runs_so_far, settle

# Points drawn in Live's chart `title` (-1: no such chart on the page). Live's charts are subplots of one figure;
# each trace's `meta` names its chart, and plotly.js keeps the decoded traces (with their length) in _fullData.
POINTS_JS = """(title) => {
  const traces = Array.from(document.querySelectorAll('.js-plotly-plot')).filter(p => p._fullData)
      .flatMap(p => p._fullData.filter(t => t.meta === title));
  if (!traces.length) return -1;
  return Math.max(0, ...traces.map(t => t._length || 0));
}"""
MAX_STEPS = 1000         # long enough to watch it grow and stop it midway (tiny: up to ~10 steps/s on 2 cores)
FIRST_STEP_TIMEOUT_S = 900  # a cold cache trains the tiny teacher first (minutes); warm: seconds


def _status(runs_root, run_id: str) -> str:
    return RunStore(runs_root, create=False).get_run(run_id)["status"]


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_launch_watch_stop_in_a_real_browser(workbench_server, browser_page, screenshots_dir):
    url, runs_root = workbench_server
    page = browser_page
    page.goto(url)
    page.get_by_role("heading", name="Configure & launch").wait_for()
    max_steps = page.get_by_role("spinbutton", name="max_steps")
    max_steps.fill(str(MAX_STEPS))
    max_steps.press("Enter")
    name = page.get_by_role("textbox", name="Run name (optional)")
    name.fill("browser-test")
    name.press("Enter")
    page.wait_for_timeout(500)
    page.screenshot(path=str(screenshots_dir / "1-configure.png"), full_page=True)
    clicked = time.time()
    page.get_by_role("button", name="Launch").click()

    # Launch returns at once (training runs in the background): the run's record is created within seconds of the
    # click, by the form's own rerun — the time the store recorded, not when this test looked.
    deadline, runs = time.monotonic() + 60, []
    while not runs and time.monotonic() < deadline:
        time.sleep(0.2)
        runs = runs_so_far(runs_root)
    assert len(runs) == 1, runs
    run_id = runs[0]["run_id"]
    assert runs[0]["created_at"] - clicked < 10, runs[0]["created_at"] - clicked
    # Then the page switches to Live: one more page run in the app, which on a machine loaded by the training
    # process it just started (and by other tests) can take well over the 30 s this once waited (the default: 60 s).
    page.get_by_role("heading", name="Live run").wait_for()
    assert "/live" in page.url

    page.wait_for_function(f"() => ({POINTS_JS})('Loss') >= 2", timeout=FIRST_STEP_TIMEOUT_S * 1000, polling=500)
    first = page.evaluate(POINTS_JS, "Loss")
    # No reload, no click: the fragment refreshes the chart with the new rows.
    page.wait_for_function(f"() => ({POINTS_JS})('Loss') > {first + 5}", timeout=120_000, polling=250)
    grown = page.evaluate(POINTS_JS, "Loss")
    assert grown > first and _status(runs_root, run_id) == "running"
    page.screenshot(path=str(screenshots_dir / "2-live-running.png"), full_page=True)

    page.get_by_role("button", name="Stop").click()
    deadline = time.monotonic() + 120
    while _status(runs_root, run_id) != "stopped" and time.monotonic() < deadline:
        time.sleep(0.5)
    run = RunStore(runs_root, create=False).get_run(run_id)
    assert run["status"] == "stopped" and 0 < run["step"] < MAX_STEPS
    page.get_by_text("stopped", exact=True).first.wait_for(timeout=30_000)
    page.get_by_role("button", name="Resume").first.wait_for()      # .first: a refresh may briefly keep a stale one
    settle(page)                         # the full-page redraw after the status change
    page.screenshot(path=str(screenshots_dir / "3-live-stopped.png"), full_page=True)

    for n, (slug, heading) in enumerate((("clusters", "Clusters"), ("precision", "Precision"),
                                         ("compare", "Compare runs"), ("summary", "Run summary"),
                                         ("benchmarks", "Benchmarks")), start=4):
        page.goto(f"{url}/{slug}")
        page.get_by_role("heading", name=heading).wait_for()
        settle(page)                         # the charts drawn
        assert not page.locator("[data-testid=stException]").count(), slug
        page.screenshot(path=str(screenshots_dir / f"{n}-{slug}.png"), full_page=True)
