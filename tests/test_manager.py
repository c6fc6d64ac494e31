import math

import numpy as np
import pytest
import torch
from torch import nn

from hybrid_optimization import HybridOptimizationManager, HybridTrainingConfig


def setup(seed=0, **config):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    data = torch.cat([torch.randn(100, 8) + 4, torch.randn(60, 8) - 4, torch.randn(40, 8)])
    targets = data[:, :1].clone()
    manager = HybridOptimizationManager(HybridTrainingConfig(data_clusters=3, batch_size=16, **config))
    return manager, model, data, targets


def run(manager, model, data, targets, steps=30, gradient_form="list"):
    for step in range(steps):
        cluster = step % manager.config.data_clusters
        idx_batch = manager.get_cluster_batch(torch.arange(len(data)), batch_size=16, cluster_id=cluster)
        x, y = data[idx_batch], targets[idx_batch]
        loss = ((model(x) - y) ** 2).mean()
        if gradient_form == "none":
            model.zero_grad()
            loss.backward()
            grads = None
        else:
            grads = torch.autograd.grad(loss, list(model.parameters()))
            if gradient_form == "flat":
                grads = torch.cat([g.reshape(-1) for g in grads])
        metrics = manager.optimization_step(model=model, loss=loss, gradients=grads, cluster_id=cluster,
                                            step=step, base_lr=0.01)
    return metrics


@pytest.mark.parametrize("form", ["list", "flat", "none"])
def test_optimization_step_updates_all_parameters(form):
    manager, model, data, targets = setup()
    manager.setup_data_clustering(data)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = run(manager, model, data, targets, steps=5, gradient_form=form)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    for key in ("loss", "learning_rate", "lr_multiplier", "trust_radius", "update_magnitude", "constraint_active",
                "efficiency", "gradient_magnitude", "quantization_error"):
        assert key in metrics
    assert metrics["learning_rate"] == pytest.approx(0.01 * metrics["lr_multiplier"])


def test_summary_has_the_guide_fields_and_consistent_values():
    manager, model, data, targets = setup()
    manager.setup_data_clustering(data)
    run(manager, model, data, targets, steps=40)
    s = manager.get_summary()
    h = s["metrics_history"]
    assert s["total_steps"] == 40 == len(h["loss"])
    assert s["final_loss"] == h["loss"][-1]
    assert s["avg_lr_multiplier"] == pytest.approx(np.mean(h["lr_multiplier"]))
    assert s["constraint_activation_rate"] == pytest.approx(np.mean(h["constraint_active"]))
    assert s["trust_radius"] == h["trust_radius"][-1]
    assert h["loss"][-1] < h["loss"][0]


def test_use_switches_turn_parts_off():
    manager, model, data, targets = setup(use_auxiliary_nn=False, use_trust_region=False, use_clustering=False,
                                          use_quantization=False)
    labels = manager.setup_data_clustering(data)
    assert manager.data_clusterer is None and set(labels) == {0}
    run(manager, model, data, targets, steps=20)
    h = manager.get_summary()["metrics_history"]
    assert manager.auxiliary_nn is None and manager.optimizer.aux_net is None
    assert set(h["lr_multiplier"]) == {1.0}
    assert not any(h["constraint_active"]) and all(math.isinf(r) for r in h["trust_radius"])
    assert all(q is None for q in h["quantization_error"])


def test_everything_on_uses_every_part():
    # the guide's formula, ‖ΔΘ‖ ≤ μ: at μ = 0.001 it binds on some steps of this toy model and not all (the rms
    # default's μ·1e-3·√N is far smaller for a model this size and would bind on every step)
    manager, model, data, targets = setup(initial_trust_radius=0.001, log_interval=1, trust_region_mode="absolute")
    labels = manager.setup_data_clustering(data)
    assert len(set(labels)) == 3
    run(manager, model, data, targets, steps=60)
    h = manager.get_summary()["metrics_history"]
    assert any(h["constraint_active"])                              # the trust region binds at μ = 0.001
    assert len(set(round(m, 6) for m in h["lr_multiplier"])) > 10    # the aux net is learning
    assert all(q is not None and 0 < q < 1 for q in h["quantization_error"])
    assert manager.sampler.batches_per_cluster.sum() == 60


def test_replacing_the_auxiliary_net_takes_effect():
    from hybrid_optimization import AuxiliaryNeuralNetwork
    manager, model, data, targets = setup()
    manager.setup_data_clustering(data)
    run(manager, model, data, targets, steps=3)
    fresh = AuxiliaryNeuralNetwork(initial_trust_radius=0.5)
    manager.auxiliary_nn = fresh
    assert manager.optimizer.aux_net is fresh
    metrics = run(manager, model, data, targets, steps=1)
    assert metrics["trust_radius"] == pytest.approx(0.5, rel=1e-2)


def test_manager_errors_are_clear():
    manager, model, data, targets = setup()
    with pytest.raises(RuntimeError, match="setup_data_clustering"):
        manager.get_cluster_batch(data, 4, 0)
    with pytest.raises(ValueError, match="data_clusters=3 is larger"):
        manager.setup_data_clustering(data[:2])
    manager.setup_data_clustering(data)
    with pytest.raises(ValueError, match="samples"):
        manager.get_cluster_batch(data[:10], 4, 0)
    with pytest.raises(TypeError, match="HybridTrainingConfig"):
        HybridOptimizationManager({"data_clusters": 3})
