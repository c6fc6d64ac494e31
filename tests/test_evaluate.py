"""The student's reference (issue 16): the teacher's own held-out cross-entropy on exactly the validation windows
the student is evaluated on — computed in the teacher's logits pass, cached with its logits, stored on the run at
set-up, and shown beside the student's loss in the summary with the gap between them."""
import math

import pytest
import torch
import torch.nn.functional as F

from hybrid_optimization.distill import TrainOptions, train
from hybrid_optimization.distill import teacher as teacher_module
from hybrid_optimization.distill.data import build_dataset, load_documents
from hybrid_optimization.distill.plan import plan_run
from hybrid_optimization.distill.setup import prepare_data, read_data
from hybrid_optimization.distill.teacher import load_teacher, teacher_topk_cache
from hybrid_optimization.distill.tiny import tiny_tokenizer
from hybrid_optimization.schema import RunSummary, render_summary
from hybrid_optimization.tracking import RunStore
from tests.test_distill_teacher import write_chats

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random LLaMA teacher saved as a Hugging Face directory, and chat data for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("reference-teacher")
    data = write_chats(folder / "chats.jsonl", n=80)
    tokenizer = tiny_tokenizer(load_documents(data), f"reference-{folder.name}", vocab_size=300, log=lambda m: None)
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model", data


def direct_teacher_loss(model_dir, dataset, windows: torch.Tensor) -> float:
    """The teacher's next-token cross-entropy over the student's vocabulary, computed here from scratch: the full
    logits of the HF model, restricted to the student's tokens, against the windows' next tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=dataset.vocab[windows[:, :-1]]).logits[..., dataset.vocab].double()
    return float(F.cross_entropy(logits.transpose(1, 2), windows[:, 1:].long()))


def no_teacher_pass(*args, **kwargs):
    raise AssertionError("the teacher ran again although its logits and held-out loss are cached")


def test_the_cached_teacher_loss_is_its_cross_entropy_on_the_asked_windows(tiny_llama, monkeypatch):
    model_dir, data = tiny_llama
    teacher = load_teacher(model_dir, log=lambda m: None)
    dataset = build_dataset(load_documents(data), teacher.tokenizer, seq_len=16)
    logits = teacher_topk_cache(teacher, dataset, k=5, log=lambda m: None)
    assert logits.val_ce is not None and logits.val_ce.shape == (len(dataset.val),)
    index = torch.tensor([0, 2, len(dataset.val) - 1])
    expected = direct_teacher_loss(model_dir, dataset, dataset.val.tokens[index])
    assert logits.val_loss(index) == pytest.approx(expected, rel=1e-5)
    assert logits.val_loss() == pytest.approx(direct_teacher_loss(model_dir, dataset, dataset.val.tokens), rel=1e-5)
    assert logits.val_loss(index) != pytest.approx(logits.val_loss(), rel=1e-6)     # the windows matter
    # From the cache: the same value, and the teacher does not run again.
    monkeypatch.setattr(teacher_module, "compute_topk", no_teacher_pass)
    again = teacher_topk_cache(teacher, dataset, k=5, log=lambda m: None)
    assert again.built_seconds == 0 and torch.equal(again.val_ce, logits.val_ce)


def test_a_cache_written_before_the_teacher_loss_gets_it_from_the_validation_windows_only(tiny_llama, monkeypatch):
    from safetensors.torch import load_file, save_file

    model_dir, data = tiny_llama
    teacher = load_teacher(model_dir, log=lambda m: None)
    dataset = build_dataset(load_documents(data), teacher.tokenizer, seq_len=16)
    fresh = teacher_topk_cache(teacher, dataset, k=4, log=lambda m: None)
    tensors = load_file(fresh.path)
    save_file({k: v for k, v in tensors.items() if k != "val_ce"}, str(fresh.path))     # an older cache entry
    computed, real = [], teacher_module.compute_topk
    monkeypatch.setattr(teacher_module, "compute_topk", lambda model, windows, *a, **kw: computed.append(
        len(windows)) or real(model, windows, *a, **kw))
    lines = []
    upgraded = teacher_topk_cache(teacher, dataset, k=4, log=lines.append)
    assert computed == [len(dataset.val)] and any("held-out loss" in line for line in lines)
    torch.testing.assert_close(upgraded.val_ce, fresh.val_ce)
    assert torch.equal(upgraded.train_values, fresh.train_values)
    assert torch.equal(load_file(fresh.path)["val_ce"], fresh.val_ce)          # written back: once only
    monkeypatch.setattr(teacher_module, "compute_topk", no_teacher_pass)
    assert teacher_topk_cache(teacher, dataset, k=4, log=lambda m: None).val_loss() == fresh.val_loss()


def test_prepare_data_gives_the_teacher_loss_on_exactly_the_evaluation_windows(tiny_llama):
    model_dir, data = tiny_llama
    plan = plan_run(TrainOptions(teacher=str(model_dir), data=str(data), seq_len=16, batch_size=4, max_steps=2,
                                 eval_windows=5, quiet=True, track=False))
    inputs = read_data(plan, say=lambda m: None)
    prepared = prepare_data(plan.for_data(len(inputs.dataset.train), inputs.dataset.train.n_available), inputs,
                            device=torch.device("cpu"), say=lambda m: None)
    assert len(prepared.eval_index) == 5 < len(prepared.dataset.val)
    windows = prepared.dataset.val.tokens[prepared.eval_index]
    assert prepared.teacher_val_loss == pytest.approx(direct_teacher_loss(model_dir, prepared.dataset, windows),
                                                      rel=1e-5)


def test_a_run_stores_the_teacher_loss_at_set_up_and_its_summary_shows_the_gap(tiny_llama, tmp_path, capsys,
                                                                                monkeypatch):
    model_dir, data = tiny_llama
    common = dict(teacher=str(model_dir), data=str(data), seq_len=16, batch_size=4, max_steps=3, eval_windows=10_000,
                  runs_root=str(tmp_path / "runs"))
    result = train(TrainOptions(**common))
    out = capsys.readouterr().out
    expected = direct_teacher_loss(model_dir, result.dataset, result.dataset.val.tokens)   # every val window
    summary = result.summary
    assert summary["teacher_val_loss"] == pytest.approx(expected, rel=1e-5)
    assert summary["teacher_gap"] == pytest.approx(summary["val_loss"] - summary["teacher_val_loss"], abs=1e-12)
    assert summary["teacher_gap_ratio"] == pytest.approx(summary["val_loss"] / summary["teacher_val_loss"])
    assert summary["kl_teacher"] == result.final_eval["kl_teacher"]
    store = RunStore(tmp_path / "runs", create=False)
    assert store.get_run(result.run_id)["teacher_val_loss"] == summary["teacher_val_loss"]
    assert store.teacher_val_losses([result.run_id]) == {result.run_id: summary["teacher_val_loss"]}
    assert [r["teacher_val_loss"] for r in store.list_runs()] == [summary["teacher_val_loss"]]
    assert f"Teacher held-out loss: {summary['teacher_val_loss']:.4f}" in out          # said at set-up, before training
    assert f"Teacher Held-out Loss: {summary['teacher_val_loss']:.6f}" in out
    assert f"Student Gap to Teacher: {summary['teacher_gap']:+.6f} nats" in out
    assert out.index("Teacher held-out loss:") < out.index("Teacher Held-out Loss:")
    assert (f"val_loss {summary['val_loss']:.4f} (ppl {summary['val_ppl']:.2f}) [teacher {summary['teacher_val_loss']:.4f}, gap "
            f"{summary['val_loss'] - summary['teacher_val_loss']:+.4f}]") in out      # each evaluation's line
    # A second run on the same data reads the teacher's logits and held-out loss from the cache.
    monkeypatch.setattr(teacher_module, "compute_topk", no_teacher_pass)
    again = train(TrainOptions(quiet=True, **common))
    assert again.summary["teacher_val_loss"] == summary["teacher_val_loss"]
    assert store.get_run(again.run_id)["teacher_val_loss"] == summary["teacher_val_loss"]


def test_the_summary_block_keeps_the_guides_lines_and_adds_the_teacher_after_them():
    guide = {"steps_completed": 20, "final_loss": 0.456789, "avg_lr_multiplier": 1.15,
             "constraint_activation_rate": 0.325, "final_trust_radius": 0.012345}
    summary = RunSummary.from_dict({**guide, "val_loss": 5.0, "val_ppl": math.exp(5.0), "top1_agreement": 0.5,
                                    "kl_teacher": 0.39, "teacher_val_loss": 4.0})
    assert summary.teacher_gap == 1.0 and summary.teacher_gap_ratio == 1.25
    lines = render_summary(summary).splitlines()
    assert lines[:7] == render_summary(guide).splitlines()[:7]        # title, rule and the guide's five lines
    assert lines[8:10] == ["Teacher Held-out Loss: 4.000000 (perplexity 54.60) on the same validation windows",
                           "Student Gap to Teacher: +1.000000 nats (1.250× the teacher's loss), KL to the teacher "
                           "0.3900"]
    assert lines[7].startswith("Validation Loss: 5.000000") and lines[-1] == "=" * 60
    # Read back from the store's flat summary, the gap is the same; a run without a teacher loss shows no line.
    assert RunSummary.from_dict(summary.to_dict()).teacher_gap == 1.0
    assert "Teacher" not in render_summary({**guide, "val_loss": 5.0})


def test_the_summary_page_shows_the_teachers_loss_and_the_students_gap(tmp_path):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    store = RunStore(tmp_path / "runs")
    finished = store.create_run(config={}, args={"options": {"hybrid": False}}, preset="tiny", status="running")
    running = store.create_run(config={}, args={"options": {"hybrid": False}}, preset="tiny", status="running")
    summary = RunSummary(steps_completed=4, final_loss=5.5, optimizer="adamw", val_loss=5.25, kl_teacher=0.4,
                         teacher_val_loss=5.0).to_dict()
    with store.writer(finished) as writer:
        writer.set_teacher_val_loss(5.0)
        writer.set_summary(summary)
        writer.set_status("finished")
    with store.writer(running) as writer:
        writer.set_teacher_val_loss(4.5)
    def summary_page(run_id):
        at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
        at.session_state["runs_root"] = str(store.root)
        at.session_state["selected_run"] = run_id
        at.run()
        at.switch_page("workbench/pages/summary.py")
        at.run()
        assert not at.exception, at.exception
        return at

    at = summary_page(finished)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Teacher's validation loss"] == "5.0000" and metrics["Validation loss"] == "5.2500"
    assert metrics["Gap to the teacher"] == "+0.2500"
    assert [m.delta for m in at.metric if m.label == "Gap to the teacher"] == ["1.050× the teacher's loss"]
    assert "Student Gap to Teacher: +0.250000 nats (1.050× the teacher's loss)" in at.code[0].value
    at = summary_page(running)                  # still training: its reference is known already
    assert {m.label: m.value for m in at.metric} == {"Teacher's validation loss": "4.5000"}
