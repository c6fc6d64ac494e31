"""The student model, the distillation loss, evaluation and export of the quantized student."""
import math

import pytest
import torch
import torch.nn.functional as F

from hybrid_optimization.distill.evaluate import evaluate, full_precision
from hybrid_optimization.distill.export import export_student, load_exported_student
from hybrid_optimization.distill.losses import distillation_loss, topk_kl
from hybrid_optimization.distill.student import StudentConfig, StudentLM, apply_rotary, rotary_tables
from hybrid_optimization.quantization import QuantLinear, quantize_model, quantized_layers


def small_student(vocab=50, **kw):
    torch.manual_seed(0)
    return StudentLM(StudentConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, **kw))


def test_student_is_causal_and_shaped_like_a_llama():
    model = small_student()
    ids = torch.randint(0, 50, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 50)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])   # the future cannot leak into the past
    assert not torch.allclose(model(changed)[:, 7:], logits[:, 7:])
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "layers.0.attn.q_proj" in names and "layers.1.mlp.down_proj" in names and "lm_head" in names
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_rotary_rotation_preserves_norms_and_encodes_relative_position():
    cos, sin = rotary_tables(8, 16, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    rot = lambda x, p: apply_rotary(x, cos[p], sin[p])
    torch.testing.assert_close(rot(q, 5).norm(), q.norm())
    # <R_m q, R_n k> depends only on m - n
    torch.testing.assert_close(rot(q, 7) @ rot(k, 3), rot(q, 10) @ rot(k, 6), rtol=1e-5, atol=1e-5)


def test_quantization_keeps_embeddings_and_head_full_precision():
    model = small_student()
    bit_map = quantize_model(model, 1.58)
    assert bit_map["lm_head"] == 32 and bit_map["layers.0.attn.q_proj"] == 1.58
    assert len(quantized_layers(model)) == 2 * 7
    assert isinstance(model.layers[0].mlp.up_proj, QuantLinear)


def test_distillation_loss_parts():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 20, requires_grad=True)
    targets = torch.randint(0, 20, (2, 5))
    top = logits.detach().topk(20, dim=-1)             # k = V: the teacher equals the student
    loss, parts = distillation_loss(logits, targets, top.values, top.indices, alpha=0.3, temperature=2.0)
    assert parts["kl"].abs() < 1e-6
    torch.testing.assert_close(loss, 0.3 * F.cross_entropy(logits.reshape(-1, 20), targets.reshape(-1)))
    loss.backward()
    assert logits.grad.abs().sum() > 0
    ce_only, _ = distillation_loss(logits, targets, top.values, top.indices, alpha=1.0)
    torch.testing.assert_close(ce_only, parts["ce"])
    other = torch.randn(2, 5, 20).topk(4, dim=-1)
    kl = topk_kl(logits.detach(), other.values, other.indices, 1.0)
    assert kl > 0
    # the T² factor: loss = α·CE + (1-α)·T²·KL
    loss2, parts2 = distillation_loss(logits.detach(), targets, other.values, other.indices, 0.5, 3.0)
    torch.testing.assert_close(loss2, 0.5 * parts2["ce"] + 0.5 * 9.0 * parts2["kl"])


def test_evaluate_reports_quantization_diff_and_cluster_losses():
    model = small_student()
    windows = torch.randint(0, 50, (6, 9))
    with torch.no_grad():
        top = model(windows[:, :-1]).topk(50, dim=-1)     # k = V: the teacher is this model
    clusters = torch.tensor([0, 0, 1, 1, 1, 2])
    fp = evaluate(model, windows, top.values, top.indices, clusters)
    assert fp["qdiff_max"] == 0 and fp["kl_teacher"] < 1e-5 and fp["top1_agreement"] == 1.0
    assert math.isclose(fp["val_ppl"], math.exp(fp["val_loss"]), rel_tol=1e-9)
    weighted = (2 * fp["val_loss_cluster_0"] + 3 * fp["val_loss_cluster_1"] + fp["val_loss_cluster_2"]) / 6
    assert math.isclose(weighted, fp["val_loss"], rel_tol=1e-6)
    quantize_model(model, 1.58)
    q = evaluate(model, windows, top.values, top.indices, clusters)
    assert q["qdiff_max"] > q["qdiff_mean"] > 0
    assert math.isclose(q["val_loss_fp"], fp["val_loss"], rel_tol=1e-5)   # latent weights = the fp model
    with full_precision(model):
        assert not quantized_layers(model)
    assert len(quantized_layers(model)) == 14


def test_export_reloads_the_exact_quantized_student(tmp_path):
    model = small_student()
    quantize_model(model, {"*": 1.58, "layers.0.mlp.down_proj": 2})
    vocab = torch.arange(100, 150)
    report, manifest = export_student(model, tmp_path / "student.safetensors", vocab, extra={"preset": "test"})
    assert manifest.is_file() and report.compression_vs_fp32_linear > 10
    loaded, meta = load_exported_student(tmp_path / "student.safetensors")
    assert meta["vocab"] == vocab.tolist() and meta["preset"] == "test"
    ids = torch.randint(0, 50, (3, 12))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
