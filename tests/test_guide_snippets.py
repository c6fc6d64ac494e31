"""Every Python snippet of the guide runs as written, once the user's own model and data exist.

The user-side objects the snippets assume (model, training_data, dataloader, compute_loss, ...) are defined here;
the snippets themselves are read from the guide and executed verbatim, except the Monitoring section's literal
`optimization_step(...)` placeholder, which is filled with the arguments of section 4's call.
"""
import contextlib
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybrid_optimization import AuxiliaryNeuralNetwork, HybridTrainingConfig

from .guide import block_under, code_blocks


@pytest.fixture
def user_world(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # the checkpointing snippet writes into the working directory
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4, size=(8, 16))
    training_data = torch.tensor(np.concatenate([rng.normal(size=(32, 16)) + c for c in centres]),
                                 dtype=torch.float32)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    targets = torch.zeros(32, 1)
    loss = F.mse_loss(model(training_data[:32]), targets)
    gradients = torch.autograd.grad(loss, list(model.parameters()))
    return {
        "np": np, "torch": torch, "F": F, "nn": nn,
        "model": model, "training_data": training_data, "training_data_numpy": training_data.numpy(),
        "cluster_id": 0, "layer_weights_numpy": model[0].weight.detach().numpy(),
        "targets": targets, "loss": loss, "gradients": gradients,
        "dataloader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(training_data), batch_size=32),
        "compute_loss": lambda outputs, t: F.mse_loss(outputs, t),
        "compute_gradients": lambda l, params: torch.autograd.grad(l, list(params)),
        "epoch": 0,
        # imported in the guide's earlier sections
        "AuxiliaryNeuralNetwork": AuxiliaryNeuralNetwork, "HybridTrainingConfig": HybridTrainingConfig,
    }


def run(code: str, world: dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<guide snippet>", "exec"), world)
    return out.getvalue()


def test_section_1_auxiliary_nn(user_world):
    out = run(block_under("1. Auxiliary Neural Network"), user_world)
    assert "Adaptive LR: 1.0000x" in out                 # an untrained net is the identity
    assert "Trust Region: 0.010000" in out


def test_section_2_kmeans_data_and_parameters(user_world):
    out = run(block_under("2. K-Means Clustering", index=0), user_world)
    assert out.count("Cluster ") == 8 and "size=32" in out
    assert len(user_world["cluster_batch"]) == 32
    run(block_under("2. K-Means Clustering", index=1), user_world)
    assert user_world["param_clusterer"].labels_.shape == (32,)


def test_section_3_constrained_optimizer(user_world):
    before = [p.detach().clone() for p in user_world["model"].parameters()]
    out = run(block_under("3. Constrained Optimization"), user_world)
    assert "Constraint active: True" in out and "Efficiency:" in out
    after = list(user_world["model"].parameters())
    assert all(not torch.equal(a, b) for a, b in zip(after, before))       # ALL parameters moved
    delta = torch.sqrt(sum(((a.detach() - b) ** 2).sum() for a, b in zip(after, before)))
    assert float(delta) <= 0.01 * (1 + 1e-5)


def test_section_4_manager_then_monitoring_checkpointing_and_cluster_analysis(user_world):
    out = run(block_under("4. Hybrid Optimization Manager"), user_world)
    assert out.count("Step ") == 8 and "Final loss:" in out and "Avg LR multiplier:" in out
    summary = user_world["summary"]
    assert summary["total_steps"] == 8

    monitoring = block_under("Monitoring Training Progress").replace(
        "optimization_step(...)",
        "optimization_step(model=model, loss=loss, gradients=gradients, cluster_id=cluster_id, step=step, "
        "base_lr=0.001)")
    out = run(monitoring, user_world)
    assert out.count("Step ") == 20 and "Constraint rate:" in out

    out = run(block_under("Checkpointing"), user_world)
    assert user_world["hybrid_opt"].auxiliary_nn is user_world["aux_nn"]

    user_world["hybrid_opt"].setup_data_clustering(user_world["training_data"])
    out = run(block_under("Cluster Analysis"), user_world)
    assert out.count("Size:") == 8 and "32 samples" in out


def test_advanced_and_troubleshooting_snippets_run(user_world):
    run(block_under("Custom Loss Functions"), user_world)
    preds = user_world["model"](user_world["training_data"][:4])
    value = user_world["custom_loss_fn"](torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), user_world["model"])
    assert value.ndim == 0 and preds.shape == (4, 1)
    for heading in ("Issue: Constraint Activation Rate Too High", "Issue: Learning Rate Oscillating Wildly",
                    "Issue: Slower Training Than Baseline"):
        run(block_under(heading), user_world)
    assert user_world["config"].auxiliary_nn_hidden_size == 32


def test_all_python_snippets_are_covered():
    headings = [h for h, _ in code_blocks("python")]
    covered = ("1. Auxiliary", "2. K-Means", "3. Constrained", "4. Hybrid", "HybridTrainingConfig Parameters",
               "Custom Loss", "Monitoring", "Checkpointing", "Cluster Analysis", "Issue:")
    assert all(h.startswith(covered) for h in headings), headings
