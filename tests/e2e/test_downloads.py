"""Downloads always deliver, in a real browser: the Summary page's Download buttons are clicked right after a rerun
starts (the moment a deferred `data=callable` used to be dropped, "MediaFileStorageError: Deferred file … not
found", and the click delivered nothing), and every click must hand over the file's exact bytes."""
from __future__ import annotations

import os

import pytest

from hybrid_optimization.tracking import RunStore
from tests.fixtures.workbench_runs import write_synthetic_run

CLICKS = 6


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_download_right_after_a_rerun_still_delivers_the_file(workbench_server, browser_page, screenshots_dir):
    url, runs_root = workbench_server
    store = RunStore(runs_root)
    run_id = write_synthetic_run(store, 40, "finished", name="download-me", seed=0)
    export = store.run_dir(run_id) / "model.ternary.safetensors"
    payload = os.urandom(300_000)
    export.write_bytes(payload)
    page = browser_page
    page.goto(f"{url}/summary?run={run_id}")
    page.get_by_role("heading", name="Run summary").wait_for()
    button = page.locator(".st-key-summary_download-export button")
    button.wait_for()
    delivered = []
    for delay_ms in (0, 50, 150, 300, 600, 1000)[:CLICKS]:
        page.get_by_role("heading", name="Run summary").click()   # focus the page, not an input: "r" reruns
        page.keyboard.press("r")
        page.wait_for_timeout(delay_ms)
        with page.expect_download(timeout=20_000) as info:
            button.click()
        delivered.append(open(info.value.path(), "rb").read() == payload)
    page.screenshot(path=str(screenshots_dir / "summary-downloads.png"), full_page=True)
    assert delivered == [True] * CLICKS, delivered
    assert not page.locator("[data-testid=stException]").count()
