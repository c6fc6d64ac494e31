"""The CLI refuses bad input in one line, exit code 2, before torch is imported and before any data preparation
(issue 9 item 3, issue 13 items 2, 3 and 6). Each case runs the real CLI in a subprocess and checks that torch
was never imported, so these tests take a fraction of a second each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_optimization.distill.options import (MAX_BATCH_SIZE, MAX_STEPS, OptionsError, TrainOptions,
                                                 check_batch_memory)
from hybrid_optimization.distill.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI's main() and reports whether torch (or transformers) was imported on the way.
PROBE = ("import sys, json; from hybrid_optimization.distill.cli import main; code = main(sys.argv[1:]); "
         "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules, "
         "'transformers': 'transformers' in sys.modules}))")


def cli(*argv: str, cwd: Path = ROOT) -> tuple[int, str, dict]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["code"], proc.stderr, report


def refused(*argv: str) -> str:
    code, err, report = cli(*argv)
    assert code == 2, err
    assert not report["torch"] and not report["transformers"], "validation imported torch"
    assert err.strip() and err.strip().count("\n") == 0, err           # one line
    return err.strip()


def test_help_and_a_bad_flag_answer_without_importing_torch():
    code, err, report = cli("--help")
    assert code == 0 and not report["torch"]
    assert "must be" not in err and "--max_steps" in subprocess.run(
        [sys.executable, str(ROOT / "distillation.py"), "--help"], capture_output=True, text=True).stdout
    assert "invalid float value: 'abc'" in refused("--lr", "abc")


@pytest.mark.parametrize("argv, message", [
    (["--max_steps", "99999999999999999999"], f"--max_steps 99999999999999999999 is invalid: it must be an integer "
                                              f"in [1, {MAX_STEPS:,}]"),
    (["--epochs", "99999999999999999999999"], "--epochs 99999999999999999999999 is invalid"),
    (["--batch_size", "200000"], f"--batch_size 200000 is invalid: it must be an integer in [1, {MAX_BATCH_SIZE:,}]"),
    (["--seq_len", "100000"], "--seq_len 100000 is invalid"),
    (["--seq_len", "3"], "--seq_len 3 is invalid: it must be an integer in [8, 8,192]"),   # was accepted, then trained
    (["--precision_budget", "9"], "--precision_budget 9.0 is invalid: it must be empty (no budget) or a number of average bits in [1, 8]"),
    (["--bits", "3", "--qat"], "--bits 3.0 is invalid"),
    (["--export", "onnx"], "argument --export: invalid choice: 'onnx'"),
])
def test_absurd_sizes_and_values_are_refused_in_one_line(tmp_path, argv, message):
    assert message in refused(*argv, "--runs_root", str(tmp_path))
    assert list(tmp_path.iterdir()) == []                                  # nothing created


def test_the_batch_size_is_checked_against_available_memory():
    tiny = get_preset("tiny")
    check_batch_memory(32, 64, tiny, available=2 ** 30)                      # 32 windows fit in 1 GiB
    with pytest.raises(OptionsError, match=r"--batch_size 60000: one training step needs about .* GiB .* "
                                           r"available; use --batch_size \d+ or less"):
        check_batch_memory(60000, 64, tiny, available=8 * 2 ** 30)


def test_a_runs_root_that_is_a_file_or_a_symlink_loop_is_refused(tmp_path):
    a_file = tmp_path / "runs.txt"
    a_file.write_text("not a folder")
    assert "is a file, not a directory" in refused("--runs_root", str(a_file))
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    message = refused("--runs_root", str(tmp_path / "loop_a"))
    assert message.startswith(f"error: --runs_root {tmp_path / 'loop_a'}: cannot be used") and "loop" in message
    assert "is not a directory" in refused("--runs_root", str(a_file / "sub"))


def test_a_read_only_runs_root_is_refused(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = False
    if os.geteuid() == 0:                     # root writes through permission bits: a read-only mount is needed
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("running as root and cannot mount a read-only tmpfs here")
    else:
        read_only.chmod(0o555)
    try:
        assert "is not writable" in refused("--runs_root", str(read_only))
        assert "is not writable" in refused("--runs_root", str(read_only / "runs"))
    finally:
        if mounted:
            subprocess.run(["umount", str(read_only)], check=False)
        read_only.chmod(0o755)


def test_resume_refuses_flags_that_cannot_change_by_name(tmp_path):
    """--resume: a fixed flag repeated with the run's stored value is fine (the user adds --resume ID to the command
    they ran); a different value is refused by name with both values, before torch is imported (plan.py)."""
    from hybrid_optimization.tracking import RunStore
    data = tmp_path / "x.txt"
    data.write_text("hello\n")
    stored = TrainOptions(preset="tiny", lr=0.002, runs_root=str(tmp_path))
    run_id = RunStore(tmp_path).create_run(config={}, args={"argv": [], "options": stored.to_dict()}, preset="tiny",
                                           status="stopped")
    message = refused("--resume", run_id, "--preset", "tiny", "--lr", "0.5", "--data", str(data), "--max_steps",
                      "9", "--runs_root", str(tmp_path))
    assert "lr=0.5 (the run's: 0.002)" in message and "data=" in message and "preset" not in message.split(
        "cannot change")[0] and "cannot change when a run is resumed" in message and "max_steps" in message.split(
        "only ")[1]


def test_options_file_values_are_never_read_as_flags(tmp_path):
    options = TrainOptions(run_name="--lr", tags=["-x"], max_steps=99999999999999, runs_root=str(tmp_path))
    path = tmp_path / "options.json"
    path.write_text(options.to_json())
    assert "--max_steps 99999999999999 is invalid" in refused(f"--options={path}")
    path.write_text("{not json")
    assert "--options" in refused(f"--options={path}")
    path.write_text(json.dumps({"gpu": 1}))
    assert "unknown option(s) 'gpu'" in refused(f"--options={path}")


def test_train_options_collect_every_error_with_the_clis_messages():
    errors = TrainOptions(preset="huge", device="tpu", alpha=2.0, epochs=0, tags=["a,b"]).errors()
    assert set(errors) == {"preset", "device", "alpha", "epochs", "tags"}
    assert errors["device"] == "--device 'tpu' is invalid: it must be one of auto, cpu, cuda, mps"
    assert TrainOptions(export=True).errors() == {} and TrainOptions(export=True).export_format == "packed"


def test_the_options_document_is_frozen_and_errors_is_a_pure_query():
    """Issue 18 item 2: TrainOptions is normalised once when built; errors() only reads it; nobody assigns to it."""
    import dataclasses
    options = TrainOptions(export=True, bits=1.585, tags=("a", "b"), qat=True)
    assert (options.export, options.bits, options.tags) == ("packed", 1.58, ["a", "b"])
    before = options.to_dict()
    assert options.errors() == {} and options.to_dict() == before
    bad = TrainOptions(bits=3, export="onnx", lr=-1.0)
    snapshot = bad.to_dict()
    assert set(bad.errors()) == {"bits", "export", "lr"} and bad.to_dict() == snapshot
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.lr = 0.1
    assert options.replace(lr=0.1).lr == 0.1 and options.lr is None


def test_one_bound_per_quantity_for_the_cli_and_the_config():
    """The CLI's --lr / --batch_size / --seed / clusters are checked by the config's own rules (config.FIELD_RULES):
    a value the CLI takes is one the config takes, and the messages say the same bound."""
    from hybrid_optimization.config import FIELD_RULES, field_error
    for option, field, values in (("lr", "base_learning_rate", (1e-9, 10.0, 0.0, -1.0, 10.5)),
                                  ("batch_size", "batch_size", (1, 65_536, 0, 65_537)),
                                  ("seed", "seed", (0, 2 ** 32 - 1, -1, 2 ** 32)),
                                  ("data_clusters", "data_clusters", (1, 4_096, 0, 4_097)),
                                  ("max_steps", "max_steps", (1, 10_000_000, 0, 10_000_001))):
        for value in values:
            cli_ok = option not in TrainOptions(**{option: value}).errors()
            assert cli_ok == (field_error(field, value) is None), (option, value)
        assert FIELD_RULES[field][1] in TrainOptions(**{option: values[-1]}).errors()[option]


def test_the_config_is_embedded_in_the_options_document(tmp_path):
    from hybrid_optimization.config import HybridTrainingConfig
    from hybrid_optimization.distill.cli import parse_options
    config = tmp_path / "config.json"
    config.write_text(HybridTrainingConfig(data_clusters=5, base_learning_rate=0.02).to_json())
    options = parse_options(["--config", str(config), "--max_steps", "7"])
    assert options.hybrid_config == HybridTrainingConfig(data_clusters=5, base_learning_rate=0.02)
    document = json.loads(options.to_json())
    assert document["hybrid_config"]["data_clusters"] == 5 and document["config"] == str(config)
    again = TrainOptions.from_dict(document)
    assert again.hybrid_training_config().to_dict() == options.hybrid_training_config().to_dict()
    config.unlink()                      # the document no longer needs the file
    stored = TrainOptions.from_dict(document)
    assert stored.errors() == {} and stored.hybrid_training_config().base_learning_rate == 0.02


def test_help_shows_the_defaults_the_options_and_config_declare():
    """Issue 18: argparse help texts do not restate defaults by hand; they print the dataclasses' own values."""
    import re

    from hybrid_optimization.config import HybridTrainingConfig
    from hybrid_optimization.distill.cli import build_parser
    text = re.sub(r"\s+", " ", build_parser().format_help())
    config, options = HybridTrainingConfig(), TrainOptions()
    for flag, default in (("--lr F base learning rate", f"{config.base_learning_rate:g}"),
                          ("--batch_size N global batch size in windows", str(config.batch_size)),
                          ("--data_clusters N K-means clusters of the training samples", str(config.data_clusters)),
                          ("--alpha F weight of the hard-label CE in the loss", f"{options.alpha:g}"),
                          ("--seed N seed of initialisation and sampling", str(config.seed))):
        assert f"{flag} ({default})" in text, flag


def test_a_data_file_the_reader_refuses_is_refused_before_torch(tmp_path):
    """Issue 17: the content of a --data file (not UTF-8, empty, a malformed chat, an unknown role) is checked by
    the reader's own rules (distill/data_files.py) before torch is imported, in one line naming the file and line."""
    from hybrid_optimization.distill.data import DataError, load_documents
    files = {"latin1.txt": "caf\u00e9".encode("latin-1"), "blank.txt": b" \n\n ",
             "broken.jsonl": b'{"messages": [{"role": "user", "content": "Hi"}]}\n{"messages": [\n',
             "robot.jsonl": b'{"messages": [{"role": "robot", "content": "Hi"}]}\n',
             "nbsp.txt": "\u00a0\n".encode()}
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        message = refused("--data", str(path), "--runs_root", str(tmp_path / "runs"))
        with pytest.raises(DataError) as reader:        # the same rule and the same words as the trainer's reader
            load_documents(path)
        assert message == f"error: {reader.value}", name
    assert not (tmp_path / "runs" / "runs.db").exists()


def test_sigterm_while_torch_is_imported_marks_the_launched_run_stopped(tmp_path):
    """Issue 17: a SIGTERM in the seconds before the trainer installs its own handlers (importing torch) ends the
    launched run's record 'stopped' at once, instead of leaving it queued until the liveness check calls it lost."""
    import signal
    import time

    from hybrid_optimization.tracking import RunStore
    store = RunStore(tmp_path / "runs")
    run_id = store.create_run(config={}, args=[], preset="tiny", status="queued")
    proc = subprocess.Popen([sys.executable, str(ROOT / "distillation.py"), "--run_id", run_id, "--runs_root",
                             str(store.root), "--max_steps", "2", "--quiet"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not len(store.read_stages(run_id)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)          # the 'data' stage is marked right before torch is imported
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    answered = time.monotonic() - sent
    run = store.get_run(run_id)
    assert proc.returncode == 143, err
    assert run["status"] == "stopped" and "SIGTERM" in run["error"], run
    assert err.strip() == "stopped by SIGTERM while starting (before training began)", err   # ours, not the trainer's
    assert answered < 5, f"answered {answered:.1f} s after the SIGTERM"
