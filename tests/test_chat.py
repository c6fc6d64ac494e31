"""Chat with a run's student beside its teacher: streaming, sampling settings, the student's vocabulary, the CLI
twin and the workbench page (AppTest), on a small student + tokenizer + teacher built in a second."""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import torch

from hybrid_optimization.chat import MAX_MESSAGE_CHARS, Answer, ChatInputError, ChatModels, Settings, _sample, main
from hybrid_optimization.tracking import RunStore
from tests.fixtures.student_run import add_tiny_teacher, finished_run, make_tokenizer_dir, trained_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MESSAGES = [{"role": "user", "content": "hello there, how are you today?"}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    os.environ["HYBRID_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    folder = make_tokenizer_dir()
    add_tiny_teacher(folder)
    return folder


@pytest.fixture
def run(tokenizer_dir):
    store = RunStore(Path(os.environ["HYBRID_RUNS_ROOT"]))
    student, vocab, _ = trained_student()
    return store, finished_run(store, copy.deepcopy(student), vocab, tokenizer_dir)


def test_streamed_answers_follow_the_settings(run):
    store, run_id = run
    models = ChatModels.from_run(run_id, store.root)
    assert models.teacher is not None and "<|im_start|>assistant" in models.tokenizer.decode(
        models.prompt_ids(MESSAGES))
    settings = Settings(temperature=0, max_new_tokens=12)
    for who in ("student", "teacher"):
        answer = Answer()
        pieces = [token.text for token in models.stream(who, MESSAGES, settings, answer)]
        assert "".join(pieces) == answer.text and answer.n_tokens == len(pieces) <= 12
        assert answer.tokens_per_s > 0 and answer.first_token_s is not None
        again = models.reply(who, MESSAGES, settings)
        assert again.tokens == answer.tokens          # greedy is deterministic
    student = models.reply("student", MESSAGES, Settings(temperature=1.5, top_p=1.0, max_new_tokens=30, seed=3))
    assert set(student.tokens) <= set(models.vocab.tolist())     # only tokens the student was trained on
    other_seed = models.reply("student", MESSAGES, Settings(temperature=1.5, top_p=1.0, max_new_tokens=30, seed=4))
    assert other_seed.tokens != student.tokens
    greedy = models.reply("student", MESSAGES, Settings(temperature=0, max_new_tokens=30))
    nucleus = models.reply("student", MESSAGES, Settings(temperature=1.0, top_p=1e-6, max_new_tokens=30, seed=5))
    assert nucleus.tokens == greedy.tokens             # a vanishing top-p keeps only the most likely token


def test_end_of_turn_stops_and_unknown_prompt_tokens_are_dropped(run):
    store, run_id = run
    models = ChatModels.from_run(run_id, store.root, with_teacher=False)
    end = int(models.to_student[models.tokenizer.convert_tokens_to_ids("<|im_end|>")])
    with torch.no_grad():
        models.student.lm_head.weight[end] = 50 * models.student.norm.weight.sign()   # always says "end of turn"
    answer = models.reply("student", MESSAGES, Settings(temperature=0, max_new_tokens=10))
    assert answer.n_tokens == 0 and answer.stop_reason == "end of turn"
    prompt = models.prompt_ids(MESSAGES)
    unknown = [t for t in prompt if models.to_student[t] < 0]
    assert answer.dropped_prompt_tokens == len(unknown) > 0      # the random vocabulary misses some prompt tokens
    assert "unknown to the student dropped" in answer.stats_line()


def test_a_long_conversation_is_cut_to_each_models_context_keeping_its_end(run):
    """Issue 17 item 5: a message near the bound answers as fast as a short one — the teacher's prompt is cut to its
    context (less the answer's room), the student's to its window, both keeping the end of the conversation."""
    store, run_id = run
    models = ChatModels.from_run(run_id, store.root)
    text = " ".join(["tell me a joke about computers"] * 600)[:MAX_MESSAGE_CHARS]
    long = [{"role": "user", "content": text}]
    settings = Settings(temperature=0, max_new_tokens=8)
    prompt = models.prompt_ids(long)
    for who in ("teacher", "student"):
        window = models.context_window(who, settings.max_new_tokens)
        assert len(prompt) > window
        started = time.perf_counter()
        answer = models.reply(who, long, settings)
        assert answer.cut_prompt_tokens == len(prompt) - window and answer.n_tokens >= 1
        assert time.perf_counter() - started < 30
    assert models.context_window("teacher", 8) == models.teacher.config.max_position_embeddings - 8
    # the end is what is kept: the cut prompt answers exactly as the prompt's own tail does
    tail_settings = Settings(temperature=0, max_new_tokens=6)
    window = models.context_window("teacher", tail_settings.max_new_tokens)
    assert models.reply("teacher", long, tail_settings).tokens == _teacher_greedy(models, prompt[-window:], 6)
    with pytest.raises(ChatInputError, match=f"at most {MAX_MESSAGE_CHARS:,}"):
        models.reply("student", [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}], settings)


def _teacher_greedy(models, ids, n):
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(models.teacher(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token in models.stop_ids:
                break
            out.append(token)
    return out


def test_sampling_helper():
    logits = torch.tensor([0.0, 3.0, 1.0, -2.0])
    assert _sample(logits, 0.0, 0.9, None) == 1
    g = torch.Generator().manual_seed(0)
    draws = {_sample(logits, 1.0, 0.5, g) for _ in range(50)}
    assert draws == {1}                                    # 0.5 of the mass is inside the top token alone
    draws = {_sample(logits, 5.0, 1.0, g) for _ in range(200)}
    assert draws == {0, 1, 2, 3}
    for bad in (Settings(temperature=-1), Settings(top_p=0), Settings(max_new_tokens=0), Settings(seed=2 ** 70),
                Settings(seed=-1), Settings(temperature=float("nan"))):
        with pytest.raises(ValueError, match="invalid"):
            bad.check()


def test_cli_one_question_and_bad_input(run, capsys, tokenizer_dir):
    store, run_id = run
    assert main([run_id, "--message", "hello there", "--temperature", "0", "--max_new_tokens", "5",
                 "--runs_root", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "student> " in out and "teacher> " in out and out.count("tokens/s") == 2
    student, vocab, _ = trained_student()
    failed = finished_run(store, copy.deepcopy(student), vocab, tokenizer_dir, status="failed")
    assert main([failed, "--message", "hi", "--runs_root", str(store.root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed" in err
    assert main([run_id, "--top_p", "2", "--runs_root", str(store.root)]) == 2
    assert "top_p 2.0 is invalid" in capsys.readouterr().err
    assert main(["no-such-run", "--message", "hi", "--runs_root", str(store.root)]) == 2
    err = capsys.readouterr().err         # the chat's words, not the export's it shares the lookup with
    assert err.startswith("error: cannot chat with run 'no-such-run': no run 'no-such-run'") and "export" not in err


def test_workbench_chat_page_streams_both_answers(run):
    from streamlit.testing.v1 import AppTest
    store, run_id = run
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120)
    at.session_state["runs_root"] = str(store.root)
    at.run()
    at.switch_page("workbench/pages/chat.py")
    at.run()
    assert not at.exception, at.exception
    at.slider(key="chat_temperature").set_value(0.0)
    at.chat_input[0].set_value("hello there").run()
    assert not at.exception, at.exception
    captions = [c.value for c in at.caption]
    assert sum("tokens/s" in c for c in captions) == 2       # the student's and the teacher's answers
    markdown = [m.value for m in at.markdown]
    assert "**student**" in markdown and "**teacher**" in markdown
    history = at.session_state[f"chat_history.{run_id}"]
    assert len(history) == 1 and set(history[0]) == {"user", "student", "teacher"}


def test_summary_page_offers_each_export(run):
    from streamlit.testing.v1 import AppTest
    store, run_id = run
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120)
    at.session_state["runs_root"] = str(store.root)
    at.session_state["selected_run"] = run_id
    at.run()
    at.switch_page("workbench/pages/summary.py")
    at.run()
    assert not at.exception, at.exception
    assert [b.key for b in at.button if b.key and b.key.startswith("export_make.")] == ["export_make.gguf",
                                                                                        "export_make.hf"]
    at.button(key="export_make.gguf").click().run()
    assert not at.exception, at.exception
    assert any("GGUF" in s.value and "TQ2_0" in s.value for s in at.success)
    assert (store.run_dir(run_id) / "student.gguf").is_file()
    assert [b.key for b in at.button if b.key and b.key.startswith("export_make.")] == ["export_make.hf"]
