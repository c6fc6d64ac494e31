"""Shared test setup: CPU-only, deterministic, offline, and never writing into the user's real caches.

Speed on 2 cores (issue 18: the default suite in ≤ 6 min), with nothing tested less:
- one cache per test session, shared by the xdist workers: the tiny preset's tokenizer, teacher and teacher logits
  are built once (the cache's own flock makes a second worker wait for the first, as two runs started together do);
- one torch thread per worker when the workers fill the cores, and OMP_NUM_THREADS for the processes tests start
  (two 2-thread workers on 2 cores stall each other's small ops for whole scheduler slices);
- modules whose module-scoped fixture is the expensive part run on one worker (`--dist loadgroup` in pytest.ini,
  groups from ONE_WORKER below), so the fixture is built once, not once per worker; so do the tests that share one
  expensive module fixture in a module otherwise spread (ONE_WORKER_TESTS);
- the longest tests and groups start first (LONGEST_FIRST): a long test picked up last keeps one worker busy while
  the other has nothing left to do.
"""
import functools
import gc
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Module → why its tests stay together on one worker (each reason is the module-scoped fixture's cost).
ONE_WORKER = {
    "test_bad_inputs.py": "the whole table of ~200 subprocess probes runs in the module fixture",
    "test_install.py": "a wheel build and a fresh virtual environment",
    "test_reporting.py": "one training run that every test reads",
    "test_benchmarks_smoke.py": "the prepared tiny workload and one `bench_hybrid.py --smoke` run",
}
# Tests (node id prefixes) → the group they run in together on one worker, for their shared module fixture.
ONE_WORKER_TESTS = {
    # test_faults.py's `reference` (the uninterrupted 30-step CLI run every resumed run must equal, ~25 s)
    "tests/test_faults.py::test_interrupted_then_resumed_equals_the_uninterrupted_run": "faults-reference",
    "tests/test_faults.py::test_disk_full_during_a_checkpoint_is_one_line_recorded_and_the_last_checkpoint_resumes":
        "faults-reference",
}
# Node id prefixes, longest first (from `pytest --durations=0`, 2 workers); everything else keeps collection order.
# First the two that can start on a cold cache side by side: the benchmark smoke module builds the tiny teacher
# in-process (~45 s) while the bad-input table (teacher-free subprocesses, ~25 s) fills the other core; then, on
# that core, the teacher-free notebooks, so that it does not wait ~15 s on the teacher's build lock (the fault tests'
# reference run needs the teacher).
LONGEST_FIRST = (
    "tests/test_benchmarks_smoke.py",
    "tests/test_bad_inputs.py",
    "tests/test_notebooks.py::test_notebook_runs_top_to_bottom_in_fast_mode[01_quantization]",
    "tests/test_notebooks.py::test_notebook_runs_top_to_bottom_in_fast_mode[02_trust_region]",
    "tests/test_faults.py::test_interrupted_then_resumed_equals_the_uninterrupted_run",     # the group above
    "tests/test_faults.py::test_disk_full_during_a_checkpoint_is_one_line_recorded_and_the_last_checkpoint_resumes",
    "tests/test_notebooks.py::test_notebook_runs_top_to_bottom_in_fast_mode[05_precision_plan]",
    "tests/e2e/test_workbench_views.py::test_tiny_sweep_from_the_sweep_page",
    "tests/test_notebooks.py::test_notebook_runs_top_to_bottom_in_fast_mode[06_hybrid_distillation]",
    "tests/test_reporting.py",
    "tests/test_install.py",
    "tests/e2e/test_browser.py",
    "tests/test_faults.py::test_re_export_replaces_its_own_export_atomically",
    "tests/test_faults.py::test_a_checkpoint_copied_from_another_run",
    "tests/test_tracks_smoke.py::test_every_hybrid_variant_trains",
    "tests/test_workbench_app.py::test_clusters_and_precision_pages_show_the_run",
    "tests/test_distill_ddp.py::test_two_gloo_ranks_end_with_identical_parameters",
    "tests/test_faults.py::test_a_checkpoint_with_flipped_bytes",
    "tests/test_distill_train.py::test_cli_process_stops_on_a_store_request_and_resumes",
    "tests/test_notebooks.py::test_notebook_runs_top_to_bottom_in_fast_mode",
    "tests/test_faults.py::test_three_runs_on_a_cold_cache",
    "tests/test_optimizer_menu.py::test_cli_trains_every_optimizer_and_schedule",
    "tests/test_sweep.py::test_workers_opening_a_new_storage_at_the_same_instant",
    "tests/test_distill_train.py::test_resume_after_a_stop_equals_an_uninterrupted_run",
    "tests/test_sweep.py::test_median_pruner_stops_a_trailing_trial",
    "tests/test_faults.py::test_sigterm_while_the_pipeline_builds_its_teacher",
)


def _workers() -> int:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))


def pytest_configure(config):
    _scan_installed_components_once()
    if _workers():
        threads = max(1, len(os.sched_getaffinity(0)) // _workers())
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))      # inherited by the CLI runs, kernels, servers


def _scan_installed_components_once() -> None:
    """Every new AppTest scans the metadata of every installed distribution for Streamlit v2 components on its first
    run (`BidiComponentManager.discover_and_register_components`: the METADATA of ~200 distributions parsed, ~0.25
    CPU-s here), and the workers make ~100 AppTests (~25-30 CPU-s). The installed packages do not change during a
    session: scan once.
    The e2e tests' real `streamlit run` servers still scan at their start, as a user's does."""
    from streamlit.components.v2 import manifest_scanner

    manifest_scanner.scan_component_manifests = functools.cache(manifest_scanner.scan_component_manifests)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """HYBRID_TEST_CACHE_DIR: set it to keep the cache across sessions (a warm tiny teacher); else one per session,
    in the folder above the workers' own (popen-gw0, popen-gw1). Session scope runs before any module fixture, so
    module fixtures (which run before `_isolated`) see the same cache and a temporary runs root too."""
    if not os.environ.get("HYBRID_TEST_CACHE_DIR"):
        base = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            base = base.parent
        os.environ["HYBRID_TEST_CACHE_DIR"] = str(base / "hybrid-cache")
    os.environ["HYBRID_CACHE_DIR"] = os.environ["HYBRID_TEST_CACHE_DIR"]
    os.environ["HYBRID_RUNS_ROOT"] = str(tmp_path_factory.mktemp("session-runs"))
    yield Path(os.environ["HYBRID_TEST_CACHE_DIR"])


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch, _session_cache):
    # Runs and caches of a test go to a temporary folder, not ~/.cache/hybrid-workbench.
    monkeypatch.setenv("HYBRID_CACHE_DIR", str(_session_cache))
    monkeypatch.setenv("HYBRID_RUNS_ROOT", str(tmp_path_factory.mktemp("runs")))
    torch.manual_seed(0)
    yield


def pytest_collection_finish(session):
    # Everything imported so far (torch, transformers, streamlit, the test modules: millions of objects) lives as
    # long as the worker. Freezing it takes it out of every later garbage collection — the pipeline's own
    # gc.collect() after releasing a teacher (setup.return_freed_memory), the benchmark's timing loops, Python's
    # automatic full collections — which otherwise traverse all of it each time (~0.3 s a call in a worker).
    # Objects created later are collected as before.
    gc.collect()
    gc.freeze()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with the groups named by ONE_WORKER: xdist 3.8 groups by renaming a test's nodeid, which
    pytest 9 no longer allows, so `xdist_group` marks would have no effect."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            group = next((g for prefix, g in ONE_WORKER_TESTS.items() if nodeid.startswith(prefix)), None)
            return group or (module if Path(module).name in ONE_WORKER else nodeid)

    return OneWorkerModules(config, log)


def _rank(nodeid: str) -> int:
    return next((i for i, prefix in enumerate(LONGEST_FIRST) if nodeid.startswith(prefix)), len(LONGEST_FIRST))


def pytest_collection_modifyitems(config, items):
    # Longest first (a stable sort: the rest keeps collection order). Every worker collects the same order, so the
    # scheduler's queue (--no-loadscope-reorder) is this order; a group's place is that of its first test. Only
    # under xdist: in one process it would only split modules (and rebuild their module fixtures).
    if _workers():
        items.sort(key=lambda item: _rank(item.nodeid))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a CPU shared with other jobs, multi-threaded small ops stall for whole scheduler
    slices while a peer thread is descheduled (measured here: 100× slower); tests using it are about behaviour."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
