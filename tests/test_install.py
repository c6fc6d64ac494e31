"""`pip install .` works: a wheel built from pyproject.toml, installed into a fresh virtual environment, gives the five
console commands, and each runs from a folder outside the checkout.

Nothing is downloaded: the wheel is built with `--no-build-isolation` (the project venv's setuptools), installed with
`--no-deps --no-index`, and the fresh venv sees the project venv's packages (torch, transformers, ...) through a
`.pth` line — `python -m venv --system-site-packages` would point at the base interpreter's site-packages, not the
project venv's. The package itself comes only from the wheel: the sources are copied to a temporary folder first (so
the build sees just what pyproject.toml packages, and leaves no build/ or *.egg-info in the checkout), and every
command runs with the temporary folder as its working directory, so the checkout is not on sys.path.
"""
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("hybrid-distill", "hybrid-sweep", "hybrid-export", "hybrid-chat", "hybrid-workbench")
SOURCES = ("pyproject.toml", "README.md", "app.py", "distillation.py", "hybrid_optimization", "workbench")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(base / "dist")], check=True, capture_output=True, timeout=300)
    wheel, = (base / "dist").glob("*.whl")
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    outside = base / "elsewhere"
    outside.mkdir()
    return env_dir, purelib, outside


def _run(venv, *argv, timeout=300, env=None):
    env_dir, _, outside = venv
    command = [str(env_dir / "bin" / argv[0]), *argv[1:]]
    return subprocess.run(command, cwd=outside, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_the_wheel_installs_the_packages_and_the_five_commands(venv):
    env_dir, purelib, _ = venv
    assert sorted(p.name for p in (env_dir / "bin").glob("hybrid-*")) == sorted(COMMANDS)
    # the installed layout is the checkout's: app.py beside workbench/ (its pages), distillation.py beside both
    for name in ("app.py", "distillation.py", "workbench/icon.png", "workbench/pages/live.py",
                 "hybrid_optimization/distill/cli.py"):
        assert (purelib / name).is_file(), name
    found = _run(venv, "python", "-c", "import hybrid_optimization, workbench; "
                 "print(hybrid_optimization.__file__); print(workbench.__file__)")
    assert found.returncode == 0, found.stderr
    assert all(line.startswith(str(purelib)) for line in found.stdout.split()), found.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_answers_help_from_outside_the_checkout(venv, command):
    done = _run(venv, command, "--help")
    assert done.returncode == 0, done.stderr
    # the usage line names the command as it was run (hybrid-distill printed `usage: distillation.py`)
    assert done.stdout.startswith(f"usage: {command} ") and "--runs_root" in done.stdout
    assert "Traceback" not in done.stderr


def test_installed_commands_train_and_export_a_run(venv, tmp_path):
    """A real run (tiny preset, 2 steps) with the installed hybrid-distill, then hybrid-export to GGUF and
    hybrid-chat on it, all from outside the checkout."""
    runs = tmp_path / "runs"
    done = _run(venv, "hybrid-distill", "--ternary", "--qat", "--max_steps", "2", "--eval_every", "1000",
                "--export", "--runs_root", str(runs), "--quiet", "--no_progress", timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    run_id = next(line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("run_id="))
    exported = _run(venv, "hybrid-export", run_id, "--format", "gguf", "--runs_root", str(runs))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (runs / run_id / "student.gguf").is_file()
    bad = _run(venv, "hybrid-export", "no-such-run", "--runs_root", str(runs))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    chat = _run(venv, "hybrid-chat", run_id, "--runs_root", str(runs), "--message", "hello", "--max_new_tokens", "4")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "student" in chat.stdout


def test_hybrid_workbench_serves_the_installed_app(venv, tmp_path):
    """hybrid-workbench starts Streamlit on the installed app.py; its health endpoint answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env_dir, _, outside = venv
    proc = subprocess.Popen([str(env_dir / "bin" / "hybrid-workbench"), "--runs_root", str(tmp_path), "--",
                             "--server.port", str(port)], cwd=outside, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as answer:
                    assert answer.read() == b"ok"
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the workbench did not answer within 120 s")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_workbench_flags_match_the_checkouts_streamlit_config():
    """Installed, the app has no .streamlit/config.toml beside it: the command passes the same settings."""
    import tomllib

    from workbench import start
    with open(ROOT / ".streamlit" / "config.toml", "rb") as f:
        assert tomllib.load(f) == start.SETTINGS
    argv = start.streamlit_argv(["--server.port", "8600"])
    assert argv[1:5] == ["-m", "streamlit", "run", str(ROOT / "app.py")]
    assert "--server.address=127.0.0.1" in argv and argv[-2:] == ["--server.port", "8600"]


def test_the_checkout_entry_points_keep_working():
    """distillation.py and `python -m ...` from the checkout, as before the package existed; each usage line and
    error line names the entry point as it was run."""
    for argv, name in ((["distillation.py"], "distillation.py"),
                       (["-m", "hybrid_optimization.distill"], "python -m hybrid_optimization.distill"),
                       (["-m", "hybrid_optimization.sweep"], "python -m hybrid_optimization.sweep"),
                       (["-m", "hybrid_optimization.export"], "python -m hybrid_optimization.export"),
                       (["-m", "hybrid_optimization.chat"], "python -m hybrid_optimization.chat")):
        done = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: {name} "), (argv, done.stdout[:200])
        bad = subprocess.run([sys.executable, *argv, "--no_such_flag"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode == 2 and bad.stderr.startswith(f"{name}: error:"), (argv, bad.stderr[-300:])
        assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_command_name_is_the_name_it_was_run_as():
    from hybrid_optimization.progname import command_name
    assert command_name("hybrid_optimization.distill", "/venv/bin/hybrid-distill") == "hybrid-distill"
    assert command_name("hybrid_optimization.distill", "distillation.py") == "distillation.py"
    assert command_name("hybrid_optimization.distill", "/x/hybrid_optimization/distill/__main__.py") == \
        "python -m hybrid_optimization.distill"
    assert command_name("hybrid_optimization.chat", "/x/hybrid_optimization/chat.py") == \
        "python -m hybrid_optimization.chat"
    assert command_name("hybrid_optimization.sweep", "") == "python -m hybrid_optimization.sweep"


def test_pyproject_extras_and_pins_agree():
    """Every extra's package is pinned in requirements*.txt (what CI installs), so the extras are tested."""
    import tomllib
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    pinned = {}
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                package, version = line.split("==")
                pinned[package.strip().lower().replace("_", "-")] = version.strip()
    for extra, requirements in {"deps": project["dependencies"], **project["optional-dependencies"]}.items():
        for requirement in requirements:
            package = requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("_", "-")
            assert package in pinned, f"{extra}: {package} is not pinned in requirements*.txt"
    assert set(project["scripts"]) == set(COMMANDS)
