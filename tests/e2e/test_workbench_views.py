"""End to end in a real browser (Debian Chromium): a tiny 2-trial sweep started from the Sweep page; Compare
overlaying validation loss of a baseline and a hybrid run; a constant-LR run's LR chart around its LR; `?run=ID`
links; and not one request leaving 127.0.0.1. Figures are read from plotly's own data in the page, not pixels."""
from __future__ import annotations

import time
from urllib.parse import urlparse

import pytest

from hybrid_optimization.config import HybridTrainingConfig
from hybrid_optimization.tracking import RunStore
from tests.e2e.app_utils import runs_so_far, settle
from tests.fixtures.workbench_runs import write_synthetic_run

# The plotly figure titled `title` on the page: its traces (name, type, number of points) and y-axis range.
FIGURE_JS = """(title) => {
  const plots = Array.from(document.querySelectorAll('.js-plotly-plot')).filter(p =>
      p.layout && p.layout.title && String(p.layout.title.text).replace(/<[^>]+>/g, '') === title);
  if (!plots.length || !plots[0]._fullData) return null;
  const p = plots[0];
  return {traces: p._fullData.map(t => ({name: t.name, type: t.type, n: t._length || 0,
                                         y: t.y ? Array.from(t.y).slice(0, 5) : null})),
          yrange: p._fullLayout.yaxis ? p._fullLayout.yaxis.range : null};
}"""
# Live's chart `title` (a subplot of its stacked figure, traces found by `meta`): traces and its y-axis range.
LIVE_PANEL_JS = """(title) => {
  for (const p of Array.from(document.querySelectorAll('.js-plotly-plot'))) {
    if (!p._fullData) continue;
    const traces = p._fullData.filter(t => t.meta === title);
    if (!traces.length) continue;
    const axis = p._fullLayout['yaxis' + traces[0].yaxis.slice(1)];
    return {traces: traces.map(t => ({name: t.name, type: t.type, n: t._length || 0,
                                      y: t.y ? Array.from(t.y).slice(0, 5) : null})),
            yrange: axis ? axis.range : null};
  }
  return null;
}"""
PARCOORDS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).some(p =>
    p._fullData && p._fullData.some(t => t.type === 'parcoords' && t.dimensions && t.dimensions.length >= 2))"""


def _record_requests(page) -> list[str]:
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    return seen


def _foreign(requests: list[str]) -> list[str]:
    return [u for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")
            and urlparse(u).hostname != "127.0.0.1"]


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_links_compare_and_constant_lr_in_a_real_browser(workbench_server, browser_page, screenshots_dir):
    url, runs_root = workbench_server
    store = RunStore(runs_root)
    baseline = write_synthetic_run(store, 80, "finished", name="adamw-baseline", seed=0, hybrid=False)
    hybrid = write_synthetic_run(store, 80, "finished", name="hybrid-ternary", seed=1)
    page = browser_page
    requests = _record_requests(page)

    # A ?run= link opens that run (not the newest one), and its constant LR is drawn around the LR.
    page.goto(f"{url}/live?run={baseline}")
    page.get_by_role("heading", name="Live run").wait_for()
    page.wait_for_function(f"() => ({LIVE_PANEL_JS})('Learning rate') !== null", timeout=60_000)
    lr = page.evaluate(LIVE_PANEL_JS, "Learning rate")
    value = HybridTrainingConfig().base_learning_rate
    low, high = lr["yrange"]
    assert 0 < low < value < high < 2 * value, lr
    assert page.get_by_text(f"adamw-baseline ({baseline})").count() >= 1
    assert f"run={baseline}" in page.url
    page.screenshot(path=str(screenshots_dir / "live-baseline-link.png"), full_page=True)

    # Compare overlays validation loss of the baseline and the hybrid run (?runs= names the comparison).
    page.goto(f"{url}/compare?runs={baseline},{hybrid}")
    page.get_by_role("heading", name="Compare runs").wait_for()
    title = "Validation loss (quantized)"
    page.wait_for_function(f"() => ({FIGURE_JS})('{title}') !== null", timeout=60_000)
    val = page.evaluate(FIGURE_JS, title)
    names = {t["name"] for t in val["traces"] if t["n"] > 0}
    assert names == {f"adamw-baseline ({baseline})", f"hybrid-ternary ({hybrid})"}, val
    page.wait_for_function(PARCOORDS_JS, timeout=30_000)
    settle(page)
    page.screenshot(path=str(screenshots_dir / "compare-validation.png"), full_page=True)
    assert _foreign(requests) == [], _foreign(requests)


@pytest.mark.e2e
@pytest.mark.timeout(1500)
def test_tiny_sweep_from_the_sweep_page(workbench_server, browser_page, screenshots_dir):
    url, runs_root = workbench_server
    page = browser_page
    requests = _record_requests(page)
    page.goto(f"{url}/sweep")
    page.get_by_role("heading", name="Sweep").wait_for()
    # Two trials: the sweep's median pruner compares a trial with earlier ones only from the third on
    # (n_startup_trials=2), so both must complete; a third trial with unseeded suggestions was pruned (and tagged
    # "pruned") at random. Pruning through the store is test_sweep.py's test_median_pruner_stops_a_trailing_trial.
    for label, value in (("Sweep name", "browser-sweep"), ("Trials", "2"), ("Steps per trial", "10")):
        box = page.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Enter")
        page.wait_for_timeout(400)
    page.screenshot(path=str(screenshots_dir / "sweep-form.png"), full_page=True)
    started = time.monotonic()
    page.get_by_role("button", name="Start sweep").click()
    page.get_by_role("tab", name="Results").wait_for()
    # Both trials finish (each a tiny training run); the page refreshes itself while the sweep runs.
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        runs = runs_so_far(runs_root)
        if len(runs) == 2 and all(r["status"] in ("finished", "stopped", "failed") for r in runs):
            break
        time.sleep(2)
    elapsed = time.monotonic() - started
    assert sorted(r["name"] for r in runs) == ["browser-sweep-0", "browser-sweep-1"], runs
    assert all(r["status"] == "finished" and r["tags"] == ["sweep:browser-sweep"] for r in runs), runs
    import optuna
    study = optuna.load_study(study_name="browser-sweep", storage=f"sqlite:///{runs_root.resolve() / 'sweeps.db'}")
    while time.monotonic() < deadline and any(not t.state.is_finished() for t in study.get_trials()):
        time.sleep(1)                    # the sweep records the last trial's value after its run ends
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]
    page.get_by_role("tab", name="Results").click()
    # .first: the results refresh every 2 s while the sweep process lives, and during a refresh Streamlit briefly
    # keeps the stale button beside the new one (one CI run saw two; the page has one, key "sweep_launch_best")
    page.get_by_role("button", name="Launch with this config").first.wait_for(timeout=180_000)
    page.wait_for_function(f"() => ({FIGURE_JS})('History: final validation loss per trial, best so far') !== null",
                           timeout=120_000, polling=1000)
    settle(page)                         # the results refresh every 2 s while the sweep process lives
    page.screenshot(path=str(screenshots_dir / "sweep-results.png"), full_page=True)
    assert _foreign(requests) == [], _foreign(requests)
    print(f"2-trial tiny sweep from the Sweep page: {elapsed:.0f} s")
