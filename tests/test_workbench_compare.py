"""Compare (workbench/pages/compare.py) under AppTest, and the grouping / query / CSV / format helpers it uses
(workbench/queries.py), against run stores filled through the real RunWriter API."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from hybrid_optimization.schema import tags_problem
from hybrid_optimization.tracking import RunStore
from tests.fixtures.workbench_runs import write_synthetic_run
from workbench import headline, queries, ui

APP = str(Path(__file__).resolve().parents[1] / "app.py")
LR_A, LR_B = 1e-3, 3e-3


@pytest.fixture
def runs_root() -> Path:
    return Path(os.environ["HYBRID_RUNS_ROOT"])


@pytest.fixture
def seeds(runs_root):
    """Five seeds at one learning rate, three at another (the grouping a user wants: mean over seeds)."""
    store = RunStore(runs_root)
    ids = {LR_A: [], LR_B: []}
    for i in range(8):
        lr = LR_A if i < 5 else LR_B
        ids[lr].append(write_synthetic_run(store, 100, seed=i, name=f"seed-{i}", eval_every=20, n_samples=8,
                                           config={"base_learning_rate": lr, "seed": i}))
    return store, ids


def _open(at: AppTest | None = None, **params) -> AppTest:
    at = at or AppTest.from_file(APP, default_timeout=60)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    at.switch_page("workbench/pages/compare.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _decode(value):
    import base64
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    return value


def _figures(at: AppTest) -> dict[str, dict]:
    out = {}
    for chart in at.get("plotly_chart"):
        fig = json.loads(chart.proto.spec)
        for trace in fig["data"]:
            for key in ("x", "y"):
                if key in trace:
                    trace[key] = _decode(trace[key])
        title = (fig["layout"].get("title") or {}).get("text") or fig["data"][0]["type"] if fig["data"] else "empty"
        out[title] = fig
    return out


def _val_loss_by_step(store: RunStore, run_id: str) -> dict[int, float]:
    evals = queries.read_evals(store, run_id)
    rows = evals[evals.key == "val_loss"]
    return dict(zip(rows.step.astype(int), rows.value))


def test_grouping_draws_one_median_line_with_a_min_max_band_per_group(seeds):
    store, ids = seeds
    at = _open(runs=",".join(ids[LR_A] + ids[LR_B]), group="cfg.base_learning_rate")
    assert at.selectbox(key="compare_group").value == "cfg.base_learning_rate"
    val = _figures(at)["Validation loss (quantized)"]
    lines = {t["name"]: t for t in val["data"] if t.get("showlegend", True) is not False}
    assert set(lines) == {"base_learning_rate = 0.001 (n=5)", "base_learning_rate = 0.003 (n=3)"}
    per_run = [_val_loss_by_step(store, r) for r in ids[LR_A]]
    steps = sorted(per_run[0])
    line = lines["base_learning_rate = 0.001 (n=5)"]
    assert line["x"] == steps
    np.testing.assert_allclose(line["y"], [np.median([r[s] for r in per_run]) for s in steps])
    band = [t for t in val["data"] if t.get("legendgroup") == line["name"] and t is not line]
    low = next(t for t in band if t.get("fill") == "tonexty")
    high = next(t for t in band if t.get("fill") != "tonexty")
    np.testing.assert_allclose(low["y"], [min(r[s] for r in per_run) for s in steps])
    np.testing.assert_allclose(high["y"], [max(r[s] for r in per_run) for s in steps])
    # Mean ± std instead; the training loss (a step metric) is grouped too.
    at.radio(key="compare_stat").set_value("mean").run()
    at.radio(key="compare_band").set_value("± std").run()
    figures = _figures(at)
    line = next(t for t in figures["Validation loss (quantized)"]["data"] if t["name"].endswith("(n=5)"))
    np.testing.assert_allclose(line["y"], [np.mean([r[s] for r in per_run]) for s in steps])
    assert {t["name"] for t in figures["Training loss"]["data"] if t.get("showlegend", True) is not False} == set(lines)
    assert at.query_params["stat"] == ["mean"] or at.query_params["stat"] == "mean"
    # On the wall-time axis too: seconds since each run's first step.
    at.radio(key="compare_x").set_value("wall time").run()
    val = _figures(at)["Validation loss (quantized)"]
    line = next(t for t in val["data"] if t["name"].endswith("(n=5)"))
    assert val["layout"]["xaxis"]["title"]["text"] == "seconds since the run's first step"
    assert 0 < line["x"][0] < line["x"][-1] <= 100 * 0.05        # the synthetic runs take 0.05 s a step


def test_groups_as_table_rows_and_grouping_by_tag_and_kind(seeds, runs_root):
    store, ids = seeds
    at = _open(runs=",".join(ids[LR_A] + ids[LR_B]), group="cfg.base_learning_rate", rows="groups")
    table = at.dataframe[0].value.set_index("group")
    assert table.loc["base_learning_rate = 0.001", "runs"] == 5 and table.loc["base_learning_rate = 0.003", "runs"] == 3
    finals = [store.get_run(r)["summary"]["val_loss"] for r in ids[LR_B]]
    assert table.loc["base_learning_rate = 0.003", "Validation loss"] == pytest.approx(np.median(finals))
    for run_id in ids[LR_B]:
        store.set_tags(run_id, ["fast"])
    at = _open(runs=",".join(ids[LR_A] + ids[LR_B]), group="tag")
    names = {t["name"] for t in _figures(at)["Training loss"]["data"] if t.get("showlegend", True) is not False}
    assert names == {"fast (n=3)", "(no tag) (n=5)"}
    at.selectbox(key="compare_group").set_value("kind").run()
    names = {t["name"] for t in _figures(at)["Training loss"]["data"] if t.get("showlegend", True) is not False}
    assert names == {"hybrid (n=8)"}


def start_live_run(store: RunStore):
    """A run this process keeps 'running' (its pid is ours), with 40 logged steps; returns (run id, its writer)."""
    live = store.create_run({}, {}, "tiny", name="live", total_steps=10_000)
    writer = store.writer(live)
    writer.set_status("running")
    writer.set_pid(os.getpid())
    for step in range(1, 41):
        writer.log_step(step, loss=3.0 / step)
    return live, writer


def test_live_tick_reads_only_new_rows_of_the_running_runs(runs_root, monkeypatch):
    store = RunStore(runs_root)
    finished = [write_synthetic_run(store, 50, seed=i, name=f"done-{i}", n_samples=4) for i in range(3)]
    live, writer = start_live_run(store)
    writer.flush()
    reads = []
    original = RunStore.read_steps

    def counting(self, run_id, after_step=-1, **kwargs):
        if kwargs.get("columns") is not None:        # the charts' reads (the CSV reads every column, once per change)
            reads.append((run_id, after_step))
        return original(self, run_id, after_step=after_step, **kwargs)

    monkeypatch.setattr(RunStore, "read_steps", counting)
    at = _open(runs=",".join([live, *finished]), metrics="loss")
    assert sorted(r for r, after in reads if after == -1) == sorted([live, *finished])     # each read once in full
    assert all(after == 40 for r, after in reads if after != -1)
    assert "refreshed every" in " ".join(str(c.value) for c in at.caption)
    for step in range(41, 61):
        writer.log_step(step, loss=3.0 / step)
    writer.flush()
    reads.clear()
    at.run()                                   # the tick (AppTest never fires timers: run again)
    assert reads == [(live, 40)]               # only the running run, only rows after its cursor
    assert at.session_state["compare_tick"]["runs_read"] == 1
    loss = _figures(at)["Training loss"]
    live_line = next(t for t in loss["data"] if t["name"].startswith("live"))
    assert live_line["x"][-1] == 60
    writer.set_status("finished")
    writer.close()
    reads.clear()
    at.run()
    at.run()
    assert reads.count((live, 60)) <= 1        # finished: read once more for its status, then not at all
    assert "refreshed every" not in " ".join(str(c.value) for c in at.caption)


def test_view_persists_in_the_url_and_x_range_is_shared(seeds):
    store, ids = seeds
    chosen = ids[LR_A][:2]
    at = _open(runs=",".join(chosen), metrics="eval:val_loss,loss,lr_multiplier", smooth="0.3", x="step",
               xmin="10", xmax="60", logy="loss")
    assert at.multiselect(key="compare_metrics").value == ["eval:val_loss", "loss", "lr_multiplier"]
    assert at.slider(key="compare_smoothing").value == pytest.approx(0.3)
    figures = _figures(at)
    ranges = [f["layout"]["xaxis"].get("range") for title, f in figures.items() if f["data"][0]["type"] == "scatter"]
    assert len(ranges) == 3 and all(r == [10, 60] for r in ranges)
    assert figures["Training loss"]["layout"]["yaxis"]["type"] == "log"
    at.slider(key="compare_smoothing").set_value(0.8).run()
    at.radio(key="compare_x").set_value("wall time").run()
    params = {k: (v[0] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    assert params["smooth"] == "0.8" and params["x"] == "wall time" and params["xmin"] == "10.0"
    assert params["metrics"] == "eval:val_loss,loss,lr_multiplier"
    # Linked: one figure whose charts sit on ONE x axis (zoom, pan and hover move together: plotly's
    # hoversubplots="axis" spans only subplots of the same axis), each with its own y axis.
    at.radio(key="compare_layout").set_value("linked").run()
    linked = [f for f in _figures(at).values() if f["layout"].get("hoversubplots") == "axis"]
    assert len(linked) == 1 and {t["xaxis"] for t in linked[0]["data"]} == {"x"}
    assert len({t["yaxis"] for t in linked[0]["data"]}) == 3 and linked[0]["layout"]["hovermode"] == "x unified"
    assert linked[0]["layout"]["xaxis"]["range"] == [10, 60]          # the page's one x range
    params = {k: (v[0] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    assert params["layout"] == "linked"
    # A bookmark of that URL restores the same view in a fresh session.
    again = _open(**params)
    assert again.slider(key="compare_smoothing").value == pytest.approx(0.8)
    assert again.radio(key="compare_x").value == "wall time" and again.radio(key="compare_layout").value == "linked"


def test_run_table_query_filters_and_a_bad_query_is_one_clear_line(seeds):
    store, ids = seeds
    at = _open()
    at.button(key="compare_select_all").click().run()
    at.text_input(key="compare_query").input("base_learning_rate > 0.002 and kind = 'hybrid'").run()
    assert not at.error
    table = at.dataframe[0].value
    assert sorted(table["run id"]) == sorted(ids[LR_B])
    at.text_input(key="compare_query").input("val_los < 4").run()
    (error,) = at.error
    shown = error.value.replace("\\", "")          # the page escapes markdown: the text shows as written
    assert "no column 'val_los'" in shown and "\n" not in shown
    at.text_input(key="compare_query").input("val_loss <").run()
    (error,) = at.error
    shown = error.value.replace("\\", "")
    assert shown.startswith("query 'val_loss <' is invalid") and "\n" not in shown


def test_parallel_coordinates_are_readable(runs_root):
    store = RunStore(runs_root)
    ids = [write_synthetic_run(store, 40, seed=i, name=f"r{i}", n_samples=4, hybrid=i > 0,
                               config={"base_learning_rate": 10.0 ** -(2 + i), "data_clusters": 2 + i})
           for i in range(3)]
    at = _open(runs=",".join(ids))
    parcoords = next(f for f in _figures(at).values() if f["data"] and f["data"][0]["type"] == "parcoords")
    labels = [d["label"] for d in parcoords["data"][0]["dimensions"]]
    assert labels == ["kind", "data clusters", "base LR (log)", "Validation loss"]   # no booleans
    assert not (parcoords["layout"].get("title") or {}).get("text")      # the page heading names it once
    assert all(len(label) <= 16 for label in labels)


def test_csv_has_validation_metrics_and_empty_cells_and_table_formats(seeds):
    store, ids = seeds
    run_id = ids[LR_A][0]
    frame = pd.read_csv(io.BytesIO(queries.metrics_csv(store, [run_id])), keep_default_na=False)
    assert {"val_loss", "val_ppl", "kl_teacher", "top1_agreement"} <= set(frame.columns)
    assert frame.loc[frame.step == 20, "val_loss"].item() != "" and frame.loc[frame.step == 21, "val_loss"].item() == ""
    text = queries.metrics_csv(store, [run_id]).decode()
    assert "None" not in text and "nan" not in text.lower()
    # One format per number: Summary's (headline.VALUE_LABELS) as the table's column format.
    assert queries.column_format("{:,.0f}") == (1.0, "localized")
    assert queries.column_format("{:.4f}") == (1.0, "%.4f")
    assert queries.column_format("{:.1%}") == (100.0, "%.1f%%")
    assert queries.column_format("{:.2f}×") == (1.0, "%.2f×")
    assert queries.display_text(None) == "" and queries.display_text(float("nan")) == ""
    assert queries.display_text(0.000325789) == "0.0003258"
    with store.writer(run_id) as writer:       # Summary prints 294 for this; the table must not show 294.137
        writer.set_summary({**store.get_run(run_id)["summary"], "tokens_per_s": 294.137, "top1_agreement": 0.4567})
    at = _open(runs=",".join(ids[LR_A][:2]))
    table = at.dataframe[0].value.set_index("run id")
    assert table.at[run_id, headline.value_label("tokens_per_s")] == 294.0
    assert table.at[run_id, headline.value_label("top1_agreement")] == pytest.approx(45.67)      # shown as "%.1f%%": 45.7%
    diff = at.dataframe[-1].value
    assert "None" not in diff.to_string()


def test_group_series_median_band_and_runs_of_different_lengths():
    short = pd.DataFrame({"run": "a", "series": "loss", "x": [1, 2, 3], "raw": 0.0, "smooth": [3.0, 2.0, 1.0]})
    long = pd.DataFrame({"run": "b", "series": "loss", "x": [1, 2, 3, 4], "raw": 0.0, "smooth": [5.0, 4.0, 3.0, 2.0]})
    third = pd.DataFrame({"run": "c", "series": "loss", "x": [1, 3], "raw": 0.0, "smooth": [1.0, 3.0]})
    series = pd.concat([short, long, third], ignore_index=True)
    out = queries.group_series(series, {"a": "g", "b": "g", "c": "g"})
    assert out.x.tolist() == [1, 2, 3, 4] and out.n.tolist() == [3, 3, 3, 1]
    assert out.center.tolist() == [3.0, 2.0, 3.0, 2.0]          # c interpolated at x=2: 2.0
    assert out.low.tolist() == [1.0, 2.0, 1.0, 2.0] and out.high.tolist() == [5.0, 4.0, 3.0, 2.0]
    std = queries.group_series(series, {"a": "g", "b": "g", "c": "h"}, stat="mean", band="± std")
    g = std[std.group == "g"]
    assert g.center.iloc[0] == pytest.approx(4.0) and g.high.iloc[0] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="group statistic 'max' is invalid"):
        queries.group_series(series, {}, stat="max")


def test_table_edits_over_their_bound_are_one_line_and_nothing_is_saved(seeds, monkeypatch):
    """Tags and notes typed into the run table obey the store's bounds: a too-long tag is one error line (the
    page keeps working), a cleared cell clears the tags."""
    import streamlit

    store, ids = seeds
    run_id = ids[LR_A][0]
    store.set_tags(run_id, ["old"])
    edits: dict[str, object] = {}
    real_editor = streamlit.data_editor

    def editor(data, **kw):             # AppTest cannot type into a data editor: apply the user's edit here
        shown = real_editor(data, **kw)
        shown = shown.copy()
        for column, value in edits.items():
            shown.loc[shown["run id"] == run_id, column] = value
        return shown

    monkeypatch.setattr(streamlit, "data_editor", editor)
    edits["tags"] = "x" * 100
    at = _open(runs=run_id)
    assert [e.value for e in at.error] == [ui.plain(f"tags {tags_problem(['x' * 100])}")]    # markdown-escaped
    assert store.get_run(run_id)["tags"] == ["old"]
    edits["tags"] = None
    at = _open(runs=run_id)
    assert not at.error and store.get_run(run_id)["tags"] == []


def test_smoothing_is_numpy_alone_and_the_same_ema_at_every_weight():
    """The EMA behind every smoothed curve needs no scipy (its import cost a fresh server ~1 CPU-s on the first
    chart) and gives pandas' debiased ewm numbers at weights near 0 and near 1 and on long runs (blocks)."""
    import subprocess
    import sys
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 2000, 120_000):
        values = np.cumsum(rng.normal(size=n)) + 50
        for weight in (1e-6, 0.01, 0.6, 0.99, 0.9999):
            expected = queries.ema(pd.Series(values), weight).to_numpy()
            np.testing.assert_allclose(queries._ema_dense(values, weight), expected, rtol=1e-9)
    code = ("import sys, numpy as np, pandas as pd; from workbench import queries; "
            "queries.chart_series(pd.DataFrame({'step': np.arange(50), 'loss': np.ones(50)}), 'loss'); "
            "print(any(m.startswith('scipy.signal') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False", out.stderr


def test_group_series_from_per_run_frames_recomputes_only_groups_that_moved():
    """A live page passes run_series' per-run frames and a memo: the same numbers as the one-frame form, a group
    whose frames are the same objects is reused, and nothing changed returns the previous result itself."""
    rng = np.random.default_rng(0)
    frames = [queries.chart_series(pd.DataFrame({"step": np.arange(1, 301), "loss": rng.normal(size=300) + 3}),
                                   "loss", smoothing=0.6, max_points=100, run=f"r{i}") for i in range(6)]
    groups = {f"r{i}": ("a" if i < 3 else "b") for i in range(6)}
    memo: dict = {}
    first = queries.group_series(frames, groups, memo=memo)
    pd.testing.assert_frame_equal(first, queries.group_series(pd.concat(frames, ignore_index=True), groups))
    assert first.group.dtype == object and first.series.dtype == object
    assert queries.group_series(frames, groups, memo=memo) is first            # nothing moved: the same result
    line_a = memo[("a", "loss", "median", "min–max", queries.GROUP_GRID)][1]
    moved = list(frames)
    moved[4] = queries.chart_series(pd.DataFrame({"step": np.arange(1, 321), "loss": np.full(320, 9.0)}), "loss",
                                    smoothing=0.6, max_points=100, run="r4")
    again = queries.group_series(moved, groups, memo=memo)
    assert memo[("a", "loss", "median", "min–max", queries.GROUP_GRID)][1] is line_a      # group a: reused
    assert again[again.group == "b"].x.max() == 320 and again[again.group == "a"].x.max() == 300
    pd.testing.assert_frame_equal(again, queries.group_series(pd.concat(moved, ignore_index=True), groups))


def test_benchmark_reports_put_the_deciding_reports_first(tmp_path):
    for name in ("quick", "changes", "medium", "robustness", "full"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.md").write_text("# report\n")
    (tmp_path / "empty").mkdir()
    assert [p.name for p in queries.benchmark_reports(tmp_path)] == ["robustness", "full", "medium", "quick",
                                                                      "changes"]


def test_teacher_reference_column_gap_and_dashed_line_per_run_and_per_group(seeds):
    """Issue 16: each run's teacher validation loss (stored at set-up) is a table column with the student's gap to
    it, and a dashed line on the validation-loss chart — one per run, or the group's median when grouped."""
    store, ids = seeds
    chosen = ids[LR_A][:2] + ids[LR_B][:1]
    teacher = {chosen[0]: 2.5, chosen[1]: 2.75, chosen[2]: 3.0}
    for run_id, value in teacher.items():
        with store.writer(run_id) as writer:
            writer.set_teacher_val_loss(value)
    at = _open(runs=",".join(chosen), metrics="eval:val_loss,loss")
    table = at.dataframe[0].value.set_index("run id")
    assert table.loc[ids[LR_A][4], "Teacher's validation loss"] is None or pd.isna(
        table.loc[ids[LR_A][4], "Teacher's validation loss"])          # no reference stored: an empty cell
    for run_id, value in teacher.items():
        student = store.get_run(run_id)["summary"]["val_loss"]
        assert table.at[run_id, headline.value_label("teacher_val_loss")] == pytest.approx(value)
        assert table.at[run_id, headline.value_label("teacher_gap")] == pytest.approx(student - value)
    assert queries.column_format(headline.VALUE_LABELS["teacher_gap"][1]) == (1.0, "%+.4f")
    figures = _figures(at)
    dashed = [t for t in figures["Validation loss (quantized)"]["data"] if t.get("legendgroup") == "teacher"]
    assert sorted(t["y"][0] for t in dashed) == sorted(teacher.values())
    assert all(t["line"]["dash"] == "dash" and t["y"][0] == t["y"][1] for t in dashed)
    assert [t.get("showlegend", True) for t in dashed].count(True) == 1       # one legend entry toggles them all
    assert all(t["x"] == [20, 100] for t in dashed)                           # the run's evaluated span
    assert not [t for t in figures["Training loss"]["data"] if t.get("legendgroup") == "teacher"]
    # Grouped: one line per group at the median of its runs' teacher losses.
    at = _open(runs=",".join(chosen), metrics="eval:val_loss", group="cfg.base_learning_rate")
    dashed = [t for t in _figures(at)["Validation loss (quantized)"]["data"] if t.get("legendgroup") == "teacher"]
    assert sorted(t["y"][0] for t in dashed) == [pytest.approx(2.625), pytest.approx(3.0)]
    # Linked charts (one stacked figure): the lines sit on the validation-loss subplot, one legend entry.
    at.radio(key="compare_layout").set_value("linked").run()
    (linked,) = [f for f in _figures(at).values() if f["layout"].get("hoversubplots") == "axis"]
    dashed = [t for t in linked["data"] if t.get("legendgroup") == "teacher"]
    assert len(dashed) == 2 and {t["meta"] for t in dashed} == {"Validation loss (quantized)"}
    assert [t.get("showlegend", True) for t in dashed].count(True) == 1


def test_a_tick_without_a_new_evaluation_keeps_the_validation_chart(runs_root):
    """The live tick rebuilds only what moved: new steps redraw the training-loss chart, while the validation-loss
    chart (no evaluation since) keeps its figure, and the finished run's series are not recomputed."""
    store = RunStore(runs_root)
    done = write_synthetic_run(store, 60, seed=1, name="done", eval_every=20, n_samples=4)
    live, writer = start_live_run(store)
    writer.log_eval(40, val_loss=2.0)
    writer.flush()
    at = _open(runs=",".join([live, done]), metrics="eval:val_loss,loss")
    memos = at.session_state["compare_memos"]
    before = {m: memos[m]["figure"][2] for m in ("eval:val_loss", "loss")}

    def done_part(memos):         # the finished run's training-loss series the figure was drawn from
        return next(p for p in memos["loss"]["figure"][1] if p["run"].array[0] == done)

    finished_series = done_part(memos)
    for step in range(41, 51):
        writer.log_step(step, loss=3.0 / step)
    writer.flush()
    at.run()
    memos = at.session_state["compare_memos"]
    assert memos["eval:val_loss"]["figure"][2] is before["eval:val_loss"]     # no new evaluation: same figure
    assert memos["loss"]["figure"][2] is not before["loss"]                   # new steps: redrawn
    assert done_part(memos) is finished_series                                # not recomputed
    loss = _figures(at)["Training loss"]
    assert next(t for t in loss["data"] if t["name"].startswith("live"))["x"][-1] == 50
    writer.log_eval(50, val_loss=1.5)
    writer.flush()
    at.run()
    assert at.session_state["compare_memos"]["eval:val_loss"]["figure"][2] is not before["eval:val_loss"]
    writer.set_status("finished")
    writer.close()


def test_a_link_with_unreadable_view_parameters_says_so_in_one_line_and_keeps_the_rest(seeds):
    store, ids = seeds
    at = _open(runs=",".join(ids[LR_A][:2]), x="bogus", stat="max", smooth="nan", band="± std")
    (warning,) = at.warning
    shown = warning.value.replace("\\", "")
    assert shown == "The link's smooth=nan is ignored: not a number (and 2 more parameter(s) of this link)."
    assert at.radio(key="compare_x").value == "step" and at.radio(key="compare_band").value == "± std"
    assert at.slider(key="compare_smoothing").value == pytest.approx(queries.DEFAULT_SMOOTHING)
    assert not at.exception
