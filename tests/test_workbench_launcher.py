"""The launcher (argv, records, real background processes: stop, SIGTERM fallback, reap, resume), presets and
data uploads of the workbench."""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hybrid_optimization.config import ConfigError, HybridTrainingConfig, field_error
from hybrid_optimization.tracking import RunStore, pid_alive
from hybrid_optimization import launch as launch_path
from hybrid_optimization.distill.options import TrainOptions
from workbench import datasets, launcher, presets, queries
from workbench.launcher import LaunchError

# A stand-in for distillation.py that talks to the store like the trainer does (FAKE_MODE picks a behaviour):
# obedient: log steps until a stop is requested, then report "stopped" and exit 143;
# ignore_stop: report running, then hang without polling the flag (only SIGTERM ends it);
# bad_input: one line on stderr and exit 2, like the CLI on a bad flag.
FAKE_CLI = textwrap.dedent("""
    import argparse, json, os, sys, time
    from hybrid_optimization.tracking import RunStore
    p = argparse.ArgumentParser()
    p.add_argument("--run_id"); p.add_argument("--resume"); p.add_argument("--runs_root"); p.add_argument("--options")
    args, _ = p.parse_known_args()
    if args.options:                      # what the launcher passes: the CLI's TrainOptions as JSON
        options = json.load(open(args.options))
        args.run_id, args.runs_root = options["run_id"], options["runs_root"]
    mode = os.environ.get("FAKE_MODE", "obedient")
    if mode == "bad_input":
        print("error: --data nope.jsonl: file does not exist", file=sys.stderr)
        sys.exit(2)
    store = RunStore(args.runs_root)
    w = store.writer(args.run_id or args.resume, commit_every_s=0.1)
    w.set_pid(os.getpid()); w.set_status("running")
    step = 0
    while True:
        step += 1
        w.log_step(step, loss=1.0 / step)
        if mode == "obedient" and w.stop_requested():
            w.set_status("stopped"); w.close(); sys.exit(143)
        time.sleep(0.05 if mode == "obedient" else 0.5)
""")


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs")


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    script = tmp_path / "fake_distillation.py"
    script.write_text(FAKE_CLI)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    return script


def _wait(predicate, timeout=20.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


# -- options and argv --------------------------------------------------------------------------------------------------
def test_the_cli_gets_one_argument_the_options_file(tmp_path):
    argv = launcher.build_argv(tmp_path / "options.json", python="PY", script=Path("/x/distillation.py"))
    assert argv == ["PY", "/x/distillation.py", f"--options={tmp_path / 'options.json'}"]
    argv = launcher.build_argv(tmp_path / "o.json", nproc=2, python="PY", script=Path("d.py"))
    assert argv[:5] == ["PY", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_form_values_become_the_clis_train_options(tmp_path):
    config = HybridTrainingConfig(max_steps=50, seed=3, eval_interval=7)
    options = launcher.train_options(config, dict(preset="tiny", tags=["a", "b"], alpha=0.3, student_size="small"),
                                     "RID", tmp_path)
    assert isinstance(options, TrainOptions) and options.hybrid_config == config      # the config embedded
    assert (options.hybrid, options.qat, options.ternary, options.bits) == (True, True, True, 1.58)
    assert (options.max_steps, options.seed, options.alpha, options.student_size) == (50, 3, 0.3, "small")
    assert (options.export, options.save_metrics, options.quiet) == ("packed", True, True)
    assert (options.run_id, options.runs_root, options.tags) == ("RID", str(tmp_path), ["a", "b"])
    # The form's "Evaluate every N steps" (config.eval_interval) is the run's evaluation cadence (issue 9, defect 3).
    assert options.eval_every_steps == 7 and options.eval_every is None
    full = launcher.train_options(HybridTrainingConfig(use_quantization=False), {"hybrid": False, "epochs": 3},
                                  "R", tmp_path)
    assert not full.qat and full.bits is None and not full.hybrid and full.max_steps is None and full.epochs == 3
    two_bit = launcher.train_options(HybridTrainingConfig(target_bits=2), {}, "R", tmp_path)
    assert two_bit.bits == 2 and not two_bit.ternary
    # The options document round-trips through JSON as it is: what options.json and runs.args["options"] hold.
    assert TrainOptions.from_dict(json.loads(options.to_json())) == options


def test_option_errors_name_the_option(tmp_path):
    errors = launcher.option_errors(dict(preset="huge", nproc=0, device="tpu", alpha=2.0,
                                         data=str(tmp_path / "missing.jsonl")))
    assert set(errors) == {"preset", "nproc", "device", "alpha", "data"}
    assert errors["preset"] == "preset = 'huge' is invalid: it must be one of tiny, smollm2"   # the CLI's rule
    assert "does not exist" in errors["data"]
    assert "unknown launch option(s): gpu" in launcher.option_errors({"gpu": True})["gpu"]
    with pytest.raises(LaunchError, match="unknown launch option"):
        launcher.check_form({"gpu": True})
    assert launcher.option_errors(launcher.form_defaults()) == {}


def test_the_form_has_no_option_shape_of_its_own():
    """Issue 18: every form value is a TrainOptions field (or the process count); the defaults are TrainOptions'
    except where the form differs on purpose, and config fields are never options of the form as well."""
    fields = set(TrainOptions.__dataclass_fields__)
    assert set(launcher.form_defaults()) - {"nproc"} <= fields and launcher.FORM_FIELDS - {"nproc"} <= fields
    assert not launcher.FORM_FIELDS & {"lr", "batch_size", "max_steps", "seed", "qat", "bits", "hybrid_config"}
    defaults = TrainOptions()
    same = {k for k, v in launcher.form_defaults().items() if k in fields and getattr(defaults, k) == v}
    assert set(launcher.form_defaults()) - same == {"hybrid", "export", "save_metrics", "epochs", "alpha",
                                                   "temperature", "nproc"}


# -- launching (process start stubbed) -------------------------------------------------------------------------------
def test_launch_creates_a_queued_record_and_starts_the_cli(store, monkeypatch):
    calls = []

    class FakePopen:
        pid = 424242

        def poll(self):
            return None

    def fake_start(argv, log_dir, *, die_with_parent=False, env=None, cwd=launch_path.REPO_ROOT):
        calls.append((argv, cwd, log_dir, env))
        return FakePopen()

    monkeypatch.setattr(launch_path, "start", fake_start)
    started = time.perf_counter()
    run_id = launcher.launch(store, {"max_steps": 25, "base_learning_rate": 5e-4}, {"preset": "tiny", "tags": ["x"]})
    assert time.perf_counter() - started < 2
    (argv, cwd, log_dir, env), = calls
    run = store.get_run(run_id)
    assert run["status"] == "queued" and run["pid"] == 424242 and run["tags"] == ["x"] and run["total_steps"] == 25
    assert run["args"]["argv"] == argv and argv[0] == sys.executable and len(argv) == 3
    assert argv[2].startswith("--options=") and cwd == launcher.REPO_ROOT and log_dir == store.root / run_id
    assert env["HYBRID_RUNS_ROOT"] == str(store.root) and env["HF_HUB_OFFLINE"] == "1"
    options = json.loads(Path(argv[2].split("=", 1)[1]).read_text())
    assert options["run_id"] == run_id and options["runs_root"] == str(store.root) and options["quiet"]
    assert options["hybrid_config"] == HybridTrainingConfig(max_steps=25, base_learning_rate=5e-4).to_dict()
    assert run["args"]["options"] == options          # one shape: the options document, in the file and the store
    launcher._CHILDREN.clear()


def test_a_bad_config_or_option_starts_nothing(store, monkeypatch):
    monkeypatch.setattr(launch_path, "start", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(ConfigError) as info:
        launcher.launch(store, {"initial_trust_radius": 5.0}, {})
    assert str(info.value) == field_error("initial_trust_radius", 5.0)
    with pytest.raises(LaunchError, match="device = 'tpu'"):
        launcher.launch(store, {}, {"device": "tpu"})
    with pytest.raises(LaunchError, match="training CLI .* is missing"):
        launcher.launch(store, {}, {}, script=Path("/nonexistent/distillation.py"))
    assert queries.list_runs(store).empty


# -- real background processes ---------------------------------------------------------------------------------------
def test_stop_is_a_request_the_trainer_honours(store, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "obedient")
    run_id = launcher.launch(store, {"max_steps": 1000}, {}, script=fake_cli)
    pid = store.get_run(run_id)["pid"]
    assert os.getpgid(pid) == pid            # its own process group (and session)
    assert _wait(lambda: store.get_run(run_id)["status"] == "running" and store.get_run(run_id)["step"])
    assert launcher.stop(store, run_id, grace_s=30)
    assert _wait(lambda: store.get_run(run_id)["status"] == "stopped")
    assert _wait(lambda: launcher.reap(store) == [] and not pid_alive(pid))
    assert store.get_run(run_id)["error"] is None


def test_sigterm_fallback_and_resume(store, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ignore_stop")
    run_id = launcher.launch(store, {}, {}, script=fake_cli)
    pid = store.get_run(run_id)["pid"]
    assert _wait(lambda: store.get_run(run_id)["status"] == "running")
    with pytest.raises(LaunchError, match="can be resumed once it has stopped"):
        launcher.resume(store, run_id, script=fake_cli)
    assert launcher.stop(store, run_id, grace_s=1.0)
    assert _wait(lambda: not pid_alive(pid), timeout=15)       # SIGTERM to its process group after the grace
    assert _wait(lambda: (launcher.reap(store), store.get_run(run_id)["status"])[1] == "stopped", timeout=15)
    assert "signal" in store.get_run(run_id)["error"]

    monkeypatch.setenv("FAKE_MODE", "obedient")
    new_pid = launcher.resume(store, run_id, script=fake_cli)
    run = store.get_run(run_id)
    assert new_pid != pid and run["pid"] == new_pid and run["status"] in ("queued", "running")
    cmdline = Path(f"/proc/{new_pid}/cmdline").read_bytes().split(b"\0")
    assert f"--resume={run_id}".encode() in cmdline
    assert _wait(lambda: store.get_run(run_id)["status"] == "running")
    launcher.stop(store, run_id)
    assert _wait(lambda: store.get_run(run_id)["status"] == "stopped")
    assert _wait(lambda: not pid_alive(new_pid))
    launcher.reap(store)


def test_a_process_that_dies_before_reporting_is_marked_failed(store, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "bad_input")
    run_id = launcher.launch(store, {}, {}, script=fake_cli)
    assert _wait(lambda: run_id in launcher.reap(store))
    run = store.get_run(run_id)
    assert run["status"] == "failed"
    assert "exited with code 2" in run["error"] and "--data nope.jsonl: file does not exist" in run["error"]


# -- presets ---------------------------------------------------------------------------------------------------------
def test_presets_round_trip_and_validation(tmp_path):
    config = HybridTrainingConfig(target_bits=2, data_clusters=16).to_dict()
    presets.save_preset(tmp_path, "ternary 16", config, {**launcher.form_defaults(), "preset": "smollm2"})
    assert presets.list_presets(tmp_path) == ["ternary 16"]
    loaded_config, loaded_options = presets.load_preset(tmp_path, "ternary 16")
    assert loaded_config == config and loaded_options["preset"] == "smollm2"
    with pytest.raises(presets.PresetError, match="preset name '../evil' is invalid"):
        presets.save_preset(tmp_path, "../evil", config, {})
    with pytest.raises(ConfigError, match="data_clusters"):
        presets.save_preset(tmp_path, "bad", {**config, "data_clusters": 0}, {})
    (tmp_path / "presets" / "broken.json").write_text("{not json")
    with pytest.raises(presets.PresetError, match="not valid JSON"):
        presets.load_preset(tmp_path, "broken")
    (tmp_path / "presets" / "old.json").write_text(json.dumps({"config": {"learning_rate": 1}}))
    with pytest.raises(presets.PresetError, match="unknown config field.*learning_rate"):
        presets.load_preset(tmp_path, "old")
    presets.delete_preset(tmp_path, "ternary 16")
    assert "ternary 16" not in presets.list_presets(tmp_path)


# -- uploads ---------------------------------------------------------------------------------------------------------
def test_uploads_are_capped_typed_and_stored_by_content(tmp_path):
    good = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n'
    path = datasets.save_upload("my chats.jsonl", good, tmp_path)
    assert path.parent == tmp_path / "uploads" and path.read_bytes() == good and path.name.endswith("my_chats.jsonl")
    assert datasets.save_upload("again.jsonl", good, tmp_path).name.split("-")[0] == path.name.split("-")[0]
    with pytest.raises(datasets.DataFileError, match="limited to 1 MB"):
        datasets.save_upload("big.txt", b"x" * (1024 * 1024 + 1), tmp_path, max_mb=1)
    with pytest.raises(datasets.DataFileError, match="unsupported file type '.csv'"):
        datasets.save_upload("data.csv", b"a,b\n", tmp_path)
    with pytest.raises(datasets.DataFileError, match="is empty"):
        datasets.save_upload("empty.txt", b"  \n", tmp_path)


def test_data_files_are_checked_by_the_pipelines_reader(tmp_path):
    good = tmp_path / "chats.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n'
                    '{"messages": [{"role": "assistant", "content": "Yo"}]}\n')
    assert datasets.validate_data_file(good) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "Hi"}]}\n')
    with pytest.raises(datasets.DataFileError, match="line 1: message 0 has role 'robot'; allowed roles"):
        datasets.validate_data_file(bad)
    with pytest.raises(datasets.DataFileError, match="does not exist"):
        datasets.validate_data_file(tmp_path / "nope.txt")


def test_a_run_name_or_tag_beginning_with_a_dash_is_never_read_as_a_flag(store, tmp_path, monkeypatch):
    """Issue 13, item 6: the launcher's options file reaches the real CLI's parser with every value intact."""
    from hybrid_optimization.distill.cli import parse_options
    calls = []
    monkeypatch.setattr(launch_path, "start", lambda argv, *a, **k: calls.append(argv) or type("P", (), {
        "pid": 424243, "poll": lambda self: None})())
    launcher.launch(store, {"max_steps": 5}, {"run_name": "--help", "tags": ["-x", "--lr"]})
    (argv,) = calls
    options = parse_options(argv[2:])
    assert options.run_name == "--help" and options.tags == ["-x", "--lr"] and options.max_steps == 5
    assert options.errors() == {}
    launcher._CHILDREN.clear()
