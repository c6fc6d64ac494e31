"""Scale-out: the same training under torchrun with 2 CPU ranks (gloo) ends with identical parameters on every rank
and writes exactly one run record."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from hybrid_optimization.distributed import DistContext, all_reduce_mean, any_rank, shard
from hybrid_optimization.tracking import RunStore
from workbench import queries

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import os, sys, torch
from hybrid_optimization.distill import TrainOptions, train
out, root = sys.argv[1], sys.argv[2]
result = train(TrainOptions(hybrid=True, ternary=True, qat=True, max_steps=6, steps_per_epoch=3, batch_size=8,
                            quiet=True, runs_root=root, eval_every=1))
torch.save({"params": result.model.state_dict(), "losses": [h["loss"] for h in result.history],
            "multipliers": [h["lr_multiplier"] for h in result.history], "run_id": result.run_id},
           os.path.join(out, f"rank{os.environ['RANK']}.pt"))
"""


def test_single_process_helpers_are_no_ops():
    ctx = DistContext()
    assert not ctx.enabled and ctx.is_main
    assert all_reduce_mean(2.5, ctx) == 2.5 and any_rank(True, ctx) and not any_rank(False, ctx)
    assert shard([1, 2, 3, 4], DistContext(rank=1, world_size=2)) == [3, 4]


def test_two_gloo_ranks_end_with_identical_parameters(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(tmp_path), str(tmp_path / "runs")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["losses"] == rank1["losses"] and len(rank0["losses"]) == 6
    assert rank0["multipliers"] == rank1["multipliers"]                 # identical aux-net decisions
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    runs = queries.list_runs(RunStore(tmp_path / "runs"))
    assert runs["run_id"].tolist() == [rank0["run_id"]] and rank1["run_id"] == rank0["run_id"]
    run = RunStore(tmp_path / "runs").get_run(rank0["run_id"])
    assert run["status"] == "finished" and "2 ranks (gloo)" in run["device"]
