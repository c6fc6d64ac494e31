"""Per-layer sensitivity (quantization error, Hutchinson Hessian trace, Fisher) and the precision plan."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_optimization.precision import (PrecisionPlan, build_precision_plan, layer_sensitivity, plan_precision,
                                           precision_ladder)
from hybrid_optimization.quantization import QuantLinear, quantized_layers


def mse_loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use tiny tensors: one thread. With two OpenMP threads on a busy 2-core machine every small op
    waits for a core to wake the second thread (measured: the suite ran 10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- Hutchinson ------------------------------------------------------------------------------------------------------
def test_hutchinson_trace_matches_exact_hessian_trace_of_a_quadratic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    x = torch.randn(64, 5)
    y = torch.randn(64, 3)
    # MSE of a linear layer is quadratic in its weights: the Hessian is constant, compute it exactly
    weight = model[0].weight.detach().clone()
    exact = torch.autograd.functional.hessian(lambda w: F.mse_loss(x @ w.T, y), weight)
    exact_trace_per_param = exact.reshape(weight.numel(), weight.numel()).trace().item() / weight.numel()

    off_diagonal = exact.reshape(weight.numel(), -1).fill_diagonal_(0)
    assert off_diagonal.abs().max() > 0.05 * exact_trace_per_param   # a real test of the estimator, not a diagonal
    # var(vᵀHv) = 2 Σ_{i≠j} H_ij²: ~5% relative std per sample here, so 32 samples give ~1% and 5% is > 5 sigma
    rows = layer_sensitivity(model, mse_loss, [(x, y)], hutchinson_samples=32, layers=["0"])
    assert rows[0]["hessian_trace"] == pytest.approx(exact_trace_per_param, rel=0.05)
    assert rows[0]["curvature_source"] == "hutchinson"
    # several batches are averaged, not summed
    rows2 = layer_sensitivity(model, mse_loss, [(x, y), (x, y)], hutchinson_samples=16, layers=["0"], seed=1)
    assert rows2[0]["hessian_trace"] == pytest.approx(exact_trace_per_param, rel=0.05)


def test_fisher_is_mean_squared_gradient_and_features_are_complete():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    batches = [(torch.randn(16, 4), torch.randn(16, 2)) for _ in range(2)]
    rows = layer_sensitivity(model, mse_loss, batches, hutchinson_samples=2)
    assert [r["name"] for r in rows] == ["0", "2"]
    expected = 0.0
    for batch in batches:
        model.zero_grad()
        mse_loss(model, batch).backward()
        expected += model[0].weight.grad.square().mean().item() / len(batches)
    first = rows[0]
    assert first["fisher"] == pytest.approx(expected, rel=1e-5)
    assert first["n_params"] == 32 and first["module_type"] == "0"
    errors = [first[f"err_{b}"] for b in ("1", "1.58", "2", "4", "8")]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert first["sensitivity"] == pytest.approx(first["curvature"] * first["err_1"] ** 2 * first["weight_sq_norm"])
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_sensitivity_skips_embeddings_and_head_and_works_through_quantized_layers():
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.mlp = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 20)

        def forward(self, t):
            return self.lm_head(torch.tanh(self.mlp(self.embed(t))))

    model = LM()
    model.mlp = QuantLinear.from_linear(model.mlp, 1.58)
    tokens = torch.randint(0, 20, (4, 6))
    rows = layer_sensitivity(model, lambda m, t: F.cross_entropy(m(t).flatten(0, 1), t.flatten()), [tokens],
                             hutchinson_samples=2)
    assert [r["name"] for r in rows] == ["mlp"]
    assert rows[0]["fisher"] > 0 and rows[0]["sensitivity"] > 0


def test_sensitivity_works_with_fused_attention_models():
    """scaled_dot_product_attention's fused kernels have no double backward; layer_sensitivity must still work."""
    torch.manual_seed(0)

    class Attention(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x):
            q, k, v = (p(x).unflatten(-1, (2, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)

    model = Attention()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    rows = layer_sensitivity(model, mse_loss, [(x, y)], hutchinson_samples=2)
    assert [r["name"] for r in rows] == ["q_proj", "k_proj", "v_proj"]
    assert all(r["fisher"] > 0 for r in rows)


# -- the plan --------------------------------------------------------------------------------------------------------
def _features(sensitivities, n_params=1000):
    return [{"name": f"layer{i}", "n_params": n_params, "sensitivity": s, "hessian_trace": s, "fisher": s / 10,
             "err_1": 0.6, "err_1.58": 0.5, "err_2": 0.38, "err_4": 0.1, "err_8": 0.008}
            for i, s in enumerate(sensitivities)]


def test_plan_gives_the_guide_ladder_to_four_sensitivity_groups():
    features = _features([1e3, 1.2e3, 1.0, 1.1, 1.3, 1e-3, 1.1e-3, 1e-6, 1.2e-6])
    plan = plan_precision(features, n_clusters=4)
    bits = plan.bit_map()
    assert bits["layer0"] == bits["layer1"] == 2                          # most sensitive group: 2 bits
    assert bits["layer2"] == bits["layer3"] == bits["layer4"] == 1.58
    assert bits["layer5"] == bits["layer6"] == 1.58
    assert bits["layer7"] == bits["layer8"] == 1                          # least sensitive: 1 bit
    assert plan.cluster_bits == {0: 2.0, 1: 1.58, 2: 1.58, 3: 1.0}
    assert plan.layers["layer0"]["cluster"] == 0 and plan.layers["layer8"]["cluster"] == 3
    assert plan.avg_bits == pytest.approx((2 * 2 + 5 * 1.58 + 2 * 1) / 9)


def test_plan_on_a_real_model_gives_more_bits_to_the_more_sensitive_layers():
    torch.manual_seed(0)

    class Branches(nn.Module):
        """Four parallel branches; the first one's output is amplified, so the loss is most sensitive to it."""

        def __init__(self):
            super().__init__()
            self.loud = nn.Linear(16, 4)
            self.quiet = nn.ModuleList([nn.Linear(16, 4) for _ in range(3)])

        def forward(self, x):
            return 8 * self.loud(x) + sum(0.1 * q(x) for q in self.quiet)

    model = Branches()
    batches = [(torch.randn(64, 16), torch.randn(64, 4)) for _ in range(2)]
    plan = build_precision_plan(model, mse_loss, batches, n_clusters=2, hutchinson_samples=4)
    bits = plan.bit_map()
    assert bits["loud"] == 2 and all(bits[f"quiet.{i}"] == 1.58 for i in range(3))
    assert plan.layers["loud"]["sensitivity"] > 100 * plan.layers["quiet.0"]["sensitivity"]
    applied = plan.apply(model)
    assert applied == bits and isinstance(model.loud, QuantLinear) and model.loud.bits == 2
    assert set(quantized_layers(model)) == set(bits)


def test_budget_is_respected_and_keeps_bits_where_they_matter():
    features = _features([1e3, 1.2e3, 1.0, 1.1, 1.3, 1e-3, 1.1e-3, 1e-6, 1.2e-6])
    unconstrained = plan_precision(features)
    for budget in (1.0, 1.2, 1.4):
        plan = plan_precision(features, budget=budget)
        assert plan.avg_bits <= budget + 1e-9
        assert plan.budget == budget
        bits = plan.bit_map()
        # demotion only: no layer above its group's bits, and sensitive layers keep at least the others' bits
        assert all(bits[n] <= unconstrained.bit_map()[n] for n in bits)
        assert min(bits["layer0"], bits["layer1"]) >= max(bits["layer7"], bits["layer8"])
    assert plan_precision(features, budget=1.0).avg_bits == 1.0
    assert plan_precision(features, budget=1.4).avg_bits > 1.3   # promotion fills the budget again
    generous = plan_precision(features, budget=8)
    assert generous.bit_map() == unconstrained.bit_map()


def test_budget_respects_parameter_counts():
    features = _features([1e3, 1.0, 1e-3, 1e-6])
    features[0]["n_params"] = 100_000   # one huge sensitive layer
    plan = plan_precision(features, budget=1.5)
    assert plan.avg_bits <= 1.5
    total = sum(f["n_params"] for f in features)
    assert plan.avg_bits == pytest.approx(sum(plan.bit_map()[f["name"]] * f["n_params"] for f in features) / total)


def test_json_round_trip_records_and_file(tmp_path):
    plan = plan_precision(_features([1e3, 1.0, 1e-3, 1e-6, 2e-6]), budget=1.5)
    again = PrecisionPlan.from_json(plan.to_json())
    assert again.bit_map() == plan.bit_map() and again.cluster_bits == plan.cluster_bits
    assert again.budget == 1.5 and again.avg_bits == pytest.approx(plan.avg_bits)
    assert again.layers == plan.layers
    plan.save(tmp_path / "plans" / "plan.json")
    loaded = PrecisionPlan.load(tmp_path / "plans" / "plan.json")
    assert loaded.to_json() == plan.to_json()
    json.loads(plan.to_json())   # strict JSON (no NaN)
    assert len(plan.layers) == 5
    assert {"bits", "cluster", "sensitivity", "err_1.58"} <= set(next(iter(plan.layers.values())))


def test_invalid_inputs_give_clear_errors():
    features = _features([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="bits 3 is invalid: it must be one of 1, 1.58, 2, 4, 8"):
        plan_precision(features, n_clusters=2, precisions=(2, 3))
    with pytest.raises(ValueError, match="precisions has 3 bit-width.* n_clusters=4"):
        plan_precision(features, precisions=(2, 1.58, 1))
    with pytest.raises(ValueError, match="budget=0.5 average bits is below 1"):
        plan_precision(features, budget=0.5)
    with pytest.raises(ValueError, match="n_clusters must be an integer ≥ 1"):
        plan_precision(features, n_clusters=0)
    with pytest.raises(ValueError, match="no layer features"):
        plan_precision([])
    with pytest.raises(ValueError, match="not a precision plan"):
        PrecisionPlan.from_json('{"layers": 3}')
    with pytest.raises(ValueError, match="not valid JSON"):
        PrecisionPlan.from_json("{")
    model = nn.Sequential(nn.Linear(4, 4))
    batch = (torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="bits 3 is invalid"):
        layer_sensitivity(model, mse_loss, [batch], candidate_bits=(1, 3))
    with pytest.raises(ValueError, match="batches is empty"):
        layer_sensitivity(model, mse_loss, [])
    with pytest.raises(ValueError, match="not nn.Linear modules"):
        layer_sensitivity(model, mse_loss, [batch], layers=["nope"])


def test_fewer_layers_than_clusters_and_ladders():
    plan = plan_precision(_features([10.0, 1e-4]), n_clusters=4)
    assert plan.bit_map() == {"layer0": 2.0, "layer1": 1.0}   # the ends of (2, 1.58, 1.58, 1)
    assert precision_ladder(4) == (2.0, 1.58, 1.58, 1.0)
    assert len(precision_ladder(12)) == 12 and precision_ladder(12)[0] == 8.0 and precision_ladder(12)[-1] == 1.0
    same = plan_precision(_features([1.0, 1.0, 1.0]), n_clusters=4)   # identical layers: one group
    assert set(same.bit_map().values()) == {1.58}   # nothing to rank: the middle of the ladder
