"""`--report_to tensorboard,mlflow`: a real pipeline run (tiny preset) mirrored into TensorBoard and MLflow, read back
with each tool's own reader (TensorBoard's EventAccumulator, MLflow's MlflowClient) and compared with the run store:
every step's loss, every evaluation, the config (hparams / params) and the final summary. Also: MLflow honours
MLFLOW_TRACKING_URI, a resumed run continues its MLflow run, and asking for a back-end that is not installed (or
does not exist) is one line, exit 2, before anything starts.
"""
import importlib.util
import json
import math
import os

import pytest

from hybrid_optimization.distill import reporting
from hybrid_optimization.distill.reporting import (MLFLOW_RUN_FILE, TENSORBOARD_DIR, report_to_error,
                                                   tracking_uri)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS, EVAL_EVERY = 6, 3


def _tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()}
    texts = {tag: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    return scalars, hparams, texts


def _mlflow(run_dir, uri):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"]
    return client, client.get_run(run_id)


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    """One tiny hybrid QAT run with both back-ends, evaluated every 3 steps; MLflow at MLFLOW_TRACKING_URI."""
    from hybrid_optimization.distill.options import TrainOptions
    from hybrid_optimization.distill.train import train
    from hybrid_optimization.tracking import RunStore
    root = tmp_path_factory.mktemp("reported")
    elsewhere = f"sqlite:///{root / 'elsewhere.db'}"
    with pytest.MonkeyPatch.context() as mp:
        # conftest's cache isolation is per test and runs after a module fixture: the same folder, set here
        mp.setenv("HYBRID_CACHE_DIR", os.environ.get("HYBRID_TEST_CACHE_DIR",
                                                     str(tmp_path_factory.getbasetemp() / "hybrid-cache")))
        mp.setenv("MLFLOW_TRACKING_URI", elsewhere)
        result = train(TrainOptions(hybrid=True, qat=True, ternary=True, max_steps=STEPS, eval_every_steps=EVAL_EVERY,
                                    eval_windows=8, quiet=True, progress=False, runs_root=str(root / "runs"),
                                    data_clustering=False, param_clustering=False,      # (faster; not the point)
                                    run_name="reported", report_to=["tensorboard", "mlflow"]))
    assert result.exit_code == 0
    store = RunStore(root / "runs")
    return store, result.run_id, store.run_dir(result.run_id), elsewhere


def test_tensorboard_event_file_matches_the_store(reported_run):
    store, run_id, run_dir, _ = reported_run
    scalars, hparams, texts = _tensorboard(run_dir)
    steps = store.read_steps(run_id)
    assert sorted(scalars["train/loss"]) == steps.column("step") == list(range(1, STEPS + 1))
    for row in steps:
        for name in ("loss", "learning_rate", "lr_multiplier", "trust_radius", "gradient_magnitude"):
            if row[name] is not None:         # event files hold float32
                assert scalars[f"train/{name}"][row["step"]] == pytest.approx(row[name], rel=1e-6), name
    evals = store.read_evals(run_id)
    assert {r["step"] for r in evals} == {EVAL_EVERY, STEPS}
    for r in evals:
        if math.isfinite(r["value"]):
            assert scalars[f"eval/{r['key']}"][r["step"]] == pytest.approx(r["value"], rel=1e-6), r["key"]
    config = store.get_run(run_id)["config"]
    assert hparams["config.base_learning_rate"] == pytest.approx(config["base_learning_rate"])
    assert hparams["config.use_auxiliary_nn"] == 1.0 and hparams["options.preset"] == "tiny"    # (bools as 1/0)
    summary = store.get_run(run_id)["summary"]
    assert scalars["summary/final_loss"][STEPS] == pytest.approx(summary["final_loss"], rel=1e-6)
    assert scalars["summary/val_loss"][STEPS] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert "HYBRID OPTIMIZATION SUMMARY" in texts["summary/text_summary"]


def test_mlflow_run_matches_the_store_at_the_tracking_uri(reported_run):
    store, run_id, run_dir, elsewhere = reported_run
    assert not (store.root / reporting.MLFLOW_DB).exists()          # MLFLOW_TRACKING_URI was honoured
    client, run = _mlflow(run_dir, elsewhere)
    assert run.info.status == "FINISHED" and run.info.run_name == "reported"
    assert run.data.tags["hybrid.run_id"] == run_id
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == {r["step"]: r["loss"] for r in store.read_steps(run_id, columns=["loss"])}   # exact
    for r in store.read_evals(run_id):
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"eval/{r['key']}")}
        assert got[r["step"]] == pytest.approx(r["value"], nan_ok=True), r["key"]
    config = store.get_run(run_id)["config"]
    assert float(run.data.params["config.base_learning_rate"]) == config["base_learning_rate"]
    assert run.data.params["options.report_to"] == '["tensorboard", "mlflow"]'
    summary = store.get_run(run_id)["summary"]
    assert run.data.metrics["summary/final_loss"] == summary["final_loss"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.txt", "summary.json"} <= artifacts
    elsewhere_folder = elsewhere[len("sqlite:///"):].rsplit("/", 1)[0]        # beside that database, not in ./mlruns
    assert run.info.artifact_uri.startswith(f"file://{elsewhere_folder}/mlartifacts/")


def test_default_mlflow_store_is_inside_the_runs_root_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    """Without MLFLOW_TRACKING_URI: <runs root>/mlflow.db; a resumed run logs into the same MLflow run."""
    from types import SimpleNamespace

    from hybrid_optimization.schema import StepMetrics
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "r1"
    run_dir.mkdir()

    def segment(steps, resumed, status, scale=1.0):
        reporter = reporting.reporter_for_run("mlflow,tensorboard", run_dir, tmp_path, run_id="r1", run_name=None,
                                              config={"lr": 0.1}, options={}, resumed=resumed)
        state = SimpleNamespace(step=steps[0] - 1, evals=[])
        reporter.on_fit_start(state)
        for step in steps:
            state.step = step
            reporter.on_step_end(state, StepMetrics(step=step, loss=scale / step))
        reporter.on_fit_end(state)
        reporter.on_summary({"final_loss": scale / steps[-1]}, status)

    segment([1, 2, 3], False, "stopped")          # a lost segment: its checkpoint was at step 2
    segment([3, 4], True, "finished", scale=2.0)  # resumed from step 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == \
        [(1, 1.0), (2, 0.5), (3, 0.6667), (4, 0.5)]                     # step 3 once: the resumed segment's
    assert (tmp_path / reporting.MLFLOW_DB).is_file() and tracking_uri(tmp_path).startswith("sqlite:///")
    client, run = _mlflow(run_dir, tracking_uri(tmp_path))
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 3, 4]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert run.info.artifact_uri.startswith((tmp_path / reporting.MLFLOW_ARTIFACTS).resolve().as_uri())


@pytest.mark.parametrize("missing", ["tensorboard", "mlflow"])
def test_a_missing_backend_is_one_line_exit_2_before_anything_starts(tmp_path, capsys, monkeypatch, missing):
    from hybrid_optimization.distill.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    assert main(["--report_to", f"tensorboard,{missing}", "--runs_root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{missing}' extra" in err and f"hybrid-optimization[{missing}]" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_unknown_backend_and_parsing():
    assert report_to_error(["wandb"]) == ("--report_to wandb is invalid: it must be a comma-separated list of "
                                          "tensorboard, mlflow")
    assert reporting.parse_report_to(" TensorBoard, mlflow,tensorboard ") == ("tensorboard", "mlflow")
    assert reporting.parse_report_to("none") == () and report_to_error("none") is None
    from hybrid_optimization.distill.options import TrainOptions
    assert TrainOptions(report_to="tensorboard,mlflow").report_to == ["tensorboard", "mlflow"]
    assert TrainOptions(report_to=["nope"]).errors()["report_to"].startswith("--report_to nope is invalid")


class _Crash:
    """A user callback that raises after the reporter has logged `at` steps (order 85: after ReportTo's 75)."""
    order = 85

    def __init__(self, at, exc):
        self.at, self.exc = at, exc

    def on_step_end(self, state, metrics):
        if state.step == self.at:
            raise self.exc


@pytest.mark.parametrize("exc, status", [(RuntimeError("boom at step 3"), "FAILED"),
                                         (KeyboardInterrupt(), "KILLED")])
def test_a_crashed_or_interrupted_run_does_not_stay_running_in_mlflow(tmp_path, monkeypatch, exc, status,
                                                                      reported_run):
    """A run that ends without a summary (an exception in training; a second Ctrl-C) ends its MLflow run FAILED or
    KILLED — it used to stay RUNNING forever — with the steps it logged sent and its TensorBoard file closed."""
    from hybrid_optimization.distill.options import TrainOptions
    from hybrid_optimization.distill.train import train
    from hybrid_optimization.tracking import RunStore
    # the module's MLflow store (a new SQLite store costs its migrations, ~3 s); the default one is tested above
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reported_run[3])
    runs = tmp_path / "runs"
    with pytest.raises(type(exc)):
        train(TrainOptions(max_steps=6, eval_every_steps=1000, eval_windows=8, quiet=True, progress=False,
                           runs_root=str(runs), data_clustering=False, param_clustering=False,
                           report_to=["tensorboard", "mlflow"], callbacks=[_Crash(3, exc)]))
    store = RunStore(runs)
    run_id, = [r["run_id"] for r in store.list_runs()]
    assert store.get_run(run_id)["status"] in ("failed", "stopped")
    run_dir = store.run_dir(run_id)
    client, run = _mlflow(run_dir, tracking_uri(runs))
    assert run.info.status == status and run.info.end_time is not None
    assert run.data.tags["hybrid.error"].startswith(type(exc).__name__)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == {r["step"]: r["loss"] for r in store.read_steps(run_id, columns=["loss"])}
    assert sorted(history) == [1, 2, 3]
    scalars, _, _ = _tensorboard(run_dir)                             # flushed and closed: readable, all 3 steps
    assert sorted(scalars["train/loss"]) == [1, 2, 3]


def test_a_run_killed_with_sigkill_ends_its_mlflow_run_when_the_store_marks_it_lost(tmp_path, monkeypatch,
                                                                                   reported_run):
    """kill -9 gives a run no chance to end its MLflow run. The workbench's upkeep (launcher.mark_lost) marks the run
    lost in the store and ends the MLflow run it recorded as KILLED, with the reason in tag hybrid.error; a run still
    alive, or one that reported to MLflow nothing, is left alone, and a second upkeep changes nothing."""
    import subprocess

    from mlflow.tracking import MlflowClient

    from hybrid_optimization.tracking import RunStore
    from workbench import launcher
    store = RunStore(tmp_path / "runs")
    uri = reported_run[3]              # the module's MLflow store (a new SQLite store costs its migrations, ~3 s)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("kill9", artifact_location=reporting.local_artifacts(uri))
    dead = subprocess.Popen(["true"])
    dead.wait()
    runs = {}
    for name, pid, mirrored in (("killed", dead.pid, True), ("alive", os.getpid(), True),
                                ("unmirrored", dead.pid, False)):
        rid = store.create_run({}, {}, "tiny", name=name, status="running")
        store.update_run(rid, pid=pid)
        if mirrored:                                   # what reporting._open_mlflow records in the run folder
            mlflow_id = client.create_run(experiment).info.run_id
            (store.root / rid / MLFLOW_RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": mlflow_id}))
            runs[name] = (rid, mlflow_id)
        else:
            runs[name] = (rid, None)
    assert sorted(launcher.mark_lost(store)) == sorted([runs["killed"][0], runs["unmirrored"][0]])
    killed = client.get_run(runs["killed"][1])
    assert killed.info.status == "KILLED" and killed.info.end_time is not None
    assert killed.data.tags["hybrid.error"].startswith("lost: ") and str(dead.pid) in killed.data.tags["hybrid.error"]
    assert client.get_run(runs["alive"][1]).info.status == "RUNNING"
    assert store.get_run(runs["alive"][0])["status"] == "running"
    assert launcher.mark_lost(store) == []
    assert reporting.end_lost_mlflow_runs({runs["killed"][0]: store.root / runs["killed"][0]}) == []   # once only
