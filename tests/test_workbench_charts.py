"""Workbench maths (workbench/queries.py) and the pure figure builders (workbench/charts.py)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from hybrid_optimization.tracking import RunStore
from tests.fixtures.workbench_runs import write_synthetic_run
from workbench import charts, queries


# -- smoothing, rates, downsampling ---------------------------------------------------------------------------------
def test_ema_is_tensorboards_debiased_ema():
    values = pd.Series([1.0, 2.0, np.nan, 4.0, 3.0])
    weight = 0.6
    # TensorBoard: last = last*w + (1-w)*x; debiased by 1 - w^n over the n finite points seen so far.
    expected, last, n = [], 0.0, 0
    for x in values:
        if np.isnan(x):
            expected.append(np.nan)
            continue
        n += 1
        last = last * weight + (1 - weight) * x
        expected.append(last / (1 - weight ** n))
    np.testing.assert_allclose(queries.ema(values, weight).to_numpy(), expected, equal_nan=True)
    assert queries.ema(values, 0.0).equals(values)
    assert queries.ema(pd.Series([5.0] * 10), 0.9).tolist() == pytest.approx([5.0] * 10)
    with pytest.raises(ValueError, match=r"smoothing weight 1.0 is invalid: it must be in \[0, 1\)"):
        queries.ema(values, 1.0)


def test_running_rate_of_constraint_activation():
    active = pd.Series([1, 0, 1, 1] + [0] * 6, dtype=float)
    rate = queries.running_rate(active, window=4)
    assert rate.iloc[0] == 1.0 and rate.iloc[3] == 0.75 and rate.iloc[-1] == 0.0


def test_downsampling_keeps_shape_spikes_and_ends():
    rng = np.random.default_rng(0)
    values = rng.normal(size=100_000)
    values[12_345] = 50.0      # a loss spike
    values[77_777] = -50.0
    idx = queries.downsample_indices(values, 2000)
    assert len(idx) <= 2000 and np.all(np.diff(idx) > 0)
    assert {0, 99_999, 12_345, 77_777} <= set(idx.tolist())
    assert np.array_equal(queries.downsample_indices(values[:1500], 2000), np.arange(1500))


def test_chart_series_smooths_every_point_then_downsamples():
    steps = pd.DataFrame({"step": np.arange(100_000), "loss": np.linspace(5, 1, 100_000)})
    series = queries.chart_series(steps, "loss", smoothing=0.6, run="r1")
    assert len(series) <= queries.MAX_POINTS
    assert list(series.columns) == ["run", "series", "x", "raw", "smooth"]
    assert series.x.iloc[0] == 0 and series.x.iloc[-1] == 99_999
    assert series.smooth.iloc[-1] > series.raw.iloc[-1]   # EMA of a falling line lags above it
    assert queries.chart_series(steps, "trust_radius").empty
    assert queries.chart_series(steps.assign(q=np.nan), "q").empty


def test_progress_eta_and_duration():
    steps = pd.DataFrame({"step": np.arange(1, 51), "wall_time": np.arange(50) * 0.5, "tokens_per_s": 1000.0})
    info = queries.progress({"step": 50, "total_steps": 200, "status": "running"}, steps)
    assert info["fraction"] == 0.25 and info["steps_per_s"] == pytest.approx(2.0)
    assert info["eta_s"] == pytest.approx(75.0) and info["tokens_per_s"] == 1000.0
    assert queries.progress({"step": 50, "total_steps": 200, "status": "finished"}, steps)["eta_s"] is None
    assert queries.format_duration(75) == "1m 15s" and queries.format_duration(3 * 3600 + 60) == "3h 01m"
    assert queries.format_duration(None) == "—"


# -- incremental reading ----------------------------------------------------------------------------------------------
class CountingStore:
    """Wraps a RunStore to record the after_step of every read_steps call."""

    def __init__(self, store):
        self.store, self.after = store, []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def read_steps(self, run_id, after_step=-1, **kwargs):
        self.after.append(after_step)
        return self.store.read_steps(run_id, after_step=after_step, **kwargs)


def test_run_cache_reads_only_new_rows(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create_run({}, [], "tiny")
    writer = store.writer(run_id)
    writer.set_status("running")
    for step in range(1, 101):
        writer.log_step(step, loss=1.0)
    writer.log("one")
    writer.flush()
    counting = CountingStore(store)
    cache = queries.RunCache(run_id)
    assert cache.refresh(counting, store.get_run(run_id)) == 100
    for step in range(101, 151):
        writer.log_step(step, loss=1.0)
    writer.log("two")
    writer.flush()
    assert cache.refresh(counting, store.get_run(run_id)) == 50
    assert cache.refresh(counting, store.get_run(run_id)) == 0
    assert counting.after == [-1, 100, 150]
    assert list(cache.steps.step) == list(range(1, 151)) and cache.logs.message.tolist() == ["one", "two"]
    writer.set_status("stopped")
    cache.refresh(counting, store.get_run(run_id))
    writer.set_status("running")       # resumed: the steps after its checkpoint may be rewritten -> start over
    cache.refresh(counting, store.get_run(run_id))
    assert counting.after[-1] == -1 and len(cache.steps) == 150
    # Only the columns on screen are read; a new chart's column triggers one full re-read with it.
    narrow = queries.RunCache(run_id)
    narrow.refresh(store, store.get_run(run_id), columns=("loss",))
    assert list(narrow.steps.columns) == ["step", "wall_time", "loss"]
    narrow.refresh(store, store.get_run(run_id), columns=("trust_radius", "loss"))
    assert list(narrow.steps.columns) == ["step", "wall_time", "loss", "trust_radius"] and len(narrow.steps) == 150
    assert queries.columns_for(["Loss", "Constraint activation (running rate)"]) == (
        "loss", "constraint_active", "tokens_per_s")
    writer.close()


# -- summaries, sizes, diffs, CSV -------------------------------------------------------------------------------------
def test_plan_size_is_parameter_weighted():
    plan = pd.DataFrame({"layer": ["a", "b"], "bits": [2.0, 1.0], "n_params": [1000, 3000]})
    size = queries.plan_size(plan)
    assert size["avg_bits"] == pytest.approx(1.25) and size["compression"] == pytest.approx(25.6)
    assert size["bytes"] == pytest.approx((2000 + 3000) / 8) and size["fp32_bytes"] == 16000
    assert queries.plan_size(pd.DataFrame())["avg_bits"] is None


def test_config_diff_keeps_only_differences():
    runs = {"a": {"preset": "tiny", "config": {"lr": 1e-3, "bits": 1.58, "k": 8}},
            "b": {"preset": "tiny", "config": {"lr": 5e-4, "bits": 1.58, "k": 8}}}
    diff = queries.config_diff(runs)
    assert list(diff.index) == ["lr"] and diff.loc["lr", "b"] == 5e-4
    assert len(queries.config_diff({"a": runs["a"]})) == 4   # one run: its whole config


def test_metrics_csv_and_sensitivity_table(tmp_path):
    store = RunStore(tmp_path)
    ids = [write_synthetic_run(store, 30, seed=i, eval_every=10) for i in range(2)]
    frame = pd.read_csv(__import__("io").BytesIO(queries.metrics_csv(store, ids)))
    assert len(frame) == 60 and list(frame.columns[:3]) == ["run_id", "step", "wall_time"]
    assert set(frame.run_id) == set(ids)
    table = queries.sensitivity_table(queries.read_plan(store, ids[0]))
    assert list(table.columns) == ["qerr_1.58", "fisher"] and len(table) == 12


# -- figures ----------------------------------------------------------------------------------------------------------
def _series(run: str, name: str = "loss", n: int = 50, smoothing: float = 0.6) -> pd.DataFrame:
    steps = pd.DataFrame({"step": np.arange(n), name: np.linspace(3, 1, n) + np.sin(np.arange(n))})
    return queries.chart_series(steps, name, smoothing=smoothing, run=run)


def _validated(fig):
    """Re-build a figure with plotly's full property validation (line_figure skips it for speed)."""
    import plotly.graph_objects as go
    return go.Figure(fig.to_dict())


def test_line_figure_faint_raw_under_smoothed_with_kept_zoom():
    fig = _validated(charts.line_figure(_series("r1"), "Loss", log_y=True, uirevision="r1:Loss"))
    raw, smooth = fig.data
    assert raw.opacity == charts.RAW_OPACITY and raw.showlegend is False and raw.line.width == 1
    assert smooth.line.width == 2 and raw.line.color == smooth.line.color
    assert fig.layout.yaxis.type == "log" and fig.layout.uirevision == "r1:Loss" and fig.layout.title.text == "Loss"
    assert len(charts.line_figure(_series("r1", smoothing=0.0), "Loss").data) == 1   # no smoothing: one line
    assert charts.line_figure(pd.DataFrame(), "Loss").layout.annotations[0].text == "no data yet"


def test_one_colour_per_run_across_charts():
    colors = charts.run_colors(["r1", "r2", "r3"])
    loss = _validated(charts.line_figure(pd.concat([_series("r1"), _series("r3")]), "loss", colors=colors))
    mult = _validated(charts.line_figure(pd.concat([_series("r3", "lr_multiplier"), _series("r1", "lr_multiplier")]),
                                         "lr", colors=colors))
    by_name = lambda fig: {t.name: t.line.color for t in fig.data if t.showlegend is not False}  # noqa: E731
    assert by_name(loss) == by_name(mult) == {"r1": colors["r1"], "r3": colors["r3"]}
    assert colors["r1"] != colors["r3"]
    single = _validated(charts.line_figure(_series("r3"), "loss", colors=colors, color_by="run", raw=False))
    assert single.data[-1].line.color == colors["r3"] and len(single.data) == 1
    assert len(set(charts.run_colors([f"r{i}" for i in range(20)]).values())) == 20


def test_cluster_scatter_colours_and_hover_text():
    samples = pd.DataFrame({"x": [0.0, 1.0, 2.0], "y": [0.0, 1.0, 0.5], "cluster": [0, 2, 2],
                            "text": ["hello there", "what is AI?", "x" * 500]})
    fig = charts.cluster_scatter(samples)
    assert [t.name for t in fig.data] == ["cluster 0", "cluster 2"]
    assert fig.data[1].marker.color == charts.color_for(2)
    assert fig.data[1].hovertext[0] == "what is AI?"
    assert len(fig.data[1].hovertext[1].replace("<br>", "")) == 200   # long texts are cut
    assert charts.cluster_scatter(pd.DataFrame()).layout.annotations


def test_precision_figures(tmp_path):
    store = RunStore(tmp_path)
    run_id = write_synthetic_run(store, 20, eval_every=10)
    plan, layers = queries.read_plan(store, run_id), queries.read_layers(store, run_id)
    bits = charts.bits_per_layer_figure(plan)
    assert list(bits.layout.xaxis.categoryarray) == list(plan.layer)
    assert {t.name for t in bits.data} == set(plan.module_type)
    by_module = charts.bits_by_module_figure(plan)
    weighted = (plan.bits * plan.n_params).groupby(plan.module_type).sum() / plan.n_params.groupby(
        plan.module_type).sum()
    assert dict(zip(by_module.data[0].x, by_module.data[0].y)) == pytest.approx(weighted.to_dict())
    heat = charts.sensitivity_heatmap(queries.sensitivity_table(plan))
    z = np.asarray(heat.data[0].z, dtype=float)
    assert z.min() == 0 and z.max() == 1
    clusters = charts.param_cluster_figure(plan)
    assert clusters.data[0].name == "cluster 0 (2 bits)"
    codes = charts.code_distribution_figure(layers)
    assert [t.name for t in codes.data] == ["−1", "0", "+1"] and codes.layout.barmode == "stack"
    assert charts.layer_error_figure(layers).data[0].y[0] == pytest.approx(0.3)
    assert charts.bits_per_layer_figure(pd.DataFrame()).layout.annotations


def test_flat_series_get_a_y_range_around_their_value_and_steps_get_integer_ticks():
    from workbench.charts import integer_ticks, y_range_for_flat
    low, high = y_range_for_flat(np.full(50, 1e-3))
    assert 0 < low < 1e-3 < high < 2e-3
    assert y_range_for_flat(np.array([1.0, 2.0])) is None           # a varying series keeps plotly's autorange
    assert integer_ticks(np.array([1.0, 2.0, 3.0]))["dtick"] == 1


def test_benchmark_report_reads_for_a_user():
    from workbench import bench_view
    report = ("# Bench\n\n## Headline: W2 (ternary QAT)\n\n| method | ×R [95 % CI] | final ×R [95 % CI] |\n"
              "|---|---|---|\n| **R** AdamW tuned | 1.00 [1.00, 1.00] · | 1.000 [1.000, 1.000] · |\n"
              "| **H** Hybrid, full | 0.80 [0.70, 0.90] ✅ | 1.10 [1.05, 1.20] ❌ |\n\n## Issue 6 targets\n\n"
              "| target | met? |\n|---|---|\n| H0 before issue 6 | **no** |\n")
    text = bench_view.verdict(report)
    assert "0.80× (95 % interval 0.70–0.90: better)" in text and "1.10× (95 % interval 1.05–1.20: worse)" in text
    names = {"R": "Tuned AdamW", "H0": "Hybrid, first version", "H": "Hybrid optimizer (full)",
             "H-frozen": "Hybrid, frozen aux net"}          # the report's own labels (its results.json "methods")
    shown = bench_view.plain(report, names)
    assert "✅" not in shown and "❌" not in shown and "(win)" in shown and "(loss)" in shown
    assert "Issue 6" not in shown and "issue 6" not in shown
    assert "| Hybrid optimizer (full) (H) |" in shown
    assert "| **H** Hybrid, full |" in bench_view.plain(report)        # no labels travelled: codes stay codes
    fig = bench_view.recolor(go.Figure([go.Scatter(name="R", y=[1]), go.Scatter(name="H0", y=[2]),
                                        go.Scatter(name="H", y=[3]), go.Scatter(name="H-frozen", y=[4])]), names)
    colors = [t.line.color for t in fig.data]
    assert len(set(colors)) == 4 and fig.data[2].name == "H · Hybrid optimizer (full)"


def test_two_track_report_verdict_is_its_own_verdict_section_and_sorts_first(tmp_path):
    from workbench import bench_view, queries
    report = ("# The hybrid against its baselines — both AlgoPerf tracks (medium mode)\n\n## Verdict\n\n"
              "**Leave `--hybrid` off** on this evidence: it wins neither track.\n\nsecond paragraph\n\n"
              "## Targets (issue 10; W2 ternary QAT)\n\n| target | bar | measured | met |\n|---|---|---|---|\n"
              "| self-tuning | ≤ 0.75× | H/AdamW 1.00 [0.90, 1.10] | **no** |\n")
    assert bench_view.verdict(report) == "**Leave `--hybrid` off** on this evidence: it wins neither track."
    assert bench_view.verdict("# empty\n\n## Verdict\n\n\n## Setup\n\nx\n") is None
    for name in ("changes", "quick", "medium"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.md").write_text("# r\n")
    (tmp_path / "data").mkdir()                                       # no report.md: not a report
    assert [p.name for p in queries.benchmark_reports(tmp_path)] == ["medium", "quick", "changes"]
    from benchmarks.tracks_report import method_labels      # the benchmark writes them, the app reads them
    (tmp_path / "medium" / "results.json").write_text(json.dumps({"methods": method_labels(["Muon", "H"])}))
    names = bench_view.method_names(tmp_path / "medium")
    assert list(names) == ["Muon", "H"] and bench_view.method_names(tmp_path / "quick") == {}
    assert "**Muon (hidden matrices)" in bench_view.plain("**Muon** beats it", names)


def test_parallel_coordinates_axes_categorical_log_and_constant():
    frame = pd.DataFrame({"lr": [1e-4, 1e-3, 1e-2], "kind": ["hybrid", "baseline", "hybrid"],
                          "same": [4, 4, 4], "val_loss": [5.0, 4.0, 4.5]})
    fig = charts.parallel_coordinates(frame, [("lr", "LR", True), ("kind", "kind"), ("same", "same"),
                                              ("val_loss", "validation loss")], color="val_loss")
    go.Figure(fig.to_dict())                                    # a valid figure
    dims = {d.label: d for d in fig.data[0].dimensions}
    assert set(dims) == {"LR (log)", "kind", "validation loss"}     # the constant axis is left out
    assert list(dims["LR (log)"].values) == pytest.approx([-4, -3, -2])
    assert list(dims["LR (log)"].ticktext) == ["0.0001", "0.001", "0.01"]
    assert list(dims["kind"].ticktext) == ["baseline", "hybrid"]
    assert list(fig.data[0].line.color) == [5.0, 4.0, 4.5]


def test_group_figure_draws_a_band_under_each_groups_line_with_its_count():
    series = pd.concat([_series(f"r{i}") .assign(smooth=lambda f, i=i: f.smooth + i) for i in range(3)]
                       + [_series("b0")], ignore_index=True)
    groups = queries.group_series(series, {"r0": "lr=1e-3", "r1": "lr=1e-3", "r2": "lr=1e-3", "b0": "lr=3e-3"})
    colors = {"lr=1e-3": "#1f77b4", "lr=3e-3": "#d62728"}
    fig = charts.group_figure(groups, "Loss", colors=colors, uirevision="g", x_range=(5, 40))
    _validated(fig)
    shown = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in shown] == ["lr=1e-3 (n=3)", "lr=3e-3 (n=1)"]
    assert shown[0].line.color == "#1f77b4" and shown[0].line.width == 2
    high, low = [t for t in fig.data if t.legendgroup == "lr=1e-3 (n=3)" and t.showlegend is False]
    assert low.fill == "tonexty" and low.fillcolor == "rgba(31, 119, 180, 0.18)"
    assert np.all(np.asarray(low.y) <= np.asarray(shown[0].y)) and np.all(np.asarray(shown[0].y) <= np.asarray(high.y))
    np.testing.assert_allclose(np.asarray(high.y) - np.asarray(low.y), 2.0)       # min–max of +0, +1, +2
    assert list(fig.layout.xaxis.range) == [5, 40] and fig.layout.uirevision == "g"
    assert charts.group_figure(pd.DataFrame(), "Loss").layout.annotations[0].text == "no data yet"


def test_compare_axes_are_numeric_varying_and_short():
    frame = pd.DataFrame({"cfg.base_learning_rate": [1e-3, 1e-2], "cfg.use_trust_region": [True, False],
                          "cfg.use_auxiliary_nn": [True, False], "cfg.max_steps": [100, 100],
                          "cfg.auxiliary_nn_hidden_size": [16, 64], "cfg.trust_region_mode": ["relative", "absolute"]})
    dims = charts.config_axes(frame, list(frame.columns), log_if=lambda c: "learning_rate" in c)
    assert dims == [("cfg.base_learning_rate", "base LR", True), ("cfg.auxiliary_nn_hidden_size", "aux NN hidden s…",
                                                                     False)]
    fig = charts.parallel_coordinates(frame.assign(v=[4.0, 5.0]), dims + [("v", "val")], color="v", title=None)
    go.Figure(fig.to_dict())
    assert not fig.layout.title.text and [d.label for d in fig.data[0].dimensions] == ["base LR (log)",
                                                                                        "aux NN hidden s…", "val"]


def test_chart_series_smoothing_is_the_same_ema():
    values = np.cumsum(np.random.default_rng(1).normal(size=3000)) + 50
    steps = pd.DataFrame({"step": np.arange(3000), "loss": values})
    for weight in (0.0, 0.6, 0.95):
        series = queries.chart_series(steps, "loss", smoothing=weight, max_points=10_000)
        np.testing.assert_allclose(series.smooth, queries.ema(pd.Series(values), weight), rtol=1e-9)


def test_run_and_group_names_are_text_in_legends():
    fig = charts.line_figure(pd.concat([_series("r1"), _series("r2")]), "Loss",
                             labels={"r1": "<b>bold</b>", "r2": "<a href='x'>link</a>"})
    names = {t["name"] for t in fig.data if t["showlegend"] is not False}
    assert names == {"&lt;b&gt;bold&lt;/b&gt;", "&lt;a href='x'&gt;link&lt;/a&gt;"}
    groups = queries.group_series(_series("r1"), {"r1": "<i>tag</i>"})
    assert charts.group_figure(groups, "Loss").data[-1]["name"] == "&lt;i&gt;tag&lt;/i&gt; (n=1)"


def test_a_shared_x_range_may_leave_one_end_open():
    assert charts.x_range_settings((10, 60)) == {"range": [10, 60], "autorange": False}
    fig = _validated(charts.line_figure(_series("r1"), "Loss", x_range=(10, None)))
    assert list(fig.layout.xaxis.range) == [10, None] and fig.layout.xaxis.autorange == "max"
    fig = _validated(charts.line_figure(_series("r1"), "Loss", x_range=(None, 30)))
    assert fig.layout.xaxis.autorange == "min"


def test_stacked_figure_puts_every_chart_on_one_x_axis():
    """Live: each chart a subplot of one figure on the SAME x axis (plotly.js syncs hover across stacked subplots
    only on one axis: hoversubplots="axis"; zoom follows from there being one axis)."""
    loss = charts.Panel("Loss", _series("r1"), y_title="nats", log_y=True)
    lr = charts.Panel("Learning rate", _series("r1", "learning_rate"))
    empty = charts.Panel("Flip rate", pd.DataFrame())
    fig = charts.stacked_figure([loss, lr, empty], main_run="r1", uirevision="r1:step")
    _validated(fig)                                    # every property valid (built unvalidated for speed)
    assert fig.layout.hovermode == "x unified" and fig.layout.hoversubplots == "axis"
    assert {t.xaxis for t in fig.data} == {"x"} and "xaxis2" not in fig.layout.to_plotly_json()
    assert [(t.meta, t.yaxis) for t in fig.data] == [("Loss", "y"), ("Loss", "y"), ("Learning rate", "y2"),
                                                     ("Learning rate", "y2")]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "linear" and fig.layout.yaxis.title.text == "nats"
    # Stacked top to bottom without overlap, each titled; an empty chart says so.
    domains = [fig.layout.yaxis.domain, fig.layout.yaxis2.domain, fig.layout.yaxis3.domain]
    assert domains[0][0] > domains[1][1] and domains[1][0] > domains[2][1]
    texts = [a.text for a in fig.layout.annotations]
    assert texts[:3] == ["Loss", "Learning rate", "Flip rate"] and "no data yet" in texts
    raw, smooth = fig.data[:2]
    assert raw.opacity == charts.RAW_OPACITY and raw.hoverinfo == "skip" and smooth.line.width == 2
    assert fig.layout.showlegend is False              # one run, one curve per chart: the titles name them
    assert fig.layout.uirevision == "r1:step"          # zoom survives refreshes


def test_stacked_figure_overlays_groups_and_the_teacher_line():
    colors = charts.run_colors(["main", "a", "b", "c"])
    overlays = pd.concat([_series(r, "val_loss").assign(smooth=lambda f, i=i: f.smooth + i)
                          for i, r in enumerate(("a", "b", "c"))], ignore_index=True)
    groups = queries.group_series(overlays, {"a": "seed group", "b": "seed group", "c": "other"})
    panel = charts.Panel("Validation loss", _series("main", "val_loss"), groups=groups,
                         references=[("teacher", 2.5)])
    fig = charts.stacked_figure([panel, charts.Panel("Loss", pd.concat([_series("main"), _series("a")]))],
                                colors=colors, labels={"main": "this <b>run</b>", "a": "run a"}, main_run="main")
    _validated(fig)
    legend = [t for t in fig.data if t.showlegend]
    assert [t.name for t in legend] == ["this &lt;b&gt;run&lt;/b&gt;", "seed group (n=2)", "other (n=1)", "run a"]
    assert legend[0].line.color == colors["main"] and legend[-1].line.color == colors["a"]
    band = [t for t in fig.data if t.legendgroup == "group:seed group" and t.hoverinfo == "skip"]
    assert band[1].fill == "tonexty"
    np.testing.assert_allclose(np.asarray(band[0].y) - np.asarray(band[1].y), 1.0)   # min–max of +0, +1
    # The same run toggles in every chart: one legendgroup, one legend entry.
    assert {t.legendgroup for t in fig.data if t.name == "this &lt;b&gt;run&lt;/b&gt;"} == {"run:main"}
    (teacher,) = fig.layout.shapes
    assert teacher.yref == "y" and teacher.y0 == teacher.y1 == 2.5 and teacher.label.text == "teacher 2.5"
    assert teacher.xref == "x domain" and (teacher.x0, teacher.x1) == (0, 1)
    # Only the shown run has the faint raw line; overlays draw their smoothed curve.
    assert [t.meta for t in fig.data if t.opacity == charts.RAW_OPACITY] == ["Validation loss", "Loss"]
