"""Sweeps: the search-space syntax, the objectives, bad input (exit 2, nothing started) and a real tiny sweep through
the CLI whose trials are ordinary runs in the run store, tagged with the sweep."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybrid_optimization import sweep
from hybrid_optimization.tracking import RunStore
from workbench import queries

REPO = Path(__file__).resolve().parents[1]


def test_param_specs_parse_ranges_log_ranges_integers_and_choices():
    lr = sweep.parse_param("base_learning_rate=1e-4:1e-2:log")
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-4, 1e-2, True, False)
    assert sweep.parse_param(lr.spec()) == lr                       # what the study stores parses back
    clusters = sweep.parse_param("data_clusters=2:16")
    assert clusters.integer and not clusters.log
    assert sweep.parse_param("target_bits=1,1.58,2").choices == (1.0, 1.58, 2.0)
    assert sweep.parse_param("use_trust_region=true,false").choices == (True, False)
    assert sweep.parse_param("hybrid=false").choices == (False,)


@pytest.mark.parametrize("text, words", [
    ("base_learning_rate=0:1e-2:log", "LOW > 0"),
    ("base_learning_rate=1e-2:1e-4", "LOW < HIGH"),
    ("data_clusters=1.5:4", "integer"),
    ("no_such_field=1:2", "not searchable"),
    ("base_learning_rate", "NAME=LOW:HIGH"),
    ("use_trust_region=maybe", "bool"),
])
def test_bad_param_specs_name_the_problem(text, words):
    with pytest.raises(sweep.SweepError, match=words):
        sweep.parse_param(text)


def test_objectives_from_the_runs_evaluations():
    spec = sweep.SweepSpec(name="s", params=[sweep.parse_param("base_learning_rate=1e-4:1e-2:log")],
                           max_steps=30)
    evals = [(10, 5.0), (20, 4.2), (30, 4.4)]
    assert sweep.objective_value(spec, evals, 30) == 4.4
    spec.objective = "best_val_loss"
    assert sweep.objective_value(spec, evals, 30) == 4.2
    spec.objective, spec.target = "steps_to_target", 4.5
    assert sweep.objective_value(spec, evals, 30) == 20
    spec.target = 1.0                                   # never reached: twice the steps (sorts after every hit)
    assert sweep.objective_value(spec, evals, 30) == 60
    assert sweep.objective_value(spec, [], 30) is None


def test_a_sweep_whose_config_is_invalid_is_refused():
    spec = sweep.SweepSpec(name="s", params=[sweep.parse_param("data_clusters=0:4")])
    with pytest.raises(sweep.SweepError, match="data_clusters"):
        spec.validate()


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybrid_optimization.sweep", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


@pytest.mark.parametrize("args, words", [
    (["--param", "base_learning_rate=1e-2:1e-4"], "LOW < HIGH"),
    (["--objective", "fastest"], "--objective 'fastest' is invalid"),
    (["--objective", "steps_to_target"], "needs --target"),
    (["--set", "warp=9"], "--set 'warp=9' is invalid"),
])
def test_cli_bad_input_is_one_line_exit_2_and_starts_nothing(tmp_path, args, words):
    done = _cli("--name", "bad", "--trials", "1", "--runs_root", str(tmp_path), *args, timeout=120)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "runs.db").exists() and not (tmp_path / sweep.STORAGE_NAME).exists()


@pytest.mark.slow     # two real tiny trainings: ~1 min on 2 idle cores (most of it process start and setup)
def test_cli_tiny_sweep_runs_trials_as_tagged_runs_and_prints_the_best(tmp_path):
    started = time.monotonic()
    done = _cli("--name", "tiny-sweep", "--trials", "2", "--runs_root", str(tmp_path), "--max_steps", "10",
                "--param", "base_learning_rate=1e-4:1e-2:log", "--set", "batch_size=8", "--seed", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("best trial ") and "run_id=" in last and "value=" in last
    best_run = last.split("run_id=")[1].split()[0]
    store = RunStore(tmp_path, create=False)
    runs = queries.list_runs(store)
    assert len(runs) == 2 and set(runs.status) == {"finished"}
    assert all(tags == [sweep.sweep_tag("tiny-sweep")] for tags in runs.tags)
    best = store.get_run(best_run)
    value = float(last.split("value=")[1].split()[0])
    assert best["summary"]["val_loss"] == pytest.approx(value, rel=1e-4)   # the objective is the run's own value
    assert best["config"]["batch_size"] == 8 and best["config"]["max_steps"] == 10
    # The study is in the runs root's SQLite storage; a second worker can join it by name.
    import optuna
    study = optuna.load_study(study_name="tiny-sweep", storage=sweep.default_storage(tmp_path))
    assert len(study.trials) == 2 and study.best_trial.user_attrs["run_id"] == best_run
    assert study.user_attrs["spec"]["params"] == ["base_learning_rate=0.0001:0.01:log"]
    print(f"2-trial tiny sweep: {time.monotonic() - started:.1f} s")


def test_median_pruner_stops_a_trailing_trial_through_the_store(tmp_path, monkeypatch):
    """Three trials in a fixed order (two good, then a bad one) against a stand-in trainer: the bad one is pruned
    at its first evaluation — its run gets a stop request, ends "stopped" and is tagged pruned."""
    import optuna

    fake = REPO / "tests" / "fixtures" / "fake_trainer.py"
    monkeypatch.setattr(sweep, "trial_argv", lambda config_path, options, spec, config, run_id, runs_root, **kw:
                        [sys.executable, str(fake), run_id, str(runs_root), str(config_path)])
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    spec = sweep.SweepSpec(name="prune", params=[sweep.parse_param("base_learning_rate=1e-4:1e-1:log")],
                           max_steps=30)
    study, _ = sweep.open_study(spec, sweep.default_storage(tmp_path), "prune", seed=0)
    for lr in (1e-3, 1.2e-3, 1e-2):
        study.enqueue_trial({"base_learning_rate": lr})
    sweep.run_sweep(None, 3, "prune", tmp_path, log=lambda m: None)
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    store = RunStore(tmp_path, create=False)
    pruned = store.get_run(study.trials[2].user_attrs["run_id"])
    assert pruned["status"] == "stopped" and sorted(pruned["tags"]) == [sweep.PRUNED_TAG, sweep.sweep_tag("prune")]
    assert sweep.best_trial(study).params["base_learning_rate"] == 1e-3
    assert sweep.best_trial(study).value == pytest.approx(3.7)        # final val_loss, as the run logged it
