"""The architecture is kept by tools, not by review: `lint-imports` (the contracts in .importlinter: layers, no
cycles, the core without UI libraries, the torch-free modules) and `ruff check` (ruff.toml). Both are pinned in
requirements-dev.txt; a machine without them skips with the reason."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name          # the venv's own script, even when PATH lacks the venv
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: pip install -r requirements-dev.txt")
    return found


def test_import_contracts_are_kept():
    out = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout and "Contracts: 5 kept, 0 broken." in out.stdout


def test_ruff_finds_nothing():
    out = subprocess.run([_tool("ruff"), "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_the_contracts_would_catch_an_upward_import(tmp_path):
    """The layers contract is not vacuous: the same configuration over a copy of the package in which the schema
    imports the run store is reported broken."""
    _tool("lint-imports")
    package = tmp_path / "hybrid_optimization"
    shutil.copytree(ROOT / "hybrid_optimization", package, ignore=shutil.ignore_patterns("__pycache__"))
    schema = package / "schema.py"
    schema.write_text(schema.read_text() + "\nfrom .tracking import RunStore  # noqa: E402,F401\n")
    for name in ("workbench", "benchmarks"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    out = subprocess.run([_tool("lint-imports"), "--no-cache", "--contract", "layers"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(tmp_path),
                                                                          "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "hybrid_optimization.schema -> hybrid_optimization.tracking" in out.stdout, \
        out.stdout[-3000:] + out.stderr[-1000:]
