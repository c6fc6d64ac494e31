"""End to end in a real browser (Debian Chromium): Live with other runs overlaid and grouped — a median line over
a min–max band of 5 seeds, opened from a link that names the whole view — with the teacher's held-out loss as a
line on the validation loss, and its charts linked: hovering one chart reads every chart at that step, and zooming
one zooms them all (one figure, one shared x axis)."""
from __future__ import annotations

from urllib.parse import urlencode

import pytest

from hybrid_optimization.tracking import RunStore
from tests.fixtures.workbench_runs import write_synthetic_run

# Live's chart `title` (a subplot of the stacked figure; its traces carry the title as `meta`).
PANEL_JS = """(title) => {
  for (const p of Array.from(document.querySelectorAll('.js-plotly-plot'))) {
    if (!p._fullData) continue;
    const traces = p._fullData.filter(t => t.meta === title);
    if (!traces.length) continue;
    return traces.map(t => ({name: t.name, n: t._length || 0, fill: t.fill, xaxis: t.xaxis, yaxis: t.yaxis,
                             legend: t.showlegend}));
  }
  return null;
}"""
# Screen position of the middle of the subplot on y axis `axis` ('y', 'y2', ...) of the Live figure.
CENTRE_JS = """(axis) => {
  const p = Array.from(document.querySelectorAll('.js-plotly-plot')).find(p => p._fullData &&
      p._fullData.some(t => t.meta));
  const box = p.getBoundingClientRect(), xa = p._fullLayout.xaxis, ya = p._fullLayout['yaxis' + axis.slice(1)];
  p.scrollIntoView({block: 'center'});
  return {x: box.left + xa._offset + xa._length / 2, y: box.top + ya._offset + ya._length / 2,
          width: xa._length, range: xa.range.slice()};
}"""
HOOK_JS = """() => {
  const p = Array.from(document.querySelectorAll('.js-plotly-plot')).find(p => p._fullData &&
      p._fullData.some(t => t.meta));
  window.__hovered = null;
  p.on('plotly_hover', e => { window.__hovered = e.points.map(pt => pt.data.meta); });
}"""


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_live_groups_overlays_into_a_band_and_links_hover_and_zoom(workbench_server, browser_page, screenshots_dir):
    url, runs_root = workbench_server
    store = RunStore(runs_root)
    main = write_synthetic_run(store, 300, "finished", name="this-run", seed=0)
    with store.writer(main) as w:
        w.set_teacher_val_loss(1.5)            # the teacher's held-out loss: a reference line on validation loss
    seeds = [write_synthetic_run(store, 300, "finished", name=f"lr3e-3-seed{i}", seed=i + 1,
                                 config={"base_learning_rate": 3e-3}) for i in range(5)]
    page = browser_page
    charts = ["Loss", "Learning rate", "Validation loss"]
    query = [("run", main), *(("chart", c) for c in charts), *(("overlay", s) for s in seeds),
             ("group", "cfg.base_learning_rate")]
    page.goto(f"{url}/live?{urlencode(query)}")
    page.get_by_role("heading", name="Live run").wait_for()
    page.wait_for_function(f"() => {{ const t = ({PANEL_JS})('Loss'); return t && t.some(x => x.fill); }}",
                           timeout=90_000, polling=250)
    loss = page.evaluate(PANEL_JS, "Loss")
    legend = [t["name"] for t in loss if t["legend"]]
    assert legend == [f"this-run ({main})", "base_learning_rate = 0.003 (n=5)"], loss
    assert any(t["fill"] == "tonexty" and t["n"] > 10 for t in loss)          # the band over the 5 seeds
    assert page.locator(".js-plotly-plot .scatterlayer .trace .fills path").count() >= 2   # drawn, not just data
    # One figure, one x axis: every chart's traces sit on 'x' (the others on their own y axes).
    panels = {title: page.evaluate(PANEL_JS, title) for title in charts}
    assert {t["xaxis"] for traces in panels.values() for t in traces} == {"x"}
    assert len({traces[0]["yaxis"] for traces in panels.values()}) == 3
    teacher = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap(p =>
        (p._fullLayout && p._fullLayout.shapes || []).map(s => ({label: s.label && s.label.text, y: s.y0,
                                                                  yref: s.yref})))""")
    assert teacher == [{"label": "teacher 1.5", "y": 1.5, "yref": panels["Validation loss"][0]["yaxis"]}], teacher
    page.wait_for_timeout(1000)
    page.screenshot(path=str(screenshots_dir / "live-grouped-band.png"), full_page=True)

    # Hover over the loss chart: the hover reads the learning-rate chart at the same step too.
    page.evaluate(HOOK_JS)
    centre = page.evaluate(CENTRE_JS, loss[0]["yaxis"])
    page.mouse.move(centre["x"] - 40, centre["y"])
    page.mouse.move(centre["x"], centre["y"], steps=5)
    page.wait_for_function("() => window.__hovered !== null", timeout=10_000)
    hovered = set(page.evaluate("() => window.__hovered"))
    assert {"Loss", "Learning rate"} <= hovered, hovered

    # Zoom by dragging across the loss chart: the shared x axis narrows, so every chart shows the same steps.
    before = centre["range"]
    page.mouse.move(centre["x"] - centre["width"] * 0.3, centre["y"])
    page.mouse.down()
    page.mouse.move(centre["x"] + centre["width"] * 0.1, centre["y"], steps=8)
    page.mouse.up()
    page.wait_for_timeout(800)
    after = page.evaluate(CENTRE_JS, panels["Learning rate"][0]["yaxis"])["range"]
    assert after[1] - after[0] < 0.7 * (before[1] - before[0]), (before, after)
    page.screenshot(path=str(screenshots_dir / "live-zoomed-together.png"), full_page=True)
