import math

import pytest
import torch

from hybrid_optimization import AuxiliaryNeuralNetwork, HybridTrainingConfig, HybridOptimizer, TrainingState
from hybrid_optimization.auxiliary_nn import features
from hybrid_optimization.state import FEATURE_NAMES, TrainingStateTracker


def random_states(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        r = torch.rand(6, generator=g)
        yield TrainingState(current_loss=float(10 * r[0]), gradient_magnitude=float(10 ** (-6 + 6 * r[1])),
                            cluster_id=int(8 * r[2]), loss_trend=float(0.5 + r[3]),
                            gradient_variance=float(10 ** (-8 + 6 * r[4])), step_number=int(1e5 * r[5]))


@pytest.mark.parametrize("radius", [0.001, 0.01, 0.05, 1.0])
def test_untrained_net_is_the_identity(radius):
    aux = AuxiliaryNeuralNetwork(initial_trust_radius=radius)
    for state in random_states():
        m, r = aux.predict(state)
        assert m == pytest.approx(1.0, abs=1e-6)
        assert r == pytest.approx(radius, rel=1e-5)


def test_outputs_stay_in_the_guide_ranges_whatever_the_weights():
    aux = AuxiliaryNeuralNetwork()
    for sign in (+1, -1):
        with torch.no_grad():
            aux.head.weight.fill_(50.0 * sign)
            aux.head.bias.fill_(50.0 * sign)
            aux.body[0].weight.fill_(1.0)
        for state in random_states(5):
            m, r = aux.predict(state)
            assert 0.1 - 1e-6 <= m <= 10 + 1e-5 and 0.001 - 1e-9 <= r <= 1.0 + 1e-6


def test_features_are_normalised_and_robust():
    state = TrainingState(current_loss=2.5, gradient_magnitude=0.1, cluster_id=0, loss_trend=0.98,
                          gradient_variance=0.01, step_number=100)
    f = features(state)
    assert f.shape == (6,) and len(FEATURE_NAMES) == 6
    assert f[0] == pytest.approx(math.log1p(2.5))
    assert f[1] == pytest.approx(-0.25)                      # log10(0.1) / 4
    assert f[3] == pytest.approx(10 * math.log(0.98))
    assert f[5] == pytest.approx(math.log10(101) / 2)
    assert f.abs().max() <= 5
    broken = features(TrainingState(float("nan"), float("inf"), 3, -1.0, float("nan"), 10 ** 9))
    assert torch.isfinite(broken).all() and broken.abs().max() <= 5


def test_hypergradient_feedback_moves_the_multiplier_in_the_right_direction():
    state = next(random_states(1))
    for sign, direction in ((+1.0, -1), (-1.0, +1)):
        aux = AuxiliaryNeuralNetwork()
        before = [p.detach().clone() for p in aux.parameters()]
        for _ in range(50):
            aux.update_with_feedback(state, hypergradient=sign)
        m = aux.predict_learning_rate(state)
        assert (m - 1.0) * direction > 0.05, (sign, m)
        assert any(not torch.equal(a, b) for a, b in zip(before, aux.parameters()))
        assert aux.meta_updates == 50


def test_trust_region_ratio_grows_or_shrinks_the_radius():
    state = next(random_states(1))
    shrink, grow, keep = AuxiliaryNeuralNetwork(), AuxiliaryNeuralNetwork(), AuxiliaryNeuralNetwork()
    for _ in range(100):
        shrink.update_with_feedback(state, rho=-0.5)                           # the loss rose
        grow.update_with_feedback(state, rho=1.0, constraint_active=True)      # accurate and bound
        keep.update_with_feedback(state, rho=0.5, constraint_active=True)      # in between: keep
    assert shrink.predict_trust_region(state) < 0.009
    assert grow.predict_trust_region(state) > 0.011
    assert keep.predict_trust_region(state) == pytest.approx(0.01, rel=1e-6)
    # rho from raw losses: the loss fell by more than predicted
    aux = AuxiliaryNeuralNetwork()
    out = aux.update_with_feedback(state, loss_before=2.0, loss_after=1.0, predicted_reduction=0.5,
                                   constraint_active=True)
    assert out["rho"] == pytest.approx(2.0) and out["radius_factor"] == 2.0


def test_config_sizes_and_learning_rate_are_honoured():
    config = HybridTrainingConfig(auxiliary_nn_hidden_size=32, auxiliary_nn_learning_rate=0.01,
                                  initial_trust_radius=0.05)
    opt = HybridOptimizer.from_config([torch.nn.Parameter(torch.ones(3))], config)
    aux = opt.aux_net
    assert aux.body[0].out_features == 32 and aux.head.in_features == 32
    assert aux.meta_optimizer.param_groups[0]["lr"] == 0.01
    assert aux.predict_trust_region(next(random_states(1))) == pytest.approx(0.05, rel=1e-5)
    # a larger meta learning rate moves further on the same feedback
    state = next(random_states(1))
    slow, fast = AuxiliaryNeuralNetwork(learning_rate=1e-3), AuxiliaryNeuralNetwork(learning_rate=1e-2)
    for _ in range(10):
        slow.update_with_feedback(state, hypergradient=-1.0)
        fast.update_with_feedback(state, hypergradient=-1.0)
    assert fast.predict_learning_rate(state) > slow.predict_learning_rate(state) > 1.0


def test_invalid_construction_is_clear():
    with pytest.raises(ValueError, match="input_size must be 6"):
        AuxiliaryNeuralNetwork(input_size=5)
    with pytest.raises(ValueError, match="hidden_size"):
        AuxiliaryNeuralNetwork(hidden_size=0)
    with pytest.raises(ValueError, match="initial_trust_radius"):
        AuxiliaryNeuralNetwork(initial_trust_radius=2.0)


def test_tracker_builds_trend_and_variance():
    tracker = TrainingStateTracker()
    for i in range(200):
        state = tracker.update(loss=10.0 / (1 + i), grad_norm=1.0 + (i % 2), cluster_id=i % 4, n_clusters=4)
    assert state.loss_trend < 1.0                       # the loss is falling
    assert state.gradient_variance == pytest.approx(0.25, rel=0.2)   # norms alternate 1, 2
    assert state.step_number == 199 and state.feature_values()[2] == pytest.approx(2 * 3 / 3 - 1)
