"""Quantizers, straight-through estimator, QuantLinear, model conversion and quantization metrics."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_optimization.quantization import (CodeFlipTracker, QuantLinear, code_flip_rate, code_range,
                                              fake_quantize, layer_quantization_report, normalize_bits,
                                              quantize_activations, quantize_model, quantize_weight,
                                              quantized_layers, relative_quantization_error, search_clip_ratio,
                                              ternary_code_distribution)

ALL_BITS = (1, 1.58, 2, 4, 8)
ALLOWED_CODES = {1: {-1, 1}, 1.58: {-1, 0, 1}, 2: set(range(-2, 2)), 4: set(range(-8, 8)), 8: set(range(-128, 128))}


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use tiny tensors: one thread. With two OpenMP threads on a busy 2-core machine every small op
    waits for a core to wake the second thread (measured: the suite ran 10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def heavy_tailed(rows=48, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[0, 0], w[1, 5], w[3, 7] = 9.0, -7.5, 0.0   # outliers and an exact zero
    return w


# -- bit-widths ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given,expected", [(1, 1.0), (1.58, 1.58), (1.585, 1.58), (math.log2(3), 1.58), (1.6, 1.58),
                                            ("ternary", 1.58), (2, 2.0), ("4", 4.0), (8.0, 8.0), (16, 16.0),
                                            (32, 32.0)])
def test_normalize_bits_accepts_supported_forms(given, expected):
    assert normalize_bits(given) == expected


@pytest.mark.parametrize("bad", [3, 0, 1.7, 5, 64, "int3", None, True, float("nan")])
def test_normalize_bits_rejects_unsupported_with_clear_message(bad):
    with pytest.raises(ValueError, match=r"bits .* is invalid: it must be one of 1, 1.58, 2, 4, 8"):
        normalize_bits(bad)


# -- hand-worked examples --------------------------------------------------------------------------------------------
def test_ternary_hand_worked_matrix():
    w = torch.tensor([[0.9, -0.2, 0.05, -1.3],
                      [0.3, -0.6, 0.65, 0.0]])
    # mean|W| = (0.9 + 0.2 + 0.05 + 1.3 + 0.3 + 0.6 + 0.65 + 0) / 8 = 4.0 / 8 = 0.5
    # W / 0.5 = [[1.8, -0.4, 0.1, -2.6], [0.6, -1.2, 1.3, 0]] -> round -> [[2, 0, 0, -3], [1, -1, 1, 0]] -> clip
    q = quantize_weight(w, 1.58)
    assert q.scale.shape == (1, 1) and q.scale.item() == 0.5
    assert q.codes.dtype == torch.int8
    assert q.codes.tolist() == [[1, 0, 0, -1], [1, -1, 1, 0]]
    assert q.dequantize().tolist() == [[0.5, 0.0, 0.0, -0.5], [0.5, -0.5, 0.5, 0.0]]
    assert ternary_code_distribution(q.codes) == {"neg": 2 / 8, "zero": 3 / 8, "pos": 3 / 8}


def test_one_bit_hand_worked_matrix():
    w = torch.tensor([[0.5, -1.5, 0.0, 1.0],
                      [-0.25, 0.25, -0.75, 0.75]])
    # sign with sign(0) = +1; per-row mean|W|: (0.5 + 1.5 + 0 + 1) / 4 = 0.75 and (0.25 * 2 + 0.75 * 2) / 4 = 0.5
    q = quantize_weight(w, 1)
    assert q.codes.tolist() == [[1, -1, 1, 1], [-1, 1, -1, 1]]
    assert q.scale.squeeze(1).tolist() == [0.75, 0.5]
    assert q.dequantize().tolist() == [[0.75, -0.75, 0.75, 0.75], [-0.5, 0.5, -0.5, 0.5]]


def test_ternary_scale_factor_and_zero_weight_floor():
    w = torch.tensor([[0.9, -0.2, 0.05, -1.3], [0.3, -0.6, 0.65, 0.0]])
    assert quantize_weight(w, 1.58, scale_factor=2.0).scale.item() == 1.0   # quantizer_scale multiplies the scale
    zero = quantize_weight(torch.zeros(3, 4), 1.58)
    assert zero.codes.abs().sum() == 0 and torch.isfinite(zero.dequantize()).all()
    assert zero.scale.item() == pytest.approx(1e-5, rel=5e-3)   # BitNet floor, rounded to fp16


# -- fake quantization and STE ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_is_bit_exact_quantize_dequantize(bits, group_size, dtype):
    w = heavy_tailed().to(dtype).requires_grad_(True)
    expected = quantize_weight(w, bits, group_size, scale_factor=0.9).dequantize()
    assert expected.dtype == dtype
    assert torch.equal(fake_quantize(w, bits, group_size, scale_factor=0.9), expected)   # autograd path
    with torch.no_grad():
        assert torch.equal(fake_quantize(w, bits, group_size, scale_factor=0.9), expected)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_ste_passes_gradient_unchanged(bits):
    w = heavy_tailed().requires_grad_(True)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    fake_quantize(w, bits).backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_activation_quant_ste_and_per_token_int8():
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    y = quantize_activations(x, 8)
    scale = 127 / x.detach().abs().amax(dim=-1, keepdim=True)
    assert torch.equal(y.detach(), (x.detach() * scale).round().clamp(-128, 127) / scale)
    levels = (y.detach() * scale).round()
    assert levels.abs().max() <= 127 and torch.allclose(levels, y.detach() * scale, atol=1e-3)
    assert ((y - x).abs() <= 0.5 / scale + 1e-6).all()
    upstream = torch.randn_like(x)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)
    with pytest.raises(ValueError, match="act_bits"):
        quantize_activations(x, 16)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", [None, 8])
def test_codes_stay_in_allowed_set(bits, group_size):
    q = quantize_weight(heavy_tailed(), bits, group_size)
    assert set(q.codes.unique().tolist()) <= ALLOWED_CODES[bits]
    assert code_range(bits) == (min(ALLOWED_CODES[bits]), max(ALLOWED_CODES[bits]))
    if bits >= 2:   # the MSE scale uses the range: the most negative code is reachable at low bits
        assert len(set(q.codes.unique().tolist())) > 2


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_scale_is_no_worse_than_plain_absmax_per_channel(bits):
    w = heavy_tailed(seed=3)
    q = quantize_weight(w, bits).dequantize()
    hi = 2 ** (bits - 1) - 1
    absmax_scale = (w.abs().amax(dim=1, keepdim=True) / hi).half().float()   # scales are stored in fp16
    plain = (w / absmax_scale).round().clamp(-hi - 1, hi) * absmax_scale
    assert ((w - q).square().sum(1) <= (w - plain).square().sum(1) * (1 + 1e-6)).all()
    assert (w - q).square().sum() < (w - plain).square().sum()


@pytest.mark.parametrize("bits,group_size", [(2, None), (4, 16), (8, None)])
def test_cached_clip_ratio_reproduces_the_searched_scale_exactly(bits, group_size):
    w = heavy_tailed(seed=5)
    ratio = search_clip_ratio(w, bits, group_size)
    assert ratio.shape == quantize_weight(w, bits, group_size).scale.shape
    assert ((ratio > 0.05) & (ratio < 1.5)).all()   # the least-squares refit may go a little past absmax
    searched, cached = quantize_weight(w, bits, group_size), quantize_weight(w, bits, group_size, clip_ratio=ratio)
    assert torch.equal(searched.scale, cached.scale) and torch.equal(searched.codes, cached.codes)


def test_quant_linear_searches_k_bit_clipping_every_interval_in_training_and_always_in_eval():
    torch.manual_seed(0)
    layer = QuantLinear(64, 32, bits=2, scale_search_interval=3)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(8, 64)
    layer(x).sum().backward()
    first = layer.clip_ratio
    assert first is not None
    for _ in range(2):   # weights change every step; the ratio is reused until 3 forwards have passed
        opt.step()
        expected = F.linear(x, layer.quantized_weight().dequantize(), layer.bias)   # what the next forward computes
        assert torch.equal(layer(x), expected)
        assert layer.clip_ratio is first
    opt.step()
    layer(x)
    assert layer.clip_ratio is not first   # searched again
    layer.eval()
    with torch.no_grad():
        layer.weight.mul_(1.5)   # in eval every forward searches on the current weights
    expected = fake_quantize(layer.weight, 2, clip_ratio=search_clip_ratio(layer.weight, 2))
    assert torch.equal(layer(x), F.linear(x, expected, layer.bias))
    with pytest.raises(ValueError, match="scale_search_interval"):
        QuantLinear(4, 4, bits=2, scale_search_interval=0)


def _errors(w):
    return [relative_quantization_error(w, b) for b in ALL_BITS]


def test_error_strictly_decreases_with_bits_on_gaussian():
    errors = _errors(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02


def test_error_strictly_decreases_with_bits_on_trained_matrix():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1))
    x = torch.randn(512, 32)
    y = torch.sin(x[:, :4].sum(1, keepdim=True))
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-2)
    first = None
    for _ in range(60):
        loss = F.mse_loss(mlp(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first   # it really trained
    errors = _errors(mlp[0].weight.detach())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_group_quantization_is_finer_than_per_channel():
    w = heavy_tailed(seed=4)
    for bits in (1.58, 2, 4):
        assert relative_quantization_error(w, bits, group_size=8) < relative_quantization_error(w, bits)
    with pytest.raises(ValueError, match="group_size=7 does not divide"):
        quantize_weight(w, 2, group_size=7)


def test_relative_error_zero_for_full_precision():
    assert relative_quantization_error(torch.randn(4, 4), 32) == 0.0


# -- QuantLinear -----------------------------------------------------------------------------------------------------
def test_quant_linear_forward_uses_exactly_the_quantized_weight():
    torch.manual_seed(0)
    layer = QuantLinear(32, 16, bits=2, group_size=8, act_bits=8)
    x = torch.randn(4, 32)
    q = layer.quantized_weight()
    expected = F.linear(quantize_activations(x, 8), q.dequantize(), layer.bias)
    assert torch.equal(layer(x), expected)
    assert "bits=2" in repr(layer) and "group_size=8" in repr(layer) and "act_bits=8" in repr(layer)


def test_quant_linear_weight_gradient_is_straight_through():
    torch.manual_seed(0)
    layer = QuantLinear(16, 8, bits=1.58)
    x = torch.randn(5, 16)
    layer(x).square().sum().backward()
    dq = layer.quantized_weight().dequantize().requires_grad_(True)
    F.linear(x, dq, layer.bias).square().sum().backward()
    assert torch.allclose(layer.weight.grad, dq.grad)


def test_layers_reading_the_same_input_share_its_activation_quantization():
    torch.manual_seed(0)
    q_proj, k_proj = QuantLinear(16, 8, act_bits=8), QuantLinear(16, 8, act_bits=8, bits=2)
    x = torch.randn(4, 16, requires_grad=True)
    (q_proj(x).sum() + 2 * k_proj(x).square().sum()).backward()
    shared_grad = x.grad.clone()
    x.grad = None
    reference = (F.linear(quantize_activations(x, 8), q_proj.quantized_weight().dequantize(), q_proj.bias).sum()
                 + 2 * F.linear(quantize_activations(x, 8), k_proj.quantized_weight().dequantize(),
                                k_proj.bias).square().sum())
    reference.backward()
    assert torch.equal(shared_grad, x.grad)
    with torch.no_grad():
        x.mul_(3)   # an in-place change must not reuse the old quantized input
        assert torch.equal(q_proj(x), F.linear(quantize_activations(x, 8), q_proj.quantized_weight().dequantize(),
                                               q_proj.bias))


def test_from_linear_shares_parameters_and_full_precision_is_passthrough():
    linear = nn.Linear(12, 6)
    opt = torch.optim.SGD(linear.parameters(), lr=0.1)
    q = QuantLinear.from_linear(linear, 1.58)
    assert q.weight is linear.weight and q.bias is linear.bias
    q(torch.randn(3, 12)).sum().backward()
    before = linear.weight.detach().clone()
    opt.step()   # the optimizer built before conversion still updates the layer's weight
    assert not torch.equal(before, q.weight.detach())
    q.bits = 32
    x = torch.randn(3, 12)
    assert torch.equal(q(x), linear(x))
    with pytest.raises(ValueError, match="bits 3 is invalid"):
        q.bits = 3


# -- model conversion ------------------------------------------------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(d, d), "up_proj": nn.Linear(d, 2 * d),
                                                    "down_proj": nn.Linear(2 * d, d)}) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed_tokens(tokens)
        for block in self.layers:
            h = h + block["q_proj"](h)
            h = h + block["down_proj"](F.silu(block["up_proj"](h)))
        return self.lm_head(h)


def test_quantize_model_keeps_embeddings_and_head_full_precision_by_default():
    model = TinyLM()
    bit_map = quantize_model(model, 1.58)
    assert isinstance(model.embed_tokens, nn.Embedding)
    assert type(model.lm_head) is nn.Linear and bit_map["lm_head"] == 32
    assert set(quantized_layers(model)) == {f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "up_proj",
                                                                                        "down_proj")}
    assert all(bit_map[name] == 1.58 for name in quantized_layers(model))
    model(torch.randint(0, 50, (2, 7))).sum().backward()


def test_quantize_model_with_bit_map_default_and_explicit_head():
    model = TinyLM()
    params_before = list(model.parameters())
    bit_map = quantize_model(model, {"layers.0.q_proj": 8, "lm_head": 4, "*": 2})
    assert bit_map["layers.0.q_proj"] == 8 and bit_map["lm_head"] == 4 and bit_map["layers.1.up_proj"] == 2
    assert all(a is b for a, b in zip(params_before, model.parameters()))
    # existing QuantLinear layers get their bits updated; layers not named stay as they are
    bit_map = quantize_model(model, {"layers.0.q_proj": 1})
    assert bit_map["layers.0.q_proj"] == 1 and bit_map["layers.1.up_proj"] == 2


def test_quantize_model_errors_are_clear():
    model = TinyLM()
    with pytest.raises(ValueError, match="not nn.Linear modules of the model: layers.9.q_proj"):
        quantize_model(model, {"layers.9.q_proj": 2})
    with pytest.raises(ValueError, match="bits 3 is invalid"):
        quantize_model(model, 3)
    with pytest.raises(ValueError, match="layer 'layers.0.q_proj': group_size=5 does not divide"):
        quantize_model(model, 2, group_size=5)


# -- metrics ---------------------------------------------------------------------------------------------------------
def test_code_flip_tracker_zero_when_unchanged_positive_after_big_update():
    torch.manual_seed(0)
    model = TinyLM()
    quantize_model(model, {"*": 1.58, "layers.0.up_proj": 2})
    tracker = CodeFlipTracker()
    assert set(tracker.update(model).values()) == {0.0}   # first call
    assert set(tracker.update(model).values()) == {0.0}   # weights unchanged
    with torch.no_grad():
        for layer in quantized_layers(model).values():
            layer.weight.add_(torch.randn_like(layer.weight) * layer.weight.abs().mean() * 3)
    rates = tracker.update(model)
    assert all(rate > 0.05 for rate in rates.values()), rates
    restored = CodeFlipTracker()
    restored.load_state_dict(tracker.state_dict())
    assert set(restored.update(model).values()) == {0.0}


def test_code_flip_rate_counts_changed_codes():
    a = torch.tensor([1, 0, -1, 1], dtype=torch.int8)
    assert code_flip_rate(a, torch.tensor([1, 1, -1, 0], dtype=torch.int8)) == 0.5
    with pytest.raises(ValueError, match="different shapes"):
        code_flip_rate(a, a[:2])


def test_layer_quantization_report_rows():
    torch.manual_seed(0)
    model = TinyLM()
    quantize_model(model, {"*": 1.58, "layers.1.down_proj": 4})
    rows = {row["name"]: row for row in layer_quantization_report(model)}
    assert len(rows) == 6
    ternary = rows["layers.0.q_proj"]
    assert ternary["bits"] == 1.58 and 0.3 < ternary["rel_error"] < 0.7
    assert ternary["rel_error"] == pytest.approx(relative_quantization_error(model.layers[0]["q_proj"].weight, 1.58))
    assert sum(ternary["code_distribution"].values()) == pytest.approx(1.0)
    assert rows["layers.1.down_proj"]["code_distribution"] is None and rows["layers.1.down_proj"]["rel_error"] < 0.2
    assert ternary["n_params"] == 32 * 32 and ternary["scale"] > 0
