"""Waits shared by the browser tests (as Streamlit's own e2e_playwright/shared/app_utils.py)."""


# What Streamlit's own e2e helper (wait_for_app_run) waits for: the script run has ended on a live connection.
APP_IDLE = "[data-testid=stApp][data-test-script-state=notRunning][data-test-connection-state=CONNECTED]"
CHARTS_DRAWN_JS = "() => Array.from(document.querySelectorAll('.js-plotly-plot')).every(p => p._fullLayout)"


def settle(page, timeout_ms: int = 60_000) -> None:
    """Wait until the page's script run has ended and every plotly chart on it has drawn: what a fixed sleep
    ("let the charts draw") guessed, without paying the guess on a fast page or failing it on a slow one."""
    page.wait_for_selector(APP_IDLE, timeout=timeout_ms)
    page.wait_for_function(CHARTS_DRAWN_JS, timeout=timeout_ms, polling=100)


def runs_so_far(runs_root) -> list[dict]:
    """The runs in a runs root, [] until its store exists *and has its tables*: the launcher's first write creates the
    runs.db file an instant before its schema, and a reader opening it in between is told the store is empty
    (StoreMissing), as the workbench's own pages are."""
    from hybrid_optimization.tracking import RunStore, StoreMissing

    try:
        return RunStore(runs_root, create=False).list_runs()
    except StoreMissing:
        return []
