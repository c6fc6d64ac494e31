"""Shared test setup: CPU-only, deterministic, offline, and never writing into the user's real caches."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    # Runs and caches of a test go to a temporary folder, not ~/.cache/hybrid-workbench.
    cache = tmp_path_factory.getbasetemp() / "hybrid-cache"
    monkeypatch.setenv("HYBRID_CACHE_DIR", os.environ.get("HYBRID_TEST_CACHE_DIR", str(cache)))
    monkeypatch.setenv("HYBRID_RUNS_ROOT", str(tmp_path_factory.mktemp("runs")))
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
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
