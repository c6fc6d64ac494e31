"""Report a run to TensorBoard and/or MLflow as well as to the run store: `--report_to tensorboard,mlflow` (the
Hugging Face Trainer's `report_to` convention), so the run shows in the dashboard a user already has open.

What is written, for both back-ends (same names in both):
    train/<name>     every step's numbers (the store's step columns: loss, learning_rate, trust_radius, ...)
    eval/<name>      every evaluation (val_loss, val_ppl, kl, top1_agreement, ...), at the step it ran
    config           the run's HybridTrainingConfig and pipeline options: TensorBoard hparams + a text copy, MLflow
                     params (flattened, `config.<field>` / `options.<name>`)
    summary/<name>   the final summary's numbers at the last step, and the summary block as text
                     (TensorBoard text `summary`, MLflow artifact `summary.txt`); MLflow's run ends FINISHED, KILLED
                     (stopped) or FAILED (diverged); a run that crashes or is interrupted without a summary ends
                     FAILED / KILLED too, with tag `hybrid.error` (on_failure, from RunSession's exit); a run
                     killed with SIGKILL cannot: when the store marks it lost, the workbench ends its MLflow run
                     KILLED with tag `hybrid.error` "lost: …" (end_lost_mlflow_runs)

Where: TensorBoard event files in `<run folder>/tensorboard/` (`tensorboard --logdir <runs root>` shows every run).
MLflow: `$MLFLOW_TRACKING_URI` when set, else a local SQLite store `<runs root>/mlflow.db`; a SQLite store's
artifacts go to `mlartifacts/` beside its database (`mlflow ui --backend-store-uri sqlite:///<runs root>/mlflow.db`);
experiment `$MLFLOW_EXPERIMENT_NAME` or "hybrid-distillation", run name = the run's name or id, tag `hybrid.run_id`. A resumed
run continues the same MLflow run (its id is kept in `<run folder>/mlflow_run.json`); steps a lost segment logged
after its last checkpoint are purged from TensorBoard's view, while MLflow (which cannot delete a metric value)
keeps both values of such a step.

Both back-ends are optional extras (`pip install .[tensorboard]`, `.[mlflow]`): this module imports neither until a
run asks for it, and `report_to_error` (called by TrainOptions' validation, before anything starts) names the
missing extra in one line. Only the main process of a multi-process run reports.
"""
from __future__ import annotations

import json
import math
import os
import time
from numbers import Real
from pathlib import Path
from typing import Any

from .report_to import BACKENDS, REPORT_TO, parse_report_to, report_to_error  # noqa: F401  (re-exported)

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
MLFLOW_RUN_FILE = "mlflow_run.json"
DEFAULT_EXPERIMENT = "hybrid-distillation"
MLFLOW_FLUSH_EVERY_S = 5.0        # step metrics go to MLflow in batches (one SQLite transaction per batch)
PARAM_VALUE_LIMIT = 500


def flat_config(config: dict | None, options: dict | None) -> dict[str, Any]:
    """config.<field> and options.<name>: numbers, strings and booleans as they are, anything else as JSON text."""
    out: dict[str, Any] = {}
    for prefix, values in (("config", config or {}), ("options", options or {})):
        for key, value in values.items():
            if prefix == "options" and key in ("hybrid_config", "callbacks", "optimizer_factory", "given"):
                continue
            if not (isinstance(value, (bool, str)) or isinstance(value, Real) and math.isfinite(float(value))):
                value = json.dumps(value, default=str)
            out[f"{prefix}.{key}"] = value
    return out


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numeric entries (booleans as 0/1; None and text left out)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, Real) and not isinstance(v, complex)}


class ReportTo:
    """Training-loop callback (loop.fit's hooks) that mirrors a run into TensorBoard and/or MLflow.

    Place it after Evaluation in the callbacks list (it picks up `state.evals` entries of the step), and call
    `on_summary(summary, status, text)` once the run's summary is made (train.finish); it closes the writers.
    """

    order = 75                    # after Evaluation (its rows) and the stop check; before the checkpoint

    def __init__(self, backends, run_dir: str | Path, runs_root: str | Path, *, run_id: str = "",
                 run_name: str | None = None, config: dict | None = None, options: dict | None = None,
                 resumed: bool = False):
        self.backends = parse_report_to(backends)
        error = report_to_error(self.backends)
        if error:
            raise ValueError(error)
        self.run_dir, self.runs_root = Path(run_dir), Path(runs_root)
        self.run_id, self.run_name, self.resumed = run_id, run_name or run_id, resumed
        self.params = flat_config(config, options)
        self.tb = None                # torch.utils.tensorboard.SummaryWriter
        self.mlflow = None            # (MlflowClient, mlflow run id)
        self._seen_evals = 0
        self._pending: list = []      # mlflow Metric rows not yet sent
        self._flushed_at = time.monotonic()
        self.last_step = 0

    # -- hooks ----------------------------------------------------------------------------------------------------
    def open(self, start_step: int | None = None) -> "ReportTo":
        """Start the back-ends (imports, MLflow's store and run). The pipeline calls it while setting up, so the
        seconds it takes (a first MLflow SQLite store creates its tables) do not count as training time. A resumed
        run's event writer waits for `start_step` (fit start): TensorBoard then hides the steps after the checkpoint
        that the lost segment had logged (purge_step), so each step shows once."""
        if "tensorboard" in self.backends and self.tb is None:
            if self.resumed and start_step is None:
                import torch.utils.tensorboard  # noqa: F401  (imported now, opened at fit start)
            else:
                self._open_tensorboard(start_step)
        if "mlflow" in self.backends and self.mlflow is None:
            self._open_mlflow()
        return self

    def on_fit_start(self, state) -> None:
        self._seen_evals = len(state.evals)
        self.last_step = state.step
        self.open(state.step)

    def on_step_end(self, state, metrics) -> None:
        self.last_step = state.step
        self.log(state.step, {f"train/{k}": v for k, v in _numbers(metrics.store_values()).items()})
        for row in state.evals[self._seen_evals:]:
            self.log(int(row["step"]), {f"eval/{k}": v for k, v in _numbers(row).items() if k != "step"})
        self._seen_evals = len(state.evals)
        if self.mlflow is not None and time.monotonic() - self._flushed_at >= MLFLOW_FLUSH_EVERY_S:
            self._flush_mlflow()

    def on_fit_end(self, state) -> None:
        self._flush_mlflow()
        if self.tb is not None:
            self.tb.flush()

    def on_summary(self, summary: dict, status: str = "finished", text: str | None = None,
                   step: int | None = None) -> None:
        """The run's final numbers (RunSummary.to_dict()) and its rendered block; ends the reporting."""
        step = self.last_step if step is None else step
        self.log(step, {f"summary/{k}": v for k, v in _numbers(summary).items()})
        if self.tb is not None:
            if text:
                self.tb.add_text("summary", "```\n" + text + "\n```", step)
            self.tb.close()
            self.tb = None
        if self.mlflow is not None:
            client, run_id = self.mlflow
            self._flush_mlflow()
            if text:
                client.log_text(run_id, text + "\n", "summary.txt")
            client.log_dict(run_id, summary, "summary.json")
            client.set_terminated(run_id, {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))
            self.mlflow = None

    def on_failure(self, status: str = "failed", error: str = "") -> None:
        """The run ended without a summary (an exception, a second Ctrl-C, a stop during set-up; RunSession's exit
        calls this): the steps logged so far are sent, the event file is closed, and the MLflow run ends FAILED
        ("failed") or KILLED ("stopped") with the error in tag `hybrid.error` instead of staying RUNNING. A no-op
        once on_summary has ended the reporting. Never raises: the run's own error is the one to show."""
        if self.tb is not None:
            try:
                self.tb.close()
            except Exception:
                pass
            self.tb = None
        if self.mlflow is not None:
            client, run_id = self.mlflow
            try:
                self._flush_mlflow()
                if error:
                    client.set_tag(run_id, "hybrid.error", error[:PARAM_VALUE_LIMIT])
            except Exception:
                pass
            try:
                client.set_terminated(run_id, "KILLED" if status == "stopped" else "FAILED")
            except Exception:
                pass
            self.mlflow = None

    # -- writing ----------------------------------------------------------------------------------------------------
    def log(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if self.mlflow is not None:
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            self._pending.extend(Metric(key, value, now, step) for key, value in values.items())

    def _flush_mlflow(self) -> None:
        if self.mlflow is None or not self._pending:
            return
        client, run_id = self.mlflow
        for start in range(0, len(self._pending), 1000):          # MLflow's limit per log_batch call
            client.log_batch(run_id, metrics=self._pending[start:start + 1000])
        self._pending = []
        self._flushed_at = time.monotonic()

    def _open_tensorboard(self, start_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        purge = start_step + 1 if self.resumed and start_step is not None else None
        self.tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)
        if not self.resumed:
            # hparams in this writer's own event file (add_hparams would open a second writer in a subfolder)
            for summary in hparams(self.params, {}):
                self.tb._get_file_writer().add_summary(summary)
            self.tb.add_text("config", "```\n" + json.dumps(self.params, indent=1, default=str) + "\n```", 0)

    def _open_mlflow(self) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(self.runs_root)
        client = MlflowClient(tracking_uri=uri)
        record = self.run_dir / MLFLOW_RUN_FILE
        if self.resumed and record.is_file():
            kept = json.loads(record.read_text())
            if kept.get("tracking_uri") == uri:
                client.update_run(kept["run_id"], status="RUNNING")
                self.mlflow = (client, kept["run_id"])
                return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = client.create_experiment(name, artifact_location=local_artifacts(uri))
        run = client.create_run(experiment_id, run_name=self.run_name,
                                tags={"hybrid.run_id": self.run_id, "hybrid.run_dir": str(self.run_dir)})
        run_id = run.info.run_id
        params = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in self.params.items()]
        for start in range(0, len(params), 100):                     # MLflow's limit of params per batch
            client.log_batch(run_id, params=params[start:start + 100])
        client.log_batch(run_id, tags=[RunTag("mlflow.note.content", f"hybrid_optimization run {self.run_id}")])
        record.write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}) + "\n")
        self.mlflow = (client, run_id)


def end_lost_mlflow_runs(run_dirs: dict[str, Path], reasons: dict[str, str] | None = None) -> list[str]:
    """A run killed with SIGKILL (or whose machine went down) never reaches on_failure, so its MLflow run would stay
    RUNNING for ever. When the run store marks such runs lost (RunStore.refresh_liveness), this ends the MLflow run
    each one recorded in its folder's mlflow_run.json as KILLED, with the reason in tag `hybrid.error` — the same
    ending a stopped run gets. Runs without a record cost nothing (mlflow is imported only for a record); one that
    cannot be reached is skipped, never raised: the caller is the workbench's page upkeep. Returns the store run ids
    whose MLflow run it ended."""
    records = {}
    for run_id, run_dir in run_dirs.items():
        try:
            records[run_id] = json.loads((Path(run_dir) / MLFLOW_RUN_FILE).read_text())
        except (OSError, ValueError):
            continue
    if not records:
        return []
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:                 # the extra is not installed here: nothing this process can end
        return []
    ended = []
    for run_id, record in records.items():
        try:
            client = MlflowClient(tracking_uri=record["tracking_uri"])
            if client.get_run(record["run_id"]).info.status != "RUNNING":
                continue
            why = (reasons or {}).get(run_id) or "the run's process is gone"
            client.set_tag(record["run_id"], "hybrid.error", f"lost: {why}"[:PARAM_VALUE_LIMIT])
            client.set_terminated(record["run_id"], "KILLED")
            ended.append(run_id)
        except Exception:               # a server that is down, a deleted run: the next upkeep tries again
            continue
    return ended


def tracking_uri(runs_root: str | Path) -> str:
    """$MLFLOW_TRACKING_URI, else the local SQLite store inside the runs root (MLflow 3 refuses a plain folder
    store unless told otherwise; SQLite is its recommended local backend)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(runs_root) / MLFLOW_DB).resolve()}"


def local_artifacts(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside its database (MLflow's own default is ./mlruns of whatever the
    working directory is); a server's store decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / MLFLOW_ARTIFACTS).resolve().as_uri()
    return None


def reporter_for_run(report_to, run_dir, runs_root, *, run_id: str, run_name: str | None, config: dict | None,
                     options: dict | None, resumed: bool) -> ReportTo | None:
    """The ReportTo callback a run asked for, its back-ends open, or None when it asked for none."""
    if not parse_report_to(report_to):
        return None
    return ReportTo(report_to, run_dir, runs_root, run_id=run_id, run_name=run_name, config=config,
                    options=options, resumed=resumed).open()
