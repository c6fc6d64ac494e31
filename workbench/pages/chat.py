"""Chat: talk to a finished run's student, its teacher answering beside it.

Pick a finished run (one trained with --export: the chat uses its bit-exact packed student), type a message: the
run tokenizer's chat template is applied, and both answers stream in side by side. Generation runs in background
threads (one per model) that push tokens into a queue; this script only drains the queue into the two answer boxes,
so the page keeps rendering while the models work. Tokens/s and time-to-first-token are shown under each answer.
The CLI twin is `python -m hybrid_optimization.chat RUN_ID`.
"""
from __future__ import annotations

import queue
import threading
import time

import streamlit as st

from workbench import ui

ui.page_header("Chat", "The student's answer beside its teacher's, same prompt, same sampling settings.")
# Drawn before anything heavy is imported (torch loads with the models, under the spinner below), so the page is
# never blank while Python imports.
from hybrid_optimization.chat import WHO, Answer, ChatModels, Settings  # noqa: E402
store = ui.open_store()
if store is None:
    st.stop()
runs = ui.list_runs(store)
finished = runs[runs.status == "finished"] if "status" in runs else runs
if finished.empty:
    st.info("No finished run yet: the chat needs a finished run trained with the packed export (the Configure "
            "page's default).")
    st.stop()
run_id = ui.pick_run(finished, label="Finished run", key="chat_run")
if run_id is None:
    st.stop()


@st.cache_resource(max_entries=2, show_spinner="Loading the student and its teacher…")
def load_models(run_id: str, runs_root: str) -> ChatModels:
    return ChatModels.from_run(run_id, runs_root)


try:
    models = load_models(run_id, str(store.root))
except ValueError as exc:       # no trained student, failed run, tokenizer gone: one line
    st.error(ui.plain(exc))
    st.stop()
st.caption(ui.plain(models.description))

c1, c2, c3, c4 = st.columns(4)
settings = Settings(
    temperature=c1.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="chat_temperature", help="0 = greedy"),
    top_p=c2.slider("Top-p", 0.05, 1.0, 0.9, 0.05, key="chat_top_p"),
    max_new_tokens=int(c3.number_input("Max new tokens", 1, 512, 64, key="chat_max_new_tokens")),
    seed=None)
with_teacher = c4.toggle("Teacher answers too", value=models.teacher is not None, key="chat_with_teacher",
                         disabled=models.teacher is None)
speakers = WHO if with_teacher else WHO[:1]

history_key = f"chat_history.{run_id}"
history: list[dict] = st.session_state.setdefault(history_key, [])
if history and st.button("Clear conversation", key="chat_clear"):
    history.clear()
    st.rerun()


def show_answer(column, who: str, text: str, stats: str | None) -> None:
    with column.chat_message("assistant", avatar=":material/school:" if who == "teacher" else ":material/memory:"):
        st.markdown(f"**{who}**")
        st.markdown(ui.plain(text) if text else "_(no text)_")
        if stats:
            st.caption(stats)


for turn in history:
    st.chat_message("user").markdown(ui.plain(turn["user"]))
    columns = st.columns(len(WHO))
    for column, who in zip(columns, WHO):
        if who in turn:
            show_answer(column, who, *turn[who])


def conversation(who: str, message: str) -> list[dict]:
    """This speaker's own conversation so far (each model continues its own answers), plus the new message."""
    messages = []
    for turn in history:
        messages.append({"role": "user", "content": turn["user"]})
        if who in turn:
            messages.append({"role": "assistant", "content": turn[who][0]})
    return messages + [{"role": "user", "content": message}]


def generate(who: str, messages: list[dict], answer: Answer, out: queue.Queue) -> None:
    try:
        for token in models.stream(who, messages, settings, answer):
            out.put((who, token.text))
    except Exception as exc:       # shown in the answer box; the page keeps running
        out.put((who, f"\n\n(error: {type(exc).__name__}: {exc})"))
    finally:
        out.put((who, None))


message = st.chat_input("Message the student")
if message:
    st.chat_message("user").markdown(ui.plain(message))
    columns = st.columns(len(WHO))
    boxes, texts, answers = {}, {}, {}
    tokens: queue.Queue = queue.Queue()
    for column, who in zip(columns, speakers):
        with column.chat_message("assistant",
                                 avatar=":material/school:" if who == "teacher" else ":material/memory:"):
            st.markdown(f"**{who}**")
            boxes[who] = (st.empty(), st.empty())
        texts[who], answers[who] = "", Answer()
        threading.Thread(target=generate, args=(who, conversation(who, message), answers[who], tokens),
                         name=f"chat-{who}", daemon=True).start()
    running = set(speakers)
    while running:
        try:
            who, piece = tokens.get(timeout=0.05)
        except queue.Empty:
            continue
        if piece is None:
            running.discard(who)
            boxes[who][0].markdown(ui.plain(texts[who]) if texts[who] else "_(no text)_")
            boxes[who][1].caption(answers[who].stats_line())
            continue
        texts[who] += piece
        boxes[who][0].markdown(ui.plain(texts[who]) + "▌")
        time.sleep(0)        # let the generating threads run between updates
    history.append({"user": message, **{who: (texts[who], answers[who].stats_line()) for who in speakers}})
