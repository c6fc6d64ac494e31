"""End-to-end distillation runs on the tiny preset: the guide's CLI output, the run store, resume, stop, crash,
bad input. The tiny teacher is trained once per test session (shared cache) and reused by every test here."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hybrid_optimization.distill import TrainOptions, train
from hybrid_optimization.distill.options import OptionsError
from hybrid_optimization.distill.cli import main
from hybrid_optimization.distill.export import load_exported_student
from hybrid_optimization.distill.presets import STUDENT_SIZES
from hybrid_optimization.tracking import RunStore
from workbench import queries

ROOT = Path(__file__).resolve().parents[1]
GUIDE_LINES = ("Initialized hybrid optimization with 8 data clusters and auxiliary NN guidance",
               "HYBRID OPTIMIZATION SUMMARY", "Total Steps: 20", "Final Loss: ", "Avg Learning Rate Multiplier: ",
               "Constraint Activation Rate: ", "Final Trust Radius: ")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def runs(root) -> list[str]:
    db = Path(root) / "runs.db"
    return queries.list_runs(RunStore(root))["run_id"].tolist() if db.exists() else []


def test_guide_command_tiny_run_prints_the_guide_lines_and_fills_the_store(tmp_path, capsys):
    code = main(["--hybrid", "--ternary", "--qat", "--max_steps", "20", "--data_clusters", "8",
                 "--param_clusters", "4", "--lr", "0.001", "--save_metrics", "--eval_every", "1", "--export",
                 "--eval_windows", "32", "--runs_root", str(tmp_path), "--no_progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    for line in GUIDE_LINES:
        assert line in out
    assert "Epoch 0, Loss: " in out and ", LR: " in out and ", Trust Radius: " in out and "Epoch 1, Loss: " in out

    store = RunStore(tmp_path)
    (run_id,) = runs(tmp_path)
    run = store.get_run(run_id)
    assert run["status"] == "finished" and run["step"] == 20 and run["config"]["target_bits"] == 1.58
    assert run["summary"]["steps_completed"] == 20 and run["summary"]["compression_vs_fp32_linear"] > 15
    steps = queries.read_steps(store, run_id)
    assert steps["step"].tolist() == list(range(1, 21))
    for column in ("loss", "learning_rate", "lr_multiplier", "trust_radius", "update_magnitude",
                   "gradient_magnitude", "flip_rate", "tokens_per_s"):
        assert steps[column].notna().all(), column
    assert steps["cluster_id"].isna().all() and run["config"]["cluster_batches"] == "mixed"   # no per-batch cluster
    assert steps["quantization_error"].notna().sum() == 2                      # every log_interval = 10 steps
    evals = queries.read_evals(store, run_id)
    val = evals[evals["key"] == "val_loss"].set_index("step")["value"]
    assert val[20] < val[10]                                                   # it learns
    keys = set(evals["key"])
    assert {"val_loss", "val_ppl", "kl_teacher", "top1_agreement", "qdiff_max", "qdiff_mean"} <= keys
    assert len({k for k in keys if k.startswith("val_loss_cluster_")}) >= 2      # per data cluster (those evaluated)
    assert sorted(set(evals["step"])) == [10, 20]
    plan = queries.read_plan(store, run_id)
    n_linear = 7 * STUDENT_SIZES["tiny"][1]                                    # q k v o gate up down per block
    assert len(plan) == n_linear and set(plan["bits"]) <= {1.0, 1.58, 2.0}
    layers = queries.read_layers(store, run_id)
    assert len(layers) == n_linear and layers["rel_error"].between(0, 1).all()
    samples = queries.read_samples(store, run_id)
    assert set(samples["split"]) == {"train", "val"} and samples["cluster"].nunique() == 8
    assert samples["text"].str.len().gt(0).all()
    features = queries.read_samples(store, run_id, features=True)["features"]      # for the workbench's t-SNE option
    assert all(f is not None and f.shape == features.iloc[0].shape and f.size >= 2 for f in features)
    assert queries.read_logs(store, run_id)["message"].str.contains("Epoch 1, Loss").any()
    stages = store.read_stages(run_id)                         # the setup stages, for the Live page (issue 18)
    assert stages.column("stage") == ["data", "teacher", "teacher_logits", "clustering", "student"]
    assert all(s["ended_at"] is not None and s["ended_at"] >= s["started_at"] for s in stages)

    with open(run["artifacts"]["metrics_csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20 and rows[9]["val_loss"] != "" and rows[0]["val_loss"] == ""
    model, meta = load_exported_student(run["artifacts"]["export"])
    assert meta["run_id"] == run_id and json.loads(Path(run["artifacts"]["export_manifest"]).read_text())["bit_map"]
    assert Path(run["artifacts"]["checkpoint"]).is_file()


@pytest.mark.parametrize("cluster_batches", ["mixed", "single"])
def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path, cluster_batches):
    common = dict(hybrid=True, ternary=True, qat=True, max_steps=8, steps_per_epoch=3, quiet=True,
                  runs_root=str(tmp_path), seed=3, eval_windows=16, cluster_batches=cluster_batches)
    full = train(TrainOptions(**common))
    stopped = train(TrainOptions(**common, stop_after_steps=4))               # stops mid-epoch, after the plan
    assert stopped.status == "stopped" and stopped.steps == 4 and stopped.exit_code == 143
    store = RunStore(tmp_path)
    assert store.get_run(stopped.run_id)["status"] == "stopped"
    resumed = train(TrainOptions(resume=stopped.run_id, runs_root=str(tmp_path), quiet=True))
    assert resumed.status == "finished" and resumed.run_id == stopped.run_id and resumed.steps == 8

    a, b = queries.read_steps(store, full.run_id), queries.read_steps(store, stopped.run_id)
    for column in ("loss", "lr_multiplier", "trust_radius", "update_magnitude", "cluster_id", "flip_rate"):
        assert a[column].equals(b[column]), column                            # NaN where no value, in both
    ea, eb = queries.read_evals(store, full.run_id), queries.read_evals(store, stopped.run_id)
    assert ea[["step", "key", "value"]].values.tolist() == eb[["step", "key", "value"]].values.tolist()
    for (name, p), (_, q) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(p, q), name
    assert full.summary["final_loss"] == resumed.summary["final_loss"]
    assert store.get_run(stopped.run_id)["status"] == "finished"


class _StepCounter:
    """A loop callback that records the steps it saw (hooks of a resume call must run)."""

    def __init__(self, seen: list):
        self.seen = seen

    def on_step_end(self, state, metrics) -> None:
        self.seen.append(state.step)


def test_python_api_resume_refuses_a_changed_fixed_option_by_name(tmp_path):
    stopped = train(TrainOptions(max_steps=4, steps_per_epoch=2, quiet=True, runs_root=str(tmp_path), seed=1,
                                 eval_windows=8, stop_after_steps=2))
    assert stopped.status == "stopped"
    steps_before = len(RunStore(tmp_path).read_steps(stopped.run_id))
    with pytest.raises(OptionsError, match=r"lr=0\.01 \(the run's: None\).*cannot change when a run is resumed"):
        train(TrainOptions(resume=stopped.run_id, runs_root=str(tmp_path), quiet=True, lr=0.01))
    run = RunStore(tmp_path).get_run(stopped.run_id)
    assert run["status"] == "stopped" and len(RunStore(tmp_path).read_steps(stopped.run_id)) == steps_before
    seen = []
    resumed = train(TrainOptions(resume=stopped.run_id, runs_root=str(tmp_path), quiet=True, seed=1, max_steps=4,
                                 callbacks=[_StepCounter(seen)]))          # the stored seed again: not a change
    assert resumed.status == "finished" and resumed.steps == 4 and seen == [3, 4]


def test_crash_is_recorded_as_failed_with_its_traceback(tmp_path):
    class Exploding(torch.optim.SGD):
        def step(self, closure=None):
            if self.state.setdefault("calls", 0) >= 2:
                raise FloatingPointError("boom in the optimizer")
            self.state["calls"] += 1
            return super().step(closure)

    options = TrainOptions(max_steps=10, quiet=True, runs_root=str(tmp_path), eval_windows=8,
                           optimizer_factory=lambda model, opts: Exploding(model.parameters(), lr=0.01))
    with pytest.raises(FloatingPointError):
        train(options)
    (run_id,) = runs(tmp_path)
    run = RunStore(tmp_path).get_run(run_id)
    assert run["status"] == "failed"
    assert "FloatingPointError: boom in the optimizer" in run["error"] and "Traceback" in run["error"]


def test_custom_optimizer_and_schedule_with_fixed_interval_validation(tmp_path):
    def factory(model, opts):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
        return optimizer, schedule

    result = train(TrainOptions(max_steps=8, eval_every_steps=3, optimizer_factory=factory, quiet=True,
                                track=False, eval_windows=16))
    assert result.run_id is None and result.status == "finished"
    lrs = [h["learning_rate"] for h in result.history]
    assert lrs[0] == pytest.approx(7.5e-4) and lrs[-1] == pytest.approx(3e-3)
    assert [e["step"] for e in result.evals] == [3, 6, 8]                      # every 3 steps + the last
    assert result.peak_rss_mb > 0 and result.tokens_per_s > 0


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr -1.0 is invalid"),
    (["--ternary"], "--ternary needs --qat"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--epochs", "two"], "invalid int value"),
    (["--batch_size", "0"], "--batch_size 0 is invalid"),
    (["--bits", "3", "--qat"], "--bits 3.0 is invalid: it must be one of 1, 1.58, 2, 4, 8, 16, 32"),
    (["--data", "/nonexistent/chats.jsonl"], "file does not exist"),
    (["--teacher", "/nonexistent/model"], "does not exist"),
    (["--resume", "no-such-run"], "no-such-run"),
])
def test_bad_flags_give_one_line_and_start_nothing(tmp_path, capsys, argv, message):
    code = main(argv + ["--runs_root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.strip().count("\n") == 0, err
    assert runs(tmp_path) == []


def test_bad_data_file_names_the_line(tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [}\n')
    assert main(["--data", str(data), "--runs_root", str(tmp_path / "runs")]) == 2
    assert f"{data}, line 2: malformed JSON" in capsys.readouterr().err
    assert runs(tmp_path / "runs") == []


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    stopped = train(TrainOptions(max_steps=6, stop_after_steps=2, quiet=True, runs_root=str(tmp_path),
                                 eval_windows=8))
    checkpoint = stopped.run_dir / "checkpoint.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    assert main(["--resume", stopped.run_id, "--runs_root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is corrupt or not a distillation checkpoint" in err and err.count("\n") == 1
    assert RunStore(tmp_path).get_run(stopped.run_id)["status"] == "stopped"


def test_launcher_precreated_record_and_quiet_first_line(tmp_path, capsys):
    store = RunStore(tmp_path)
    run_id = store.create_run(config={}, args=[], preset="tiny", status="queued")
    assert main(["--run_id", run_id, "--max_steps", "3", "--quiet", "--eval_windows", "8",
                 "--runs_root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"run_id={run_id}"
    assert store.get_run(run_id)["status"] == "finished" and runs(tmp_path) == [run_id]
    bad = store.create_run(config={}, args=[], preset="tiny", status="queued")
    assert main(["--run_id", bad, "--lr", "0", "--runs_root", str(tmp_path)]) == 2
    assert store.get_run(bad)["status"] == "failed" and "--lr" in store.get_run(bad)["error"]


def test_cli_process_stops_on_a_store_request_and_resumes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "distillation.py"), "--epochs", "50", "--quiet",
                             "--eval_windows", "8", "--runs_root", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        run_id = proc.stdout.readline().strip().removeprefix("run_id=")
        store = RunStore(tmp_path)
        deadline = time.time() + 120
        while (store.get_run(run_id)["step"] or 0) < 3 and time.time() < deadline:
            time.sleep(0.2)
        assert store.request_stop(run_id)
        assert proc.wait(timeout=120) == 143
    finally:
        proc.kill()
    run = store.get_run(run_id)
    assert run["status"] == "stopped" and 3 <= run["step"] < 500
    done = run["step"]
    assert main(["--resume", run_id, "--max_steps", str(done + 3), "--quiet", "--runs_root", str(tmp_path)]) == 0
    run = store.get_run(run_id)
    assert run["status"] == "finished" and run["summary"]["steps_completed"] == done + 3


@pytest.mark.slow     # the default suite proves the same through full runs of the same entry point (python -m ...):
# test_faults.py::test_interrupted_then_resumed_equals_the_uninterrupted_run[sigterm] (exit 143, the checkpoint
# resumes exactly) and ::test_a_checkpoint_with_flipped_bytes_is_refused_in_one_line (exit 143, status stopped,
# checkpoint.pt written)
def test_sigterm_checkpoints_and_exits_143(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_optimization.distill", "--epochs", "50", "--quiet",
                             "--eval_windows", "8", "--runs_root", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        run_id = proc.stdout.readline().strip().removeprefix("run_id=")
        store = RunStore(tmp_path)
        deadline = time.time() + 120
        while (store.get_run(run_id)["step"] or 0) < 2 and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        proc.kill()
    run = store.get_run(run_id)
    assert run["status"] == "stopped" and (Path(run["run_dir"]) / "checkpoint.pt").is_file()


def test_one_bit_qat_and_precision_budget(tmp_path):
    """--qat alone is 1-bit; the hybrid's plan then keeps the average at ≤ 1 bit (its default budget)."""
    result = train(TrainOptions(hybrid=True, qat=True, max_steps=3, eval_windows=8, quiet=True,
                                runs_root=str(tmp_path)))
    assert result.plan is not None and set(result.plan.bit_map().values()) == {1.0}
    assert result.summary["avg_bits"] == 1.0
    mixed = train(TrainOptions(hybrid=True, bits=2, precision_budget=1.8, max_steps=3, eval_windows=8, quiet=True,
                               runs_root=str(tmp_path)))
    assert mixed.plan.avg_bits <= 1.8 and len(set(mixed.plan.bit_map().values())) > 1


def test_a_diverging_run_ends_as_diverged_with_the_step_and_exit_3(tmp_path, capsys):
    """Issue 13: an LR of 1e30 used to end with validation loss NaN, status finished, exit 0. (--lr is bounded
    now, so the runaway LR comes through the Python API's optimizer_factory.)"""
    result = train(TrainOptions(max_steps=4, eval_windows=8, quiet=True, runs_root=str(tmp_path),
                                optimizer_factory=lambda model, options: torch.optim.SGD(model.parameters(), lr=1e30)))
    assert result.status == "diverged" and result.exit_code == 3
    assert "at step" in result.diverged or "from step" in result.diverged
    (run_id,) = runs(tmp_path)
    run = RunStore(tmp_path).get_run(run_id)
    assert run["status"] == "diverged" and "diverged" in run["error"] and run["summary"]["diverged"]


def test_resume_with_export_of_a_finished_run_exports_without_training(tmp_path, capsys):
    done = train(TrainOptions(ternary=True, qat=True, max_steps=3, eval_windows=8, quiet=True,
                              runs_root=str(tmp_path)))
    assert done.status == "finished" and done.export is None
    assert main(["--resume", done.run_id, "--export", "--quiet", "--runs_root", str(tmp_path)]) == 0
    run = RunStore(tmp_path).get_run(done.run_id)
    assert run["status"] == "finished" and run["step"] == 3 and run["summary"]["steps_completed"] == 3
    assert Path(run["artifacts"]["export"]).is_file() and run["summary"]["compression_vs_fp32_linear"] > 10
    steps = queries.read_steps(RunStore(tmp_path), done.run_id)
    assert steps["step"].tolist() == [1, 2, 3]                         # no step trained twice
    assert main(["--resume", done.run_id, "--quiet", "--runs_root", str(tmp_path)]) == 2   # nothing to do


def test_resume_refuses_a_checkpoint_of_another_run_or_of_other_options_by_name(tmp_path):
    """Issue 17: the checkpoint's run id and options hash are checked before anything starts (no training here)."""
    from hybrid_optimization.distill.checkpoint import CheckpointError, save_checkpoint
    from hybrid_optimization.distill.plan import plan_run
    from hybrid_optimization.distill.setup import load_resume_checkpoint

    stored = TrainOptions(lr=0.002, max_steps=4, runs_root=str(tmp_path))
    store = RunStore(tmp_path)
    run_id = store.create_run(config={}, args={"argv": [], "options": stored.to_dict()}, preset="tiny",
                              status="stopped")
    plan = plan_run(TrainOptions(resume=run_id, runs_root=str(tmp_path), max_steps=6)).for_data(100, 100)
    other = plan_run(TrainOptions(lr=0.01, track=False, max_steps=4)).for_data(100, 100)

    class Inputs:                                   # what read_data's result gives the check: the data's fingerprint
        def fingerprint(self, plan):
            return {"dataset": "abc"}

    path = store.run_dir(run_id) / "checkpoint.pt"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(owner: str, options_of) -> None:
        save_checkpoint(path, {"step": 2, "fingerprint": {"dataset": "abc", "run_id": owner,
                                                          "options_hash": options_of.options_hash(),
                                                          "options": options_of.hashed_options()}})

    write("20260101-000000-aaaa", plan)
    with pytest.raises(CheckpointError, match=f"belongs to run 20260101-000000-aaaa, not to run {run_id}"):
        load_resume_checkpoint(plan, Inputs())
    write(run_id, other)
    with pytest.raises(CheckpointError, match=r"other options \(config\.base_learning_rate 0\.01 vs the run's "
                                              r"0\.002; lr 0\.01 vs the run's 0\.002\)"):
        load_resume_checkpoint(plan, Inputs())
    write(run_id, plan)
    assert load_resume_checkpoint(plan, Inputs())["step"] == 2


def test_a_launched_run_shows_its_first_setup_stage_within_seconds_then_stops_on_sigterm(tmp_path):
    """Issue 19: the Live page's first progress after Launch. The CLI marks the queued record's 'data' stage before
    it imports torch (seconds of imports on a busy machine), and the session continues that row."""
    store = RunStore(tmp_path)
    run_id = store.create_run(config={}, args=[], preset="tiny", status="queued")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(ROOT / "distillation.py"), "--run_id", run_id, "--max_steps", "500",
                             "--quiet", "--no_progress", "--eval_windows", "8", "--runs_root", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        first = None
        while first is None and time.monotonic() - started < 60:
            rows = store.read_stages(run_id)
            first = time.monotonic() - started if len(rows) else None
            time.sleep(0.05)
        assert first is not None and first < 5, first
        assert store.read_stages(run_id)[0]["stage"] == "data"
        while len(store.read_stages(run_id)) < 2 and proc.poll() is None:    # the session runs: signals handled
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    print(f"first setup stage of a launched run on the store after {first:.2f} s")
    run = store.get_run(run_id)
    assert run["status"] == "stopped" and store.read_stages(run_id)[0]["ended_at"] is not None
