"""Every workbench page under streamlit.testing.v1.AppTest, against run stores filled through the RunWriter API.
The launcher's process start is stubbed: these tests check what would be started, and that nothing is started
for a bad config."""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from hybrid_optimization.config import HybridTrainingConfig, field_error
from hybrid_optimization.tracking import RunStore
from tests.fixtures.workbench_runs import write_synthetic_run
from workbench import config_form, headline, launcher, presets, queries

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGES = ("configure", "live", "clusters", "precision", "compare", "summary")


@pytest.fixture
def runs_root() -> Path:
    return Path(os.environ["HYBRID_RUNS_ROOT"])   # a fresh temporary folder per test (tests/conftest.py)


@pytest.fixture
def filled(runs_root):
    store = RunStore(runs_root)
    finished = write_synthetic_run(store, 400, "finished", name="baseline", seed=0)
    failed = write_synthetic_run(store, 120, "failed", name="crashed", seed=1, config={"base_learning_rate": 0.01})
    return store, finished, failed


@pytest.fixture
def started(monkeypatch):
    """Stub for the process start: records the argv instead of starting the CLI."""
    calls = []

    class Proc:
        pid = os.getpid()   # "alive", so liveness leaves the queued run alone

        def poll(self):
            return None

    from hybrid_optimization import launch as launch_path   # the one process start (launches and resumes)
    monkeypatch.setattr(launch_path, "start", lambda argv, log_dir, **kw: calls.append(argv) or Proc())
    yield calls
    launcher._CHILDREN.clear()


def _app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=60)


def _open(at: AppTest, page: str) -> AppTest:
    if page != "configure":
        at.switch_page(f"workbench/pages/{page}.py")
    return at.run()


def _texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def test_every_page_renders_without_exception(filled):
    at = _app().run()
    for page in PAGES:
        _open(at, page)
        assert not at.exception, (page, [e.value for e in at.exception])
        assert at.title[0].value in {"Configure & launch", "Live run", "Clusters", "Precision", "Compare runs",
                                     "Run summary", "Benchmarks"}


def test_form_shows_every_config_field_with_the_guides_defaults(filled):
    at = _app().run()
    defaults = HybridTrainingConfig().to_dict()
    for name, value in defaults.items():
        key = f"cfg.{name}"
        kind = config_form.widget_kind(name)
        widget = {"bool": at.checkbox, "choice": at.selectbox, "int": at.number_input,
                  "number": at.text_input}[kind](key=key)
        shown = config_form.parse_number(widget.value) if kind == "number" else widget.value
        assert shown == value, name
    labels = _texts(at.markdown)
    for group in ("Quantization", "Clustering", "Auxiliary NN", "Trust Region", "Optimization", "Logging"):
        assert f"**{group}**" in labels
    assert at.text_input(key="cfg.base_learning_rate").help == config_form.HELP["base_learning_rate"]


def test_invalid_config_shows_the_cores_message_and_launches_nothing(filled, started):
    store = filled[0]
    before = len(queries.list_runs(store))
    at = _app().run()
    at.text_input(key="cfg.base_learning_rate").input("fast").run()
    at.number_input(key="cfg.data_clusters").set_value(0).run()
    errors = _texts(at.error)
    # The core's messages, without its class prefix (the field is right above the message).
    plain = __import__("workbench.ui", fromlist=["plain"]).plain      # shown literally (no markdown)
    assert plain(field_error("base_learning_rate", "fast").replace("HybridTrainingConfig.", "")) in errors
    assert plain(field_error("data_clusters", 0).replace("HybridTrainingConfig.", "")) in errors
    assert at.button(key="launch").disabled                 # no Launch while a field is invalid
    assert started == [] and len(queries.list_runs(store)) == before
    at.text_input(key="cfg.base_learning_rate").input("0.001").run()
    at.number_input(key="cfg.data_clusters").set_value(4).run()
    assert not at.button(key="launch").disabled


def test_launch_passes_the_form_to_the_cli_and_opens_the_live_view(filled, started, runs_root):
    at = _app().run()
    at.number_input(key="cfg.max_steps").set_value(60).run()
    at.text_input(key="cfg.initial_trust_radius").input("0.05").run()
    at.selectbox(key="cfg.target_bits").set_value(2.0).run()
    at.text_input(key="opt.tags").input("smoke, e2e").run()
    at.button(key="launch").click().run()
    assert not at.exception
    (argv,) = started
    run_id = at.session_state["launched_run"]
    assert argv[:2] == [sys.executable, str(launcher.DISTILLATION_SCRIPT)] and argv[2].startswith("--options=")
    options = json.loads(Path(argv[2].split("=", 1)[1]).read_text())      # the CLI's TrainOptions
    assert options["max_steps"] == 60 and options["bits"] == 2
    assert options["run_id"] == run_id and options["runs_root"] == str(runs_root)
    assert options["quiet"] and options["tags"] == ["smoke", "e2e"]
    run = RunStore(runs_root).get_run(run_id)
    assert run["status"] == "queued" and run["config"]["initial_trust_radius"] == 0.05
    assert run["config"] == HybridTrainingConfig(max_steps=60, initial_trust_radius=0.05, target_bits=2).to_dict()
    assert at.title[0].value == "Live run"                 # switched to the live view
    assert at.selectbox(key="live_run").value == run_id


def test_presets_save_and_load_through_the_form(filled, runs_root):
    at = _app().run()
    at.number_input(key="cfg.data_clusters").set_value(12).run()
    at.text_input(key="preset_name").input("twelve").run()
    at.button(key="preset_save").click().run()
    assert presets.list_presets(runs_root) == ["twelve"]
    at.number_input(key="cfg.data_clusters").set_value(3).run()
    at.selectbox(key="preset_choice").set_value("twelve").run()
    at.button(key="preset_load").click().run()
    assert at.number_input(key="cfg.data_clusters").value == 12
    assert any("Loaded preset 'twelve'" in s for s in _texts(at.success))


def test_live_view_reads_only_new_rows_of_an_active_run(runs_root):
    store = RunStore(runs_root)
    run_id = store.create_run(HybridTrainingConfig().to_dict(), [], "tiny", name="live one", total_steps=1000)
    writer = store.writer(run_id)
    writer.set_pid(os.getpid())
    writer.set_status("running")
    for step in range(1, 51):
        writer.log_step(step, loss=2.0, wall_time=time.time() - 50 + step, tokens_per_s=500.0)
    writer.log("hello from the trainer")
    writer.flush()
    at = _open(_app().run(), "live")
    assert not at.exception
    cache = at.session_state["live_caches"][run_id]
    assert len(cache.steps) == 50 and cache.last_step == 50
    assert any("refreshing every 2 s" in c for c in _texts(at.caption))        # Live's default tick
    assert [b.label for b in at.button] == ["Stop"]
    assert "hello from the trainer" in at.text[0].value
    for step in range(51, 76):
        writer.log_step(step, loss=1.5)
    writer.flush()
    at.run()  # what the fragment timer does in a browser
    cache = at.session_state["live_caches"][run_id]
    assert len(cache.steps) == 75 and cache.reads >= 2
    at.toggle(key="live_paused").set_value(True).run()
    assert any("not refreshing" in c for c in _texts(at.caption))
    writer.set_status("finished")
    writer.close()


def test_a_dead_run_shows_as_lost_and_can_be_resumed(runs_root, started):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = RunStore(runs_root)
    run_id = store.create_run({}, [], "tiny", name="orphan")
    store.update_run(run_id, pid=dead.pid)
    store.set_status(run_id, "running")
    at = _open(_app().run(), "live")
    assert store.get_run(run_id)["status"] == "lost"
    assert any("process (pid" in w for w in _texts(at.warning))
    at.button(key="live_resume").click().run()
    (argv,) = started
    assert argv[-3:] == [f"--resume={run_id}", f"--runs_root={runs_root}", "--quiet"]
    assert store.get_run(run_id)["status"] == "queued"


def test_failed_run_shows_its_traceback(filled):
    at = _app().run()
    at.session_state["selected_run"] = filled[2]
    _open(at, "live")
    assert "The run failed. Traceback:" in _texts(at.error)
    assert any("RuntimeError: boom" in c for c in _texts(at.code))


@pytest.mark.parametrize("problem", ["missing", "empty", "newer schema", "not sqlite", "damaged"])
def test_bad_run_stores_give_a_clear_message(runs_root, problem):
    runs_root.mkdir(parents=True, exist_ok=True)
    db = runs_root / "runs.db"
    if problem == "empty":
        db.write_bytes(b"")
    elif problem == "newer schema":
        RunStore(runs_root)
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA user_version = 99")
    elif problem == "damaged":            # a garbage b-tree page: refused, never read short
        RunStore(runs_root)
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE filler (x TEXT)")
            conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,)] * 50)
            conn.commit()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        data = bytearray(db.read_bytes())
        data[-4096:-4056] = bytes([0x5A]) * 40
        db.write_bytes(bytes(data))
    elif problem == "not sqlite":
        db.write_text("hello " * 1000)
    at = _app()
    for page in PAGES[1:]:
        _open(at, page)
        assert not at.exception
        messages = " ".join(_texts(at.info) + _texts(at.error))
        expected = {"missing": "no run store at", "empty": "is empty", "newer schema": "newer than this code",
                    "damaged": "is damaged",
                    "not sqlite": "not an SQLite database"}[problem]
        assert expected in messages, (page, messages)
    _open(at, "configure")               # the form still shows; a broken store is reported and blocks launching
    assert not at.exception and (problem in ("missing", "empty")) == (not at.error)
    assert not (runs_root / "runs.db").exists() if problem == "missing" else True


def test_clusters_and_precision_pages_show_the_run(filled):
    at = _app().run()
    at.session_state["selected_run"] = filled[1]
    _open(at, "clusters")
    assert len(at.get("plotly_chart")) == 4
    at.radio(key="clusters_projection").set_value("t-SNE").run()
    assert not at.exception and len(at.get("plotly_chart")) == 4
    _open(at, "precision")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics[headline.PLANNED_COMPRESSION_LABEL].endswith("×") and metrics[headline.PLANNED_BITS_LABEL] != "—"
    assert len(at.get("plotly_chart")) == 6
    legend = next(d.value for d in at.dataframe if list(d.value.columns) == ["feature", "what it measures"])
    assert dict(zip(legend.feature, legend["what it measures"]))["fisher"].startswith("curvature: mean squared")


def test_compare_table_selection_diff_tags_and_housekeeping(filled):
    store, finished, failed = filled
    at = _open(_app().run(), "compare")
    assert at.session_state["compare_selected"] == {finished, failed}
    diff = at.dataframe[-1].value
    assert "base_learning_rate" in diff.index and "target_bits" not in diff.index
    assert len(at.get("plotly_chart")) == 3          # validation loss, training loss, config vs result
    assert at.get("download_button")
    at.button(key="compare_archive").click().run()
    assert queries.list_runs(store).empty and len(queries.list_runs(store, include_archived=True)) == 2


def test_summary_page_shows_the_guides_block_and_the_export(filled):
    at = _app().run()
    at.session_state["selected_run"] = filled[1]
    _open(at, "summary")
    block = at.code[0].value
    assert block.startswith("HYBRID OPTIMIZATION SUMMARY") and "Total Steps: 400" in block
    assert "export" in " ".join(_texts(at.markdown)) and at.get("download_button")


def test_benchmarks_page_shows_a_report_and_its_figures(tmp_path, monkeypatch):
    import plotly.graph_objects as go
    report = tmp_path / "quick"
    (report / "figures").mkdir(parents=True)
    (report / "report.md").write_text("# Hybrid optimizer benchmark — quick mode\n\n| method | final |\n|---|---|\n"
                                      "| **H** | 4.40 |\n")
    go.Figure(go.Scatter(x=[1, 2], y=[3, 4])).write_json(report / "figures" / "curves_W2.json")
    (report / "figures" / "broken.json").write_text("{not json")
    monkeypatch.setenv("HYBRID_BENCHMARK_RESULTS", str(tmp_path))
    at = _open(_app().run(), "benchmarks")
    assert not at.exception, [e.value for e in at.exception]
    assert any("quick mode" in m.value for m in at.markdown)
    assert any("broken.json" in w.value for w in at.warning)
    monkeypatch.setenv("HYBRID_BENCHMARK_RESULTS", str(tmp_path / "none"))
    at = _open(_app().run(), "benchmarks")
    assert not at.exception and any("No benchmark report" in i.value for i in at.info)


# -- baseline / hybrid / mixed stores: every page tells the truth about each kind of run -----------------------------
ALL_PAGES = (*PAGES, "sweep", "benchmarks", "chat")


def _store_of(kind: str, runs_root: Path) -> dict[str, str]:
    store = RunStore(runs_root)
    ids = {}
    if kind in ("baseline", "mixed"):
        ids["baseline"] = write_synthetic_run(store, 60, "finished", name="adamw-baseline", seed=0, hybrid=False)
    if kind in ("hybrid", "mixed"):
        ids["hybrid"] = write_synthetic_run(store, 60, "finished", name="hybrid-ternary-run", seed=1)
    return ids


def _decode(value):
    """plotly sends arrays as {"dtype", "bdata"} (base64): back to a list."""
    import base64

    import numpy as np
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    return value


def _figure(chart) -> dict:
    """The plotly figure a chart element carries, with its arrays decoded."""
    import json
    fig = json.loads(chart.proto.spec)
    for trace in fig["data"]:
        for key in ("x", "y"):
            if key in trace:
                trace[key] = _decode(trace[key])
    return fig


def _live_panels(at: AppTest) -> dict[str, dict]:
    """Live's charts, all subplots of its stacked figures: title -> the panel's traces (found by their meta),
    its y axis, the shared x axis, its reference-line shapes, and which figure holds it."""
    panels = {}
    for n, chart in enumerate(at.get("plotly_chart")):
        fig = _figure(chart)
        layout = fig["layout"]
        titles = [a["text"] for a in layout.get("annotations", []) if a.get("yanchor") == "bottom"]
        for i, title in enumerate(titles):
            axis = "y" if i == 0 else f"y{i + 1}"
            panels[title] = {"data": [t for t in fig["data"] if t.get("meta") == title and t.get("yaxis") == axis],
                             "yaxis": layout["yaxis" if i == 0 else f"yaxis{i + 1}"], "xaxis": layout["xaxis"],
                             "shapes": [s for s in layout.get("shapes", []) if s.get("yref") == axis],
                             "figure": n, "layout": layout}
    return panels


@pytest.mark.parametrize("kind", ["baseline", "hybrid", "mixed"])
def test_every_page_with_baseline_hybrid_and_mixed_stores(kind, runs_root):
    ids = _store_of(kind, runs_root)
    at = _app().run()
    for page in ALL_PAGES:
        _open(at, page)
        assert not at.exception, (kind, page, [e.value for e in at.exception])
    for run_kind, run_id in ids.items():
        at.session_state["selected_run"] = run_id
        _open(at, "summary")
        block = at.code[0].value
        if run_kind == "baseline":
            assert block.startswith("TRAINING SUMMARY (baseline: AdamW at constant LR)")
            assert "Trust Radius" not in block and "HYBRID" not in " ".join(_texts(at.subheader))
        else:
            assert block.startswith("HYBRID OPTIMIZATION SUMMARY") and "Final Trust Radius" in block
        metrics = {m.label: m.value for m in at.metric}
        assert metrics[headline.TOKENS_LABEL] == "1,500"          # the summary's number, as on every page
        _open(at, "live")
        options = at.multiselect(key=f"live_charts.{run_kind}").options
        assert ("Trust radius" in options) == (run_kind == "hybrid")
        assert {m.label: m.value for m in at.metric}[headline.TOKENS_LABEL] == "1,500"


def test_constant_learning_rate_is_drawn_at_its_value(runs_root):
    (run_id,) = _store_of("baseline", runs_root).values()
    at = _app().run()
    at.session_state["selected_run"] = run_id
    _open(at, "live")
    lr = _live_panels(at)["Learning rate"]
    low, high = lr["yaxis"]["range"]
    values = [y for trace in lr["data"] for y in trace["y"]]
    lr_value = HybridTrainingConfig().base_learning_rate
    assert all(abs(v - lr_value) <= 1e-12 * lr_value for v in values)     # the smoothed line may differ by float ulps
    assert 0 < low < values[0] < high < 2 * values[0]          # around the LR, not a line at 0 on −1…1
    assert lr["yaxis"]["title"]["text"] and lr["xaxis"]["title"]["text"] == "step"


def test_baseline_switch_greys_out_hybrid_options_and_saves_them_off(runs_root, started):
    at = _app().run()
    at.toggle(key="opt.hybrid").set_value(False).run()
    for name in (*config_form.HYBRID_SWITCHES, "trust_radius_adaptation"):
        box = at.checkbox(key=f"baseline.{name}")
        assert box.disabled and box.value is False
    assert at.selectbox(key="opt.embedder").disabled and at.selectbox(key="opt.cluster_batches").disabled
    at.button(key="launch").click().run()
    (argv,) = started
    assert "--hybrid" not in argv
    run = RunStore(runs_root).get_run(at.session_state["launched_run"])
    assert not any(run["config"][name] for name in (*config_form.HYBRID_SWITCHES, "trust_radius_adaptation"))
    assert at.title[0].value == "Live run"


def test_option_errors_sit_under_their_fields_without_internal_prefixes(runs_root, started):
    at = _app().run()
    at.text_input(key="opt.seq_len").input("3").run()
    at.text_input(key="opt.alpha").input("2").run()
    errors = _texts(at.error)
    low, high = config_form.SEQ_LEN_RANGE     # the CLI's own bounds and message (one definition)
    plain = __import__("workbench.ui", fromlist=["plain"]).plain      # shown literally (no markdown)
    assert plain(f"3 is invalid: it must be an integer in [{low}, {high:,}]") in errors
    assert any(e.startswith("2") and plain("[0, 1]") in e for e in errors)
    assert not any("HybridTrainingConfig." in e for e in errors)
    assert at.button(key="launch").disabled
    assert started == []


def test_run_links_open_the_run_and_the_comparison(runs_root):
    ids = _store_of("mixed", runs_root)
    at = _app()
    at.query_params["run"] = ids["baseline"]
    at.run()
    _open(at, "summary")
    assert at.selectbox(key="summary_run").value == ids["baseline"]
    assert at.query_params["run"] == [ids["baseline"]] or at.query_params["run"] == ids["baseline"]
    at = _app()
    at.query_params["runs"] = f"{ids['hybrid']},{ids['baseline']}"
    at.run()
    _open(at, "compare")
    assert at.session_state["compare_selected"] == set(ids.values())


def test_compare_overlays_validation_metrics_of_a_baseline_and_a_hybrid_run(runs_root):
    ids = _store_of("mixed", runs_root)
    at = _open(_app().run(), "compare")
    options = at.multiselect(key="compare_metrics").options
    assert {"validation loss (quantized)", "validation perplexity", "KL to the teacher",
            "top-1 agreement"} <= set(options)
    figures = [_figure(c) for c in at.get("plotly_chart")]
    val = next(f for f in figures if f["layout"]["title"]["text"].startswith("Validation loss"))
    assert {t["name"] for t in val["data"]} == {"adamw-baseline (%s)" % ids["baseline"],
                                                "hybrid-ternary-run (%s)" % ids["hybrid"]}
    assert any(f["data"] and f["data"][0]["type"] == "parcoords" for f in figures)   # config vs result
    # Filter by name: the baseline leaves the table and the comparison.
    at.text_input(key="compare_filter_name").input("hybrid").run()
    assert not at.exception
    val = next(_figure(c) for c in at.get("plotly_chart")
               if _figure(c)["layout"]["title"]["text"].startswith("Validation loss"))
    assert {t["name"] for t in val["data"]} == {"hybrid-ternary-run (%s)" % ids["hybrid"]}


def test_live_shows_system_metrics_and_setup_stages(runs_root):
    from hybrid_optimization.system_metrics import COLUMNS, SYSTEM_METRICS_FILE
    store = RunStore(runs_root)
    (run_id,) = _store_of("hybrid", runs_root).values()
    start = store.get_run(run_id)["started_at"] or time.time()
    lines = [",".join(COLUMNS)] + [f"{start + 2 * i:.3f},{90 + i},{500 + i},," for i in range(10)]
    (runs_root / run_id / SYSTEM_METRICS_FILE).write_text("\n".join(lines) + "\n")
    at = _app().run()
    at.session_state["selected_run"] = run_id
    _open(at, "live")
    at.multiselect(key="live_charts.hybrid").set_value(["CPU (%)", "Memory (RSS, MiB)"]).run()
    cpu = _live_panels(at)["CPU (%)"]
    assert cpu["data"][-1]["y"] == [float(90 + i) for i in range(10)]
    # A run still setting up (no step yet): its stages, the teacher logits with n/N.
    setting_up = store.create_run(HybridTrainingConfig().to_dict(), {"argv": ["--hybrid"]}, "tiny",
                                  name="setting-up", status="queued", total_steps=100)
    with store.writer(setting_up) as w:
        w.set_status("running")
        w.set_pid(os.getpid())
        for message in ("tiny tokenizer (1024 tokens) trained in 0.1 s", "Run x (new)",
                        "tiny teacher (0.52 M parameters) trained in 33.1 s",
                        "computing the teacher's top-32 logits for 779 windows × 64 tokens",
                        "  teacher logits: 320/779 windows"):
            w.log(message)
    at = _app().run()
    at.session_state["selected_run"] = setting_up
    _open(at, "live")
    assert not at.exception
    text = " ".join(_texts(at.markdown))
    assert "Setting up" in text and "Teacher logits" in text
    assert any("320/779" in str(p.proto.text) for p in at.get("progress"))


def _sweep_store(runs_root: Path) -> tuple[str, list[str]]:
    """A finished 3-trial sweep (trials recorded directly in its Optuna study), each trial an ordinary run."""
    import optuna

    from hybrid_optimization import sweep
    store = RunStore(runs_root)
    spec = sweep.SweepSpec(name="lr-search", params=[sweep.parse_param("base_learning_rate=1e-4:1e-2:log"),
                                                     sweep.parse_param("data_clusters=2:8")])
    study, _ = sweep.open_study(spec, sweep.default_storage(runs_root), "lr-search")
    ids = []
    for i, (lr, k, value) in enumerate(((1e-3, 4, 4.2), (3e-3, 2, 4.6), (2e-4, 8, 5.1))):
        run_id = write_synthetic_run(store, 30, "finished", name=f"lr-search-{i}", seed=i, tags=["sweep:lr-search"],
                                     config={"base_learning_rate": lr, "data_clusters": k})
        ids.append(run_id)
        study.add_trial(optuna.trial.create_trial(
            params={"base_learning_rate": lr, "data_clusters": k}, value=value, user_attrs={"run_id": run_id},
            distributions={"base_learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                           "data_clusters": optuna.distributions.IntDistribution(2, 8)}))
    return "lr-search", ids


def test_sweep_page_shows_results_and_launches_the_best_config(runs_root, started):
    name, ids = _sweep_store(runs_root)
    at = _open(_app().run(), "sweep")
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["complete"] == "3" and metrics["final validation loss"] == "4.2000" and metrics["Trial"] == "#0"
    figures = [_figure(c) for c in at.get("plotly_chart")]
    # Optuna's own figures (parallel coordinates, history, ...) are tested in tests/test_workbench_sweep.py.
    assert any(f["layout"]["title"]["text"].startswith("Parameter importance") for f in figures)
    at.button(key="sweep_launch_best").click().run()
    assert at.title[0].value == "Configure & launch"
    assert at.session_state["cfg.base_learning_rate"] == "0.001" and at.session_state["cfg.data_clusters"] == 4
    assert started == []                                # filled in, not launched


def test_sweep_page_starts_the_sweep_cli_with_the_chosen_space(runs_root, monkeypatch):
    from workbench import sweeps
    calls = []

    class Proc:
        pid = os.getpid()

        def poll(self):
            return None

    monkeypatch.setattr(sweeps.subprocess, "Popen", lambda argv, **kw: calls.append(argv) or Proc())
    at = _open(_app().run(), "sweep")
    at.text_input(key="sweep_name").input("my-sweep").run()
    at.number_input(key="sweep_trials").set_value(3).run()
    at.text_input(key="sweep_high.base_learning_rate").input("abc").run()
    assert any("base_learning_rate" in e and "numbers" in e for e in _texts(at.error))
    assert at.button(key="sweep_start").disabled
    at.text_input(key="sweep_high.base_learning_rate").input("0.05").run()
    at.button(key="sweep_start").click().run()
    (argv,) = calls
    assert argv[argv.index("--name") + 1] == "my-sweep" and argv[argv.index("--trials") + 1] == "3"
    assert "base_learning_rate=0.0001:0.05:log" in argv and argv[argv.index("--runs_root") + 1] == str(runs_root)
    sweeps._CHILDREN.clear()


def test_every_run_status_has_its_own_badge_colour():
    # A status without an entry would fall back to grey and look like "queued" (a diverged run did before).
    from hybrid_optimization.schema import RUN_STATUSES
    from workbench import ui
    assert set(RUN_STATUSES) <= set(ui.STATUS_COLORS)
    assert ui.STATUS_COLORS["diverged"] != ui.STATUS_COLORS["queued"]


# -- plain text: names, tags, notes and errors are never markdown or HTML ----------------------------------------------
HOSTILE_NAME = "![x](http://host/p.png) <b>x</b>"
TEXT_ELEMENTS = ("markdown", "caption", "error", "warning", "info", "success", "subheader", "title")


def _rendered_texts(at: AppTest) -> list[str]:
    return [str(e.value) for kind in TEXT_ELEMENTS for e in at.get(kind)]


def test_plain_escapes_every_markdown_and_html_construct():
    from workbench.ui import plain
    assert plain("![x](http://host/p.png)") == r"\!\[x\](http\://host/p.png)"
    assert plain("<b>x</b>") == r"\<b\>x\</b\>"
    assert plain(":red[x] $y$ a*b* _c_ snake_case") == r"\:red\[x\] \$y\$ a\*b\* \_c\_ snake_case"
    assert plain("# h\n- item\n1. n") == "\\# h  \n\\- item  \n1\\. n"
    assert plain("run-1 (seed 0)") == "run-1 (seed 0)"          # ordinary text stays as typed


def test_run_names_tags_and_errors_are_shown_literally_on_every_page(runs_root, started):
    from workbench.ui import plain
    store = RunStore(runs_root)
    run_id = write_synthetic_run(store, 60, "finished", name=HOSTILE_NAME, seed=0, tags=["<i>t</i>"])
    failed = write_synthetic_run(store, 30, "failed", name="crash ![y](http://host/q.png)", seed=1)
    store.set_status(failed, "lost", error="marked lost: ![z](http://host/r.png) <img src=x>")   # Live warns with it
    at = _app().run()
    for page, selected in (("live", run_id), ("summary", run_id), ("precision", run_id), ("clusters", run_id),
                           ("live", failed), ("summary", failed)):
        at.session_state["selected_run"] = selected
        _open(at, page)
        assert not at.exception, (page, [e.value for e in at.exception])
        texts = _rendered_texts(at)
        unescaped = [t for t in texts if re.search(r"(?<!\\)(!\[|<b>|<img|<i>)", t)]
        assert not unescaped, (page, unescaped)
        if page in ("live", "summary"):
            name = HOSTILE_NAME if selected == run_id else "crash ![y](http://host/q.png)"
            assert any(plain(name) in t for t in texts), (page, texts)
    # A field error quotes what was typed: escaped too.
    at.switch_page("workbench/pages/configure.py").run()
    at.text_input(key="cfg.base_learning_rate").input("![w](http://host/s.png)").run()
    errors = _texts(at.error)
    assert any(plain("![w](http://host/s.png)") in e for e in errors) and not any("![w](" in e for e in errors)


def test_one_number_per_label_on_precision_summary_and_live(runs_root):
    """Planned bits (codes only) and stored bits (codes + scales) are two numbers with two labels; each label shows
    the same value in the same format on every page. Elapsed says it includes setup; clusters say when a run did not
    cluster; a per-cluster chart has its y title."""
    store = RunStore(runs_root)
    hybrid = write_synthetic_run(store, 60, "finished", name="hybrid", seed=0)
    baseline = write_synthetic_run(store, 60, "finished", name="baseline", seed=1, hybrid=False)
    summary = {**store.get_run(hybrid)["summary"], "linear_bits_per_weight": 1.5873, "compression_vs_fp32_linear":
               32 / 1.5873, "avg_bits": 1.548}
    with store.writer(hybrid) as w:
        w.set_summary(summary)
    at = _app().run()
    at.session_state["selected_run"] = hybrid
    _open(at, "precision")
    precision = {m.label: m.value for m in at.metric}
    assert precision[headline.STORED_BITS_LABEL] == "1.59" and precision[headline.STORED_COMPRESSION_LABEL] == "20.2×"
    assert precision[headline.PLANNED_BITS_LABEL] != precision[headline.STORED_BITS_LABEL]   # two meanings, two labels
    _open(at, "summary")
    table = at.dataframe[0].value["value"]
    assert table[headline.STORED_BITS_LABEL] == "1.59" and table[headline.STORED_COMPRESSION_LABEL] == "20.2×"
    assert table[headline.PLANNED_BITS_LABEL] == headline.format_value("avg_bits", 1.548)
    _open(at, "live")
    assert headline.ELAPSED_LABEL in {m.label for m in at.metric}
    _open(at, "clusters")
    figures = {_figure(c)["layout"]["title"]["text"]: _figure(c) for c in at.get("plotly_chart")}
    assert figures["Validation loss per cluster"]["layout"]["yaxis"]["title"]["text"] == "loss (nats/token)"
    assert not any("did not cluster" in i.value for i in at.info)
    at.selectbox(key="clusters_run").set_value(baseline).run()
    assert any("did not cluster its data" in i.value for i in at.info)
    assert "Batches supplied per cluster" not in {_figure(c)["layout"]["title"]["text"] for c in at.get("plotly_chart")}
    assert not any("Balanced sampling" in c.value for c in at.caption)


def test_format_cell_leaves_empty_cells_empty():
    assert headline.format_cell("val_loss", None) == "" and headline.format_cell("val_loss", float("nan")) == ""
    assert headline.format_cell("tokens_per_s", 294.137) == "294" == headline.format_value("tokens_per_s", 294.137)


def test_live_y_titles_follow_the_trust_region_mode_and_fit(runs_root):
    store = RunStore(runs_root)
    relative = write_synthetic_run(store, 60, "finished", name="rel", seed=0, config={"trust_region_mode": "relative"})
    absolute = write_synthetic_run(store, 60, "finished", name="abs", seed=1, config={"trust_region_mode": "absolute"})
    default = write_synthetic_run(store, 60, "finished", name="default", seed=2)       # --hybrid's default: rms
    at = _app().run()
    titles = {}
    at.session_state["selected_run"] = relative
    at.session_state["live_charts.hybrid"] = ["Trust radius", "Tokens/s"]
    _open(at, "live")
    for run_id in (relative, absolute, default):
        at.selectbox(key="live_run").set_value(run_id).run()
        assert not at.exception
        titles[run_id] = {title: panel["yaxis"]["title"]["text"] for title, panel in _live_panels(at).items()}
    assert titles[relative]["Trust radius"].startswith("μ (fraction of ‖W‖₂")
    assert titles[absolute]["Trust radius"] == "μ (L2 norm)"
    assert titles[default]["Trust radius"] == "μ (update RMS ÷ 0.001)"          # schema.MAX_UPDATE_RMS
    # Both charts are subplots of one figure on one x axis (zoom and hover together), not separate charts.
    assert len(at.get("plotly_chart")) == 1 and set(titles[absolute]) == {"Trust radius", "Tokens/s"}
    at.multiselect(key="live_charts.hybrid").set_value(["Tokens/s"]).run()
    tokens = _live_panels(at)["Tokens/s"]
    # A 300 px chart's vertical title longer than ~20 characters ran into the chart title.
    assert len(tokens["layout"]["yaxis"]["title"]["text"]) <= 20


def test_live_draws_each_setup_stage_with_its_progress_and_eta(runs_root):
    """The first launch: the store's setup stages (the trainer's RunWriter.stage) drawn as bars with n/N and an
    ETA — the tiny teacher's training steps, then the teacher logits — and refreshed on the next tick."""
    store = RunStore(runs_root)
    run_id = store.create_run(HybridTrainingConfig().to_dict(), {"argv": ["--hybrid"]}, "tiny", name="first",
                              status="queued", total_steps=100)
    writer = store.writer(run_id)
    writer.set_pid(os.getpid())
    writer.set_status("running")
    writer.stage("data")
    writer.stage("data", ended=True)
    writer.stage("teacher")
    writer.flush()
    time.sleep(0.2)
    writer.stage("teacher", done=50, total=200)
    writer.flush()
    at = _app().run()
    at.session_state["selected_run"] = run_id
    _open(at, "live")
    assert not at.exception
    bars = {str(p.proto.text): p.value for p in at.get("progress")}
    teacher = next(text for text in bars if "50/200 training steps" in text)
    assert "left" in teacher and bars[teacher] == 25           # st.progress keeps percent
    assert "Setting up" in " ".join(_texts(at.markdown)) and "Teacher logits" in " ".join(_texts(at.markdown))
    writer.stage("teacher", ended=True)
    writer.stage("teacher_logits", done=300, total=779)
    writer.flush()
    at.run()                                                     # the fragment's next tick
    assert any("300/779 windows" in str(p.proto.text) for p in at.get("progress"))
    writer.set_status("finished")
    writer.close()


def test_benchmarks_page_tells_a_newcomer_what_to_use(monkeypatch):
    """The committed two-track report: one sentence per situation from its verdict, every method name explained,
    no "–×", no infinite ratio called indistinguishable, and the figures of figures.html drawn (not loaded from a
    CDN)."""
    root = Path(APP).parent / "benchmarks" / "results"
    if not (root / "variants" / "report.md").is_file():
        pytest.skip("the committed variants report is not in this checkout")
    monkeypatch.setenv("HYBRID_BENCHMARK_RESULTS", str(root))
    at = _open(_app().run(), "benchmarks")
    at.selectbox(key="benchmark_report").set_value(root / "variants").run()
    assert not at.exception, [e.value for e in at.exception]
    texts = _texts(at.markdown)
    advice = next(t for t in texts if "**LR tuned** →" in t)
    assert "**LR unknown** →" in advice and "(H-rel) ends lowest of all over the grid" in advice   # best: H-rel
    assert "**H with the relative trust region" in advice          # named by the report's results.json
    glossary = " ".join(texts)
    for term in ("**H**:", "**H-rel**:", "**W2**:", "**AlgoPerf**:"):
        assert term in glossary, term
    assert not any("–×" in t for t in texts)
    assert not any(re.search(r"∞ \[[^\]]*\]×[^()]*\((indistinguishable|not distinguishable)\)", t) for t in texts)
    assert any(t.startswith("### Figures (") for t in texts) and len(at.get("plotly_chart")) >= 1
    if "## LR robustness" in (root / "variants" / "report.md").read_text():
        assert "### LR robustness" in texts          # the robustness table is shown open, not folded


def test_figures_are_read_out_of_figures_html():
    import plotly.graph_objects as go
    from workbench import bench_view
    html = go.Figure(go.Scatter(x=[1, 2], y=[3, 4], name="H")).to_html(include_plotlyjs="cdn")
    (fig,) = bench_view.figures_from_html(html + html.replace('"H"', '"AdamW"'))[:1]
    assert list(fig.data[0].y) == [3, 4] and fig.data[0].name == "H"
    assert len(bench_view.figures_from_html(html + html)) == 2 and bench_view.figures_from_html("<html/>") == []


def test_chat_page_draws_before_importing_torch(runs_root):
    """Chat was blank for ~4 s while `import torch` ran before its first element: the page must draw its header
    (and its run picker) without importing torch; the models load later, under a spinner."""
    write_synthetic_run(RunStore(runs_root), 20, "running", name="not finished", seed=0)
    code = ("import sys\nfrom streamlit.testing.v1 import AppTest\n"
            f"at = AppTest.from_file({APP!r}, default_timeout=60)\nat.run()\n"
            "at.switch_page('workbench/pages/chat.py').run()\n"
            "assert not at.exception, at.exception\n"
            "print(at.title[0].value, '|', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HYBRID_RUNS_ROOT": str(runs_root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "Chat | False"


def test_form_launches_with_the_optimizer_menu_and_report_to(runs_root, started):
    from hybrid_optimization.schema import BASE_OPTIMIZERS, SCHEDULES
    at = _app().run()
    assert at.selectbox(key="opt.optimizer").options[1:] == list(BASE_OPTIMIZERS)
    assert at.selectbox(key="opt.schedule").options == ["default", *SCHEDULES]
    assert at.number_input(key="opt.warmup_steps").value is None      # auto: 5 % of the steps with a schedule
    at.toggle(key="opt.hybrid").set_value(False).run()
    at.selectbox(key="opt.optimizer").set_value("sgd").run()
    at.selectbox(key="opt.schedule").set_value("cosine").run()
    at.number_input(key="opt.warmup_steps").set_value(5).run()
    at.number_input(key="cfg.max_steps").set_value(40).run()
    assert not at.button(key="launch").disabled, _texts(at.error)
    at.button(key="launch").click().run()
    (argv,) = started
    options = json.loads(Path(argv[2].split("=", 1)[1]).read_text())
    assert (options["optimizer"], options["schedule"], options["warmup_steps"]) == ("sgd", "cosine", 5)
    assert options["report_to"] == []
    # A combination the menu refuses is named under its field, and Launch stays off.
    at = _app().run()
    at.number_input(key="opt.warmup_steps").set_value(-1).run()
    assert at.button(key="launch").disabled and any(e.startswith("-1 is invalid") for e in _texts(at.error))


def test_live_charts_are_named_in_the_url(runs_root):
    (run_id,) = _store_of("hybrid", runs_root).values()
    at = _app()
    at.query_params["run"] = run_id
    at.query_params["chart"] = ["Tokens/s", "Flip rate", "no such chart"]
    at.run()
    _open(at, "live")
    assert at.multiselect(key="live_charts.hybrid").value == ["Tokens/s", "Flip rate"]
    at.multiselect(key="live_charts.hybrid").set_value(["Loss"]).run()
    assert at.query_params["chart"] in ("Loss", ["Loss"])     # AppTest gives a single value unwrapped


def test_live_overlays_other_runs_grouped_with_a_band_and_the_teacher_line(runs_root):
    """Live overlays other runs and groups them as Compare does (one median line over a min–max band per group,
    the run count in the legend); the teacher's held-out loss is a reference line on the validation loss; and the
    whole view is in the URL, so a second session opened on that link shows the same."""
    store = RunStore(runs_root)
    main = write_synthetic_run(store, 120, "finished", name="main", seed=0)
    with store.writer(main) as w:
        w.set_teacher_val_loss(2.75)
    seeds = [write_synthetic_run(store, 120, "finished", name=f"lr3-s{i}", seed=i + 1,
                                 config={"base_learning_rate": 3e-3}) for i in range(3)]
    other = write_synthetic_run(store, 120, "finished", name="lr1", seed=9, config={"base_learning_rate": 1e-3})
    at = _app().run()
    at.session_state["selected_run"] = main
    at.session_state["live_charts.hybrid"] = ["Loss", "Validation loss"]
    _open(at, "live")
    panels = _live_panels(at)
    assert [s["label"]["text"] for s in panels["Validation loss"]["shapes"]] == ["teacher 2.75"]
    assert panels["Loss"]["shapes"] == []
    at.multiselect(key="live_overlays").set_value([*seeds, other]).run()
    at.selectbox(key="live_group").set_value("cfg.base_learning_rate").run()
    assert not at.exception
    loss = _live_panels(at)["Loss"]
    legend = [t["name"] for t in loss["data"] if t.get("showlegend")]
    assert legend == [f"main ({main})", "base_learning_rate = 0.003 (n=3)", "base_learning_rate = 0.001 (n=1)"]
    # The band of the 3-seed group holds its median line: low <= center <= high at every x, and it has width.
    band = [t for t in loss["data"] if t.get("legendgroup") == "group:base_learning_rate = 0.003"]
    high, low, center = (np.asarray(t["y"], dtype=float) for t in band)
    assert np.all(low <= center + 1e-12) and np.all(center <= high + 1e-12)
    assert (high - low).max() > 0 and band[1]["fill"] == "tonexty"
    seed_losses = [queries.read_steps(store, r).loss.to_numpy() for r in seeds]
    assert high.max() <= max(s.max() for s in seed_losses) + 1e-9     # the band spans the seeds' smoothed curves
    assert at.query_params["group"] in ("cfg.base_learning_rate", ["cfg.base_learning_rate"])
    # A second session opened on the URL restores the same view.
    link = AppTest.from_file(APP, default_timeout=60)
    for key, value in at.query_params.items():
        link.query_params[key] = value
    link.run()
    _open(link, "live")
    assert link.multiselect(key="live_overlays").value == [*seeds, other]
    assert link.selectbox(key="live_group").value == "cfg.base_learning_rate"
    assert link.multiselect(key="live_charts.hybrid").value == ["Loss", "Validation loss"]
    assert [t["name"] for t in _live_panels(link)["Loss"]["data"] if t.get("showlegend")] == legend


def test_live_view_persists_smoothing_axis_and_log_y_in_the_url(runs_root):
    (run_id,) = _store_of("hybrid", runs_root).values()
    at = _app()
    at.query_params.update({"run": run_id, "smooth": "0.9", "x": "wall time", "logy": ["Loss", "nonsense"],
                            "chart": ["Loss", "Tokens/s"]})
    at.run()
    _open(at, "live")
    assert at.slider(key="live_smoothing").value == 0.9 and at.radio(key="live_x").value == "wall time"
    assert at.multiselect(key="live_logy").value == ["Loss"]
    panels = _live_panels(at)
    assert panels["Loss"]["yaxis"]["type"] == "log" and panels["Tokens/s"]["yaxis"]["type"] == "linear"
    assert panels["Loss"]["xaxis"]["title"]["text"] == "seconds since the first step"
    at.slider(key="live_smoothing").set_value(0.3).run()
    at.radio(key="live_x").set_value("step").run()
    assert at.query_params["smooth"] in ("0.3", ["0.3"]) and "x" not in at.query_params   # default: left out
    assert at.slider(key="live_smoothing").value == 0.3          # the session keeps it across reruns

    # A link with values that cannot apply: each is left out, the first named in one line, the rest applies.
    bad = _app()
    bad.query_params.update({"run": run_id, "smooth": "abc", "x": "epochs", "chart": ["Loss", "no such chart"]})
    bad.run()
    _open(bad, "live")
    assert not bad.exception and bad.multiselect(key="live_charts.hybrid").value == ["Loss"]
    from workbench.ui import plain
    why = plain("not a chart of this run (and 2 more parameter(s) of this link)")
    assert [w.value for w in bad.warning] == [f"The link's chart={plain('no such chart')} is ignored: {why}."]
    assert bad.slider(key="live_smoothing").value == queries.DEFAULT_SMOOTHING and bad.radio(key="live_x").value == "step"


def test_form_launch_carries_the_trackers_picked_under_also_report_to(runs_root, started, monkeypatch):
    """issue 20: picking TensorBoard under 'Also report to' launches the CLI with report_to=["tensorboard"] in its
    options file and in the run's stored options; a tracker whose package is missing is named under the field and
    Launch stays off."""
    from hybrid_optimization.distill import report_to
    at = _app().run()
    assert at.multiselect(key="opt.report_to").options == list(report_to.REPORT_TO)
    at.multiselect(key="opt.report_to").select("tensorboard").run()
    assert not at.button(key="launch").disabled, _texts(at.error)
    at.button(key="launch").click().run()
    (argv,) = started
    options = json.loads(Path(argv[2].split("=", 1)[1]).read_text())
    assert options["report_to"] == ["tensorboard"]
    run = RunStore(runs_root).get_run(at.session_state["launched_run"])
    assert run["args"]["options"]["report_to"] == ["tensorboard"]
    # Without the package (simulated: its module is looked up under a name that does not exist), one line names it.
    monkeypatch.setitem(report_to.BACKENDS, "mlflow", ("no_such_tracker_module", "mlflow", "mlflow-skinny==3.17.2"))
    at = _app().run()
    at.multiselect(key="opt.report_to").select("mlflow").run()
    assert at.button(key="launch").disabled
    from workbench.ui import plain
    needs = plain("mlflow needs the 'mlflow' extra: pip install 'hybrid-optimization[mlflow]' "
                  "(in a checkout: pip install mlflow-skinny==3.17.2)")
    assert _texts(at.error) == [needs]
