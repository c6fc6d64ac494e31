"""HybridOptimizer keeps torch's optimizer contract (issue 9), tested the way PyTorch tests its own optimizers:
LR schedulers, step hooks, state_dict / deepcopy / pickle round trips, non-contiguous parameters, param groups,
zero_grad, bad hyper-parameters. Plus issue 13's root cause: a 2-bit layer's clipping ratio follows every writer."""
import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler

from hybrid_optimization import AuxiliaryNeuralNetwork, HybridOptimizer
from hybrid_optimization.quantization import QuantLinear, fake_quantize, search_clip_ratio

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def regression(seed=0, n=256, d=8):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    return X, X @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)


def mlp(seed=0, d=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1))


def hybrid(params, **kwargs):
    kwargs = {"lr": 1e-2, "aux_net": AuxiliaryNeuralNetwork(), "trust_region": "absolute", "trust_radius": 0.05,
              **kwargs}
    return HybridOptimizer(params, **kwargs)


def loss_of(model, X, y):
    return ((model(X) - y) ** 2).mean()


def train_steps(model, opt, X, y, steps, scheduler=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lrs = []
    for _ in range(steps):
        idx = torch.randint(0, len(X), (32,), generator=g)
        opt.zero_grad()
        loss = loss_of(model, X[idx], y[idx])
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(loss=loss) if isinstance(opt, HybridOptimizer) else opt.step()
        if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
            with torch.no_grad():
                scheduler.step(float(loss_of(model, X, y)))
        elif scheduler is not None:
            scheduler.step()
    return lrs


# -- LR schedulers ----------------------------------------------------------------------------------------------------
SCHEDULERS = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=10, gamma=0.5),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=40),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=40),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2, threshold=0.2),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers_drive_the_lr_and_training_descends(name):
    X, y = regression()
    model, twin = mlp(), mlp()
    opt = hybrid(model.parameters())
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    lrs = train_steps(model, opt, X, y, 40, SCHEDULERS[name](opt))
    if name != "ReduceLROnPlateau":      # the same schedule as on torch's own AdamW
        assert lrs == pytest.approx(train_steps(twin, reference, X, y, 40, SCHEDULERS[name](reference)))
    assert len(set(lrs)) > 1
    assert opt.last_info.learning_rate == pytest.approx(lrs[-1] * opt.last_info.lr_multiplier)
    with torch.no_grad():
        assert float(loss_of(model, X, y)) < 0.9 * float(loss_of(mlp(), X, y))


def test_one_cycle_momentum_reaches_the_update():
    w = nn.Parameter(torch.ones(4))
    opt = HybridOptimizer([w], lr=1e-2, trust_region=None)
    lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)      # cycles betas[0] from 0.95
    w.grad = torch.ones(4)
    opt.step()
    assert torch.allclose(opt.state[w]["exp_avg"], torch.full((4,), 1 - opt.param_groups[0]["betas"][0]))


# -- hooks ------------------------------------------------------------------------------------------------------------
def test_step_pre_and_post_hooks_fire_in_order_and_pre_hooks_may_change_arguments():
    X, y = regression()
    model = mlp()
    opt = hybrid(model.parameters())
    events = []

    def pre(optimizer, args, kwargs):
        events.append(("pre", float(model[0].weight.sum())))
        return args, {**kwargs, "cluster_id": 3}

    def post(optimizer, args, kwargs):
        events.append(("post", float(model[0].weight.sum()), kwargs["cluster_id"]))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    train_steps(model, opt, X, y, 2)
    assert [e[0] for e in events] == ["pre", "post", "pre", "post"]
    assert events[0][1] != events[1][1] and events[1][2] == 3          # post sees the moved weights
    assert opt.controller.tracker.step == 2
    for h in handles:
        h.remove()
    train_steps(model, opt, X, y, 1)
    assert len(events) == 4


def test_step_with_a_closure_returns_its_loss():
    X, y = regression()
    model = mlp()
    opt = hybrid(model.parameters())

    def closure():
        opt.zero_grad()
        loss = loss_of(model, X, y)
        loss.backward()
        return loss

    returned = opt.step(closure)
    assert isinstance(returned, torch.Tensor) and opt.last_info.step == 1
    assert opt.step(loss=1.5) == 1.5


# -- state_dict, deepcopy, pickle -------------------------------------------------------------------------------------
def same_info(a, b) -> bool:
    """StepInfo equality where NaN equals NaN (a step whose every tensor was cut has no hypergradient: NaN)."""
    return all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
               for x, y in zip(a.as_dict().values(), b.as_dict().values()))


def _trained_pair(**kwargs):
    X, y = regression()
    model = mlp()
    opt = hybrid(model.parameters(), **kwargs)
    train_steps(model, opt, X, y, 10)
    return model, opt, X, y


def _continue(model, opt, X, y):
    train_steps(model, opt, X, y, 10, seed=7)
    return [p.detach().clone() for p in model.parameters()], opt.last_info


@pytest.mark.parametrize("trust_region", ["absolute", "relative", "bounded", "rms"])
def test_deepcopy_continues_identically(trust_region):
    model, opt, X, y = _trained_pair(trust_region=trust_region)
    model2, opt2 = copy.deepcopy((model, opt))        # defect 1: the copy lost aux_net, controller, ... on main
    (w1, info1), (w2, info2) = _continue(model, opt, X, y), _continue(model2, opt2, X, y)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2)) and same_info(info1, info2)
    assert opt2.aux_net is not opt.aux_net


def test_pickle_continues_identically():
    model, opt, X, y = _trained_pair()
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    (w1, info1), (w2, info2) = _continue(model, opt, X, y), _continue(model2, opt2, X, y)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2)) and same_info(info1, info2)


def test_state_dict_round_trip_through_weights_only_load():
    model, opt, X, y = _trained_pair(warmup_steps=3, decay_steps=50, trust_region="relative")
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["param_groups"][0]["trust_region"] == "relative"     # settings travel with it
    assert saved["opt"]["param_groups"][0]["decay_steps"] == 50
    assert saved["opt"]["hybrid"]["aux_net"]["weights"]                      # and the aux net's weights
    model2 = mlp(seed=5)
    model2.load_state_dict(saved["model"])
    opt2 = HybridOptimizer(model2.parameters(), aux_net=AuxiliaryNeuralNetwork())   # defaults: the load sets them
    opt2.load_state_dict(saved["opt"])
    (w1, info1), (w2, info2) = _continue(model, opt, X, y), _continue(model2, opt2, X, y)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2)) and same_info(info1, info2)
    for k, v in opt.aux_net.state_dict().items():
        assert torch.equal(v, opt2.aux_net.state_dict()[k])


# -- non-contiguous parameters (defect 2) -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("trust_region", [None, "absolute", "relative", "bounded", "rms"])
def test_non_contiguous_parameter_follows_its_contiguous_copy(dtype, trust_region):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 5, 2, generator=g, dtype=dtype)
    w = big[..., 0].requires_grad_()                   # a view: strides (10, 2)
    assert not w.is_contiguous()
    w_c = w.detach().clone().requires_grad_()
    b, b_c = (torch.zeros(6, dtype=dtype, requires_grad=True) for _ in range(2))
    x, target = torch.randn(5, 32, generator=g, dtype=dtype), torch.randn(6, 32, generator=g, dtype=dtype)
    aux, kwargs = AuxiliaryNeuralNetwork(), dict(lr=5e-2, trust_region=trust_region, trust_radius=0.5)
    opts = (HybridOptimizer([w, b], aux_net=copy.deepcopy(aux), **kwargs),
            HybridOptimizer([w_c, b_c], aux_net=copy.deepcopy(aux), **kwargs))
    losses = []
    for _ in range(200):
        for (weight, bias), opt in zip(((w, b), (w_c, b_c)), opts):
            opt.zero_grad()
            # .contiguous(): the same forward arithmetic for both, so any difference is the optimizer's
            loss = ((weight.contiguous() @ x + bias[:, None] - target) ** 2).mean()
            loss.backward()
            opt.step(loss=loss)
        losses.append(float(loss))
    assert torch.equal(w.detach(), w_c.detach())
    assert torch.equal(big[..., 0], w.detach())        # the update went into the viewed storage
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("trust_region", [None, "absolute"])
def test_every_step_bumps_the_parameters_version_counter(trust_region):
    model = mlp()
    opt = hybrid(model.parameters(), trust_region=trust_region)   # (torch's fused kernel does not bump it)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    versions = [p._version for p in model.parameters()]
    opt.step(loss=1.0)
    assert all(p._version > v for p, v in zip(model.parameters(), versions))


@pytest.mark.parametrize("trust_region", [None, "absolute", "relative"])
def test_fused_foreach_and_for_loop_paths_agree(trust_region):
    X, y = regression()
    results = []
    for flags in (dict(fused=None), dict(fused=False), dict(fused=False, foreach=False)):
        model = mlp()
        opt = hybrid(model.parameters(), trust_region=trust_region, weight_decay=0.01, **flags)
        train_steps(model, opt, X, y, 15)
        results.append([p.detach() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(results[0], other))


def test_a_skipped_step_leaves_the_moments_alone():
    model = mlp()
    opt = hybrid(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step(loss=1.0)
    moments = {id(p): {k: v.clone() for k, v in state.items() if torch.is_tensor(v)} for p, state in opt.state.items()}
    model[0].weight.grad[0, 0] = float("nan")
    opt.step(loss=1.0)
    assert opt.last_info.skipped
    for p, state in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], moments[id(p)][key])


# -- param groups, zero_grad, bad hyper-parameters --------------------------------------------------------------------
def test_per_group_lrs_follow_torch_adamw():
    X, y = regression()
    model, twin = mlp(), mlp()

    def groups(m):
        return [{"params": m[0].parameters(), "lr": 3e-2}, {"params": m[2].parameters()}]

    opt = HybridOptimizer(groups(model), lr=1e-3, weight_decay=0.01, trust_region=None,
                          aux_net=AuxiliaryNeuralNetwork(), meta_learning=False)
    train_steps(model, opt, X, y, 20)
    train_steps(twin, torch.optim.AdamW(groups(twin), lr=1e-3, weight_decay=0.01), X, y, 20)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_add_param_group():
    X, y = regression()
    model = mlp()
    opt = hybrid(model[0].parameters())
    train_steps(model, opt, X, y, 3)
    head = model[2].weight.detach().clone()
    opt.add_param_group({"params": model[2].parameters(), "lr": 1e-3})
    assert opt.param_groups[1]["trust_region"] == "absolute" and opt.param_groups[1]["lr"] == 1e-3
    train_steps(model, opt, X, y, 3)
    assert not torch.equal(head, model[2].weight)
    with pytest.raises(ValueError, match="trust_region is a setting of the whole optimizer"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "trust_region": None})
    with pytest.raises(ValueError, match="lr must be"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": -1.0})
    assert len(opt.param_groups) == 2


def test_zero_grad():
    model = mlp()
    opt = hybrid(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr must be"), (dict(lr=float("nan")), "lr must be"), (dict(lr="abc"), "lr must be"),
    (dict(betas=(1.0, 0.999)), "betas"), (dict(betas=(0.9,)), "betas"), (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(momentum=-0.5), "momentum"),
    (dict(trust_radius=0.0), "trust_radius"), (dict(trust_radius=5.0), "trust_radius"),
    (dict(radius_range=(1.0, 0.1)), "radius_range"), (dict(meta_horizon=0), "meta_horizon"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(decay_steps=0), "decay_steps"),
    (dict(base="lion"), "base must be one of"), (dict(trust_region="global"), "trust_region"),
    (dict(rho_from="loss"), "rho_from"), (dict(aux_radius="both"), "aux_radius"),
    (dict(n_clusters=0), "n_clusters"), (dict(quantization_every=0), "quantization_every"),
    (dict(foreach=True, fused=True), "cannot be used together"), (dict(fused="yes"), "fused"),
])
def test_bad_hyper_parameters_are_a_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridOptimizer(mlp().parameters(), **kwargs)


def test_fused_true_refuses_what_the_fused_kernel_cannot_take():
    with pytest.raises(ValueError, match="fused=True"):
        HybridOptimizer([nn.Parameter(torch.ones(3, dtype=torch.complex64))], fused=True)


# -- issue 13: the 2-bit clipping ratio follows every writer ----------------------------------------------------------
WRITERS = {
    "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),     # does not bump _version
    "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "torch SGD": lambda ps: torch.optim.SGD(ps, lr=1e-1),
    "HybridOptimizer": lambda ps: HybridOptimizer(ps, lr=1e-2, aux_net=AuxiliaryNeuralNetwork()),
    ".data write": None,
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_two_bit_quantizer_follows_in_place_weight_updates_by_any_writer(writer):
    torch.manual_seed(0)
    layer = QuantLinear(64, 32, bits=2, scale_search_interval=1)    # the pipeline's setting
    x = torch.randn(16, 64)
    opt = WRITERS[writer](list(layer.parameters())) if WRITERS[writer] else None
    for _ in range(3):
        layer.zero_grad()
        layer(x).square().mean().backward()
        if opt is None:
            layer.weight.data.mul_(0.5).add_(0.01)                   # writes that no version counter sees
        else:
            opt.step()
        expected = fake_quantize(layer.weight, 2, clip_ratio=search_clip_ratio(layer.weight, 2))
        assert torch.equal(layer(x), F.linear(x, expected, layer.bias)), writer
