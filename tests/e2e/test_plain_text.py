"""Run names and errors are plain text in a real browser: a run named like a markdown image pointing at a local
HTTP server, with HTML in it, is shown literally on every run page, and the browser never requests the image."""
from __future__ import annotations

import http.server
import threading

import pytest

from hybrid_optimization.tracking import RunStore
from tests.e2e.app_utils import settle
from tests.fixtures.workbench_runs import write_synthetic_run

PAGES = (("live", "Live run"), ("summary", "Run summary"), ("clusters", "Clusters"), ("precision", "Precision"))


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_markdown_image_in_a_run_name_is_text_not_a_request(workbench_server, browser_page, screenshots_dir):
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):                                   # noqa: N802 (http.server's name)
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    trap = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    url, runs_root = workbench_server
    name = f"![x](http://127.0.0.1:{trap.server_address[1]}/p.png) <b>bold</b>"
    store = RunStore(runs_root)
    run_id = write_synthetic_run(store, 40, "finished", name=name, seed=0)
    page = browser_page
    try:
        for slug, heading in PAGES:
            page.goto(f"{url}/{slug}?run={run_id}")
            page.get_by_role("heading", name=heading).wait_for()
            settle(page)                     # drawn in full: a rendered image would have been requested by now
            main = page.locator("[data-testid=stMain]")
            if slug in ("live", "summary"):      # the pages that print the name in text, beside the picker
                assert name in main.inner_text(), slug
            assert main.locator("b", has_text="bold").count() == 0, slug
            assert main.locator("img[src*='p.png']").count() == 0, slug
        page.screenshot(path=str(screenshots_dir / "plain-run-name.png"), full_page=True)
    finally:
        trap.shutdown()
    assert hits == []
