"""Sweeps: the search-space syntax, the objectives, bad input (exit 2, nothing started) and a real tiny sweep through
the CLI whose trials are ordinary runs in the run store, tagged with the sweep."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hybrid_optimization import launch, sweep
from hybrid_optimization.distill.options import TrainOptions
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


def _closed_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]          # nobody listens once the socket is closed


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


FILES = {"notes.txt": b"not a database\n", "random.bin": bytes(range(256)) * 32,
         "damaged.db": b"SQLite format 3\x00" + b"\xff" * 8000}


@pytest.mark.parametrize("args, words", [
    (["--param", "base_learning_rate=1e-2:1e-4"], "LOW < HIGH"),
    (["--objective", "fastest"], "--objective 'fastest' is invalid"),
    (["--objective", "steps_to_target"], "needs --target"),
    (["--set", "warp=9"], "--set 'warp=9' is invalid"),
    (["--set", "lr=0.1"], "set it as base_learning_rate"),
    (["--set", "alpha=0.2", "--set", "alpha=0.3"], "--set alpha is given twice"),
    # the storage URL: not a URL, not SQLite, a missing folder, servers on a closed port, a damaged file
    (["--storage", "not a url"], "is not a database URL"),
    (["--storage", "sqlite:///{dir}/notes.txt"], "is not an SQLite database"),
    (["--storage", "sqlite:///{dir}/random.bin"], "is not an SQLite database"),
    (["--storage", "sqlite:///{dir}/no/such/folder/sweeps.db"], "does not exist"),
    (["--storage", "sqlite:///{dir}/damaged.db"], "is damaged"),
    (["--storage", "sqlite:///:memory:"], "in-memory"),
    (["--storage", "postgresql://u:secret@127.0.0.1:{port}/optuna"], "cannot reach the postgresql server"),
    (["--storage", "mysql://u:secret@127.0.0.1:{port}/optuna"], "cannot reach the mysql server"),
    (["--storage", "oracle://u:p@host/db"], "not supported"),
    # the sampler seed, the counts, the name
    (["--seed", "-1"], "--seed -1 is invalid"),
    (["--seed", str(2 ** 40)], f"--seed {2 ** 40} is invalid"),
    (["--trials", "0"], "--trials 0 is invalid"),
    (["--workers", "1000"], "--workers 1000 is invalid"),
    # both ends of every range and every choice, against the CLI's own bounds
    (["--param", "initial_trust_radius=0.5:1000"], "at its high end"),
    (["--param", "target_bits=1.58,3,5,7"], "target_bits = 3.0 is invalid"),
    (["--param", "batch_size=70000:80000"], "batch_size = 70000 is invalid"),
    (["--param", "batch_size=8:70000"], "at its high end"),
    (["--param", "alpha=0:2"], "--alpha 2.0 is invalid"),
    (["--param", "seq_len=2:64"], "at its low end"),
    (["--param", "optimizer=adamw,bogus"], "--optimizer 'bogus' is invalid"),
    (["--param", "base_learning_rate=1e-4:1e-2", "--param", "base_learning_rate=1e-3:1e-1"], "given twice"),
    (["--param", "lr=1e-4:1e-2"], "search it as base_learning_rate"),
    # the base options the trainer would refuse
    (["--preset", "bogus"], "--preset 'bogus' is invalid"),
    (["--max_steps", "20000000"], "max_steps = 20000000 is invalid"),
    (["--eval_every", "0"], "--eval_every 0 is invalid"),
    (["--set", "seq_len=100000"], "--seq_len 100000 is invalid"),
    (["--report_to", "bogus"], "--report_to bogus is invalid"),
])
def test_cli_bad_input_is_one_line_exit_2_and_starts_nothing(tmp_path, capsys, args, words):
    """The sweep CLI's main() in this process (the same code as `python -m`, without ~2 s of interpreter start per
    case; tests/test_bad_inputs.py runs these inputs as real processes)."""
    runs_root, files = tmp_path / "runs", tmp_path / "files"
    runs_root.mkdir()
    files.mkdir()
    for name, data in FILES.items():
        (files / name).write_bytes(data)
    before = _files(tmp_path)
    args = [a.format(dir=files, port=_closed_port()) for a in args]
    started = time.monotonic()
    try:
        code = sweep.main(["--name", "bad", "--trials", "1", "--runs_root", str(runs_root), *args])
    except SystemExit as exc:                                           # argparse's own refusal
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err and not out
    assert "secret" not in err                                          # a password is never printed
    assert _files(tmp_path) == before and not any(runs_root.iterdir())  # nothing written, nothing started
    assert time.monotonic() - started < 10                              # answered, not hung


def test_bad_input_through_the_real_command_is_one_line_exit_2(tmp_path):
    done = _cli("--name", "bad", "--trials", "1", "--runs_root", str(tmp_path), "--storage", "not a url",
                timeout=120)
    assert done.returncode == 2 and "is not a database URL" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_the_search_space_comes_from_the_options_and_config_fields():
    fields = sweep.searchable_fields()
    # config fields, pipeline options, and options added later (optimizer, schedule, warmup_steps) by themselves
    for name in ("base_learning_rate", "initial_trust_radius", "target_bits", "alpha", "hybrid", "optimizer",
                 "schedule", "warmup_steps"):
        assert name in fields, name
    assert fields["warmup_steps"] is int and fields["use_trust_region"] is bool and fields["alpha"] is float
    # what the sweep sets itself, and options that are a config field under another name, are not searchable
    for name in ("max_steps", "run_id", "runs_root", "resume", "lr", "param_clusters", "bits", "export"):
        assert name not in fields, name


def test_a_trial_is_one_options_document_of_the_base_options_and_its_values(tmp_path):
    spec = sweep.SweepSpec(name="doc", params=[sweep.parse_param("initial_trust_radius=1e-3:1:log"),
                                               sweep.parse_param("alpha=0.1:0.9"),
                                               sweep.parse_param("target_bits=1,1.58,2")],
                           base_config={"batch_size": 8}, base_options={"hybrid": True, "seq_len": 32},
                           max_steps=12)
    spec.validate()
    options = spec.trial_options({"initial_trust_radius": 0.05, "alpha": 0.3, "target_bits": 2.0},
                                 run_id="r1", runs_root=tmp_path, run_name="doc-0")
    path = launch.write_options(options, tmp_path)
    document = json.loads(path.read_text())
    assert document["hybrid_config"]["initial_trust_radius"] == 0.05 and document["hybrid_config"]["batch_size"] == 8
    assert (document["alpha"], document["seq_len"], document["max_steps"], document["hybrid"]) == (0.3, 32, 12, True)
    assert (document["qat"], document["bits"], document["batch_size"], document["lr"]) == (True, 2.0, 8, 0.001)
    assert document["tags"] == ["sweep:doc"] and document["run_id"] == "r1" and document["quiet"] is True
    reporting = sweep.SweepSpec(**{**vars(spec), "base_options": {**spec.base_options, "report_to": ["mlflow"]}})
    assert reporting.trial_options({"initial_trust_radius": 0.05}).report_to == ["mlflow"]    # --report_to
    back = TrainOptions.from_dict(document)                        # what the CLI reads back
    assert back.errors() == {}
    config = back.hybrid_training_config()
    assert (config.initial_trust_radius, config.target_bits, config.batch_size) == (0.05, 2.0, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["options.json"]      # atomic: no temporary file left


def test_joining_a_sweep_with_another_objective_target_or_max_steps_is_refused_by_name(tmp_path, capsys):
    spec = sweep.SweepSpec(name="join", params=[sweep.parse_param("base_learning_rate=1e-4:1e-2:log")],
                           objective="steps_to_target", target=4.0, max_steps=30)
    sweep.open_study(spec, sweep.default_storage(tmp_path), "join", log=lambda m: None)
    before = _files(tmp_path)
    for args, words in ((["--objective", "final_val_loss"], "--objective final_val_loss differs"),
                        (["--objective", "steps_to_target", "--target", "3.5"], "--target 3.5 differs"),
                        (["--max_steps", "50"], "--max_steps 50 differs"),
                        (["--param", "initial_trust_radius=1e-3:1"], "another search space")):
        code = sweep.main(["--name", "join", "--trials", "1", "--runs_root", str(tmp_path), *args])
        err = capsys.readouterr().err
        assert code == 2 and words in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _files(tmp_path) == before
    stored = sweep.stored_spec(sweep.default_storage(tmp_path), "join")
    same = sweep.SweepSpec(**{**vars(stored)})
    assert sweep.join_conflicts(stored, same, {"objective", "target", "max_steps", "param"}) is None
    assert sweep.join_conflicts(stored, sweep.SweepSpec(name="join", params=[]), set()) is None   # by name only


def test_a_failing_trial_prints_the_trainers_own_error_line(tmp_path, monkeypatch, capsys):
    said = "error: --data /x/chats.jsonl: the file is binary (mostly NUL bytes)"
    trainer = f"import sys; print('loading', file=sys.stderr); print({said!r}, file=sys.stderr); sys.exit(2)"
    monkeypatch.setattr(sweep.launch, "cli_argv", lambda path, *a, **kw: [sys.executable, "-c", trainer])
    code = sweep.main(["--name", "fails", "--trials", "2", "--runs_root", str(tmp_path), "--param",
                       "base_learning_rate=1e-4:1e-2:log", "--max_steps", "5"])
    out, err = capsys.readouterr()
    assert code == 1
    assert sum("failed: run " in line and line.endswith(said) for line in out.splitlines()) == 2, out
    assert err.strip() == f"sweep fails: no trial completed; the last failure: {said}"
    store = RunStore(tmp_path, create=False)
    runs = [store.get_run(r["run_id"]) for r in store.list_runs()]
    assert len(runs) == 2 and {(r["status"], r["error"]) for r in runs} == {("failed", said)}


def test_spawn_writes_one_options_file_and_starts_the_cli_on_it_in_its_own_process_group(tmp_path):
    script = tmp_path / "cli.py"
    script.write_text("import os, sys; print(sys.argv[1:], os.getpgrp() == os.getpid()); print('said', file=sys.stderr)")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = launch.spawn({"run_id": "r", "alpha": 0.25}, run_dir, script=script)
    assert proc.wait(60) == 0
    assert json.loads((run_dir / "options.json").read_text()) == {"run_id": "r", "alpha": 0.25}
    assert (run_dir / "stdout.log").read_text().strip() == f"['--options={run_dir / 'options.json'}'] True"
    assert (run_dir / "stderr.log").read_text().strip() == "said"


PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from hybrid_optimization import launch
    child = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == 'ignore' "
             "else signal.SIG_DFL); time.sleep(600)")
    proc = launch.start([sys.executable, "-c", "import sys; " + child, sys.argv[1]], Path(sys.argv[2]),
                        die_with_parent=True, grace_s=1.0)
    print(proc.pid, flush=True)
    time.sleep(600)
""")


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the death signal is Linux's prctl")
@pytest.mark.parametrize("child", ["honours-sigterm", "ignore"])
def test_a_die_with_parent_child_ends_when_its_parent_is_killed_9(tmp_path, child):
    """kill -9 of the parent (a sweep): its child ends at once, or after the grace period when it ignores SIGTERM."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, child, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    group = int(parent.stdout.readline())
    time.sleep(0.5)
    assert _group_alive(group)
    parent.kill()
    parent.wait()
    killed = time.monotonic()
    while _group_alive(group) and time.monotonic() - killed < 20:
        time.sleep(0.1)
    assert not _group_alive(group), "the child outlived its parent"
    print(f"{child}: gone {time.monotonic() - killed:.1f} s after kill -9 of its parent")


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
    # The two good trials need not pause between evaluations (the sweep reads a finished run's evaluations too); the
    # bad one pauses 1.5 s per evaluation, so the sweep sees its first one and requests the stop while it runs.
    launches = itertools.count()
    monkeypatch.setattr(sweep.launch, "cli_argv", lambda path, *a, **kw: [
        sys.executable, str(fake), f"--options={path}", "0.05" if next(launches) < 2 else "1.5"])
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


OPEN_AT = textwrap.dedent("""
    import sys, time
    from hybrid_optimization import sweep
    spec = sweep.SweepSpec(name="race", params=[sweep.parse_param("base_learning_rate=1e-4:1e-2:log")])
    start_at = float(sys.argv[2])
    time.sleep(max(0.0, start_at - time.time()))           # every process opens at the same instant
    study, stored = sweep.open_study(spec, sys.argv[1], "race", log=lambda m: None)
    print(stored.params[0].spec())
""")


def test_workers_opening_a_new_storage_at_the_same_instant_all_succeed(tmp_path):
    """Optuna's schema creation races on a new SQLite file (alembic_version UNIQUE, "table already exists": 2 of 5
    bare attempts with two processes here); the lock around creation makes six processes opening it at the same
    instant all succeed, with one study."""
    import optuna

    env = dict(os.environ, PYTHONPATH=str(REPO))
    storage = f"sqlite:///{tmp_path}/sweeps.db"
    start_at = time.time() + 5.0
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, storage, str(start_at)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert out.strip() == "base_learning_rate=0.0001:0.01:log"
    assert [s.study_name for s in optuna.study.get_all_study_summaries(storage)] == ["race"]


def test_a_lost_trial_of_this_host_is_failed_retried_and_its_orphan_ended(tmp_path):
    """What a rerun does after kill -9 of a sweep: a RUNNING trial whose worker process is gone is failed with the
    reason, re-queued with the same values (Optuna's retry callback), its still-running training process ended
    and its run marked failed."""
    import optuna

    spec = sweep.SweepSpec(name="lost", params=[sweep.parse_param("base_learning_rate=1e-4:1e-2:log")])
    storage = sweep.default_storage(tmp_path)
    study, _ = sweep.open_study(spec, storage, "lost", log=lambda m: None)
    store = RunStore(tmp_path, create=True)
    run_id = store.create_run({}, {}, "tiny", status="running")
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", run_id], start_new_session=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.update_run(run_id, pid=orphan.pid)
    trial = study.ask({"base_learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    for key, value in {"run_id": run_id, "host": __import__("socket").gethostname(), "worker_pid": dead.pid,
                       "worker_started": 0.0}.items():
        trial.set_user_attr(key, value)
    lines = []
    try:
        study, _ = sweep.open_study(None, storage, "lost", runs_root=tmp_path, log=lines.append)
        assert orphan.wait(30) is not None                       # the orphan was ended
    finally:
        if orphan.poll() is None:
            orphan.kill()
    failed, waiting = study.get_trials(deepcopy=False)
    assert failed.state == optuna.trial.TrialState.FAIL and "lost: its sweep process" in failed.user_attrs["error"]
    assert waiting.state == optuna.trial.TrialState.WAITING and waiting.params == failed.params
    assert store.get_run(run_id)["status"] == "failed"
    # Trials of other hosts: Optuna's heartbeat fails them after the grace period, with the same retry.
    assert study._storage.get_heartbeat_interval() == sweep.HEARTBEAT_S
    assert isinstance(study._storage.get_heartbeat_stale_trial_callback(), optuna.storages.RetryHeartbeatStaleTrialCallback)
    assert lines == [f"trial 0 failed: lost: its sweep process {dead.pid} died while the trial ran (run {run_id}); "
                     "retried with the same values"]


def test_a_trial_whose_training_process_is_killed_fails_with_its_exit_code_and_the_sweep_goes_on(tmp_path,
                                                                                                  monkeypatch):
    trainer = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(sweep.launch, "cli_argv", lambda path, *a, **kw: [sys.executable, "-c", trainer])
    spec = sweep.SweepSpec(name="killed", params=[sweep.parse_param("base_learning_rate=1e-4:1e-2:log")])
    lines = []
    study = sweep.run_sweep(spec, 2, "killed", tmp_path, log=lines.append)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]                 # both tried, neither hangs
    assert all(line.endswith("the training process exited with code 137") for line in lines[1:]), lines
    store = RunStore(tmp_path, create=False)
    assert {store.get_run(r["run_id"])["status"] for r in store.list_runs()} == {"failed"}
