"""Bad values through the workbench's doors (issue 17: "the form and URL parameters get the same through AppTest").

Two tables, run through streamlit's AppTest on the real app.py:

- FORM_CASES: bad values typed or picked on the Configure & launch form (out-of-range numbers, text where a number
  goes, combinations the optimizer menu refuses, a warmup longer than the run, names and tags over their bounds, a
  teacher or a data file that cannot be used). Each must show exactly one error naming the problem, raise no
  exception, keep Launch disabled, start no process and write nothing to the runs root.
- SWEEP_CASES: bad values on the Sweep page's "New sweep" form: ranges that do not parse or leave the CLI's bounds
  (each field's error as it is typed, Start disabled) and sweep names the sweep refuses (one "Not started" line
  when Start is pressed). Nothing may start and nothing may be written.
- URL_CASES: bad query parameters of the pages that read st.query_params (?run=, ?sweep=, ?runs= and Compare's view
  state): unknown ids, garbage, huge strings, markdown and HTML. Each must raise no exception, show at most one
  message (exactly one where `expect` is given: the link is named as ignored, or the value's error), never render the
  value as markdown or HTML, and write nothing to the runs root.

The form cases share one app session (a case's bad values are put back before the next case, whose "exactly one
error" also proves the previous one was undone), so the table costs one page run per case.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from hybrid_optimization.tracking import RunStore
from tests.fixtures.bad_files import make_files
from tests.fixtures.workbench_runs import write_synthetic_run
from workbench import launcher

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PATH_SOURCE = "Path on this machine"
MARKUP = "![x](http://host.example/p.png) <b>bold</b> [link](http://host.example)"
RAW_MARKUP = ("![x](", "<b>", "[link](")   # never in a text element: ui.plain puts a backslash inside each
LONG = "n" * 100_000


@dataclass(frozen=True)
class FormCase:
    settings: tuple[tuple[str, str, object], ...]     # (widget kind, key, value), applied in order
    expect: str                                       # a fragment of the one error shown (markup unescaped)
    note: str = ""

    @property
    def id(self) -> str:
        if self.note:
            return self.note
        return " + ".join(f"{key.split('.', 1)[-1]}={str(value)[:30]}" for _, key, value in self.settings)


def cfg(name: str, value, expect: str, note: str = "") -> FormCase:
    """A config field: free text for number fields, a number input for integer fields."""
    kind = "number" if isinstance(value, int) else "text"
    return FormCase(((kind, f"cfg.{name}", value),), expect, note)


def opt(name: str, value, expect: str, note: str = "") -> FormCase:
    kind = {"nproc": "number", "warmup_steps": "number", "optimizer": "select", "schedule": "select",
            "hybrid": "toggle"}.get(name, "text")
    return FormCase(((kind, f"opt.{name}", value),), expect, note)


def data(path: str, expect: str, note: str = "") -> FormCase:
    return FormCase((("radio", "opt.data_source", PATH_SOURCE), ("text", "opt.data_path", path)), expect, note)


FORM_CASES = [
    # -- HybridTrainingConfig fields: the core's rule and message ------------------------------------------------------
    cfg("base_learning_rate", "fast", "base_learning_rate"), cfg("base_learning_rate", "0", "base_learning_rate"),
    cfg("base_learning_rate", "-1", "base_learning_rate"), cfg("base_learning_rate", "nan", "base_learning_rate"),
    cfg("base_learning_rate", "100", "base_learning_rate"), cfg("base_learning_rate", "1e999", "base_learning_rate",
                                                               note="learning rate: 1e999 (infinite)"),
    cfg("weight_decay", "-1", "weight_decay"), cfg("momentum", "1.5", "momentum"), cfg("momentum", "1", "momentum"),
    cfg("quantizer_scale", "0", "quantizer_scale"), cfg("initial_trust_radius", "0", "initial_trust_radius"),
    cfg("initial_trust_radius", "5", "initial_trust_radius"),
    cfg("auxiliary_nn_learning_rate", "-1", "auxiliary_nn_learning_rate"),
    cfg("precision_budget", "0.5", "precision_budget"), cfg("precision_budget", "9", "precision_budget"),
    cfg("precision_budget", "ternary", "precision_budget"),
    cfg("data_clusters", 0, "data_clusters"), cfg("data_clusters", 5000, "data_clusters"),
    cfg("parameter_clusters", 0, "parameter_clusters"), cfg("max_sample_repeats", 0, "max_sample_repeats"),
    cfg("auxiliary_nn_hidden_size", 0, "auxiliary_nn_hidden_size"), cfg("meta_horizon", 0, "meta_horizon"),
    cfg("max_steps", 0, "max_steps"), cfg("max_steps", 30_000_000, "max_steps"), cfg("batch_size", 0, "batch_size"),
    cfg("batch_size", 70_000, "batch_size"), cfg("seed", -1, "seed"), cfg("seed", 2 ** 40, "seed"),
    cfg("log_interval", 0, "log_interval"), cfg("eval_interval", 0, "eval_interval"),
    # -- run options: the CLI's rule and message (TrainOptions.errors) --------------------------------------------------
    opt("epochs", "abc", "'abc' is invalid"), opt("epochs", "0", "0 is invalid"), opt("epochs", "-5", "-5 is invalid"),
    opt("epochs", "1.5", "1.5 is invalid"), opt("seq_len", "3", "3 is invalid"),
    opt("seq_len", "100000", "100000 is invalid"), opt("seq_len", "long", "'long' is invalid"),
    opt("alpha", "2", "2.0 is invalid"), opt("alpha", "-0.1", "-0.1 is invalid"),
    opt("alpha", "nan", "'nan' is invalid"), opt("temperature", "0", "0.0 is invalid"),
    opt("temperature", "-1", "-1.0 is invalid"),
    opt("teacher", "/nonexistent/teacher", "does not exist"),
    opt("teacher", "{files}/table.csv", "is not a .gguf file", note="teacher: a csv file"),
    opt("teacher", "{files}/empty_dir", "has no config.json", note="teacher: a folder without a model"),
    opt("run_name", LONG, "of 100,000 characters is invalid: it must be one line", note="run name of 100,000 characters"),
    opt("run_name", "two\nlines", "is invalid: it must be one line", note="run name of two lines"),
    opt("tags", "a," + "t" * 100, "are invalid", note="a tag of 100 characters"),
    opt("tags", ",".join(f"t{i}" for i in range(40)), "are invalid", note="40 tags"),
    opt("nproc", 0, "0 is invalid"), opt("warmup_steps", -1, "-1 is invalid"),
    opt("warmup_steps", 100_000, "less than the run's", note="warmup longer than the run"),
    FormCase((("select", "opt.optimizer", "schedule-free"), ("select", "opt.schedule", "cosine")),
             "cannot be combined with --optimizer schedule-free", note="schedule-free with a cosine schedule"),
    FormCase((("select", "opt.optimizer", "prodigy"),), "prodigy", note="prodigy under the hybrid optimizer"),
    # -- the data file: the reader's own rules (distill/data_files.py) -------------------------------------------------
    data("{files}/missing.txt", "does not exist"), data("{files}/folder.txt", "is a directory", "data: a directory"),
    data("{files}/fifo.txt", "is not a regular file", "data: a FIFO"), data("/dev/zero", "has extension"),
    data("{files}/table.csv", "has extension '.csv'"), data("{files}/zeros.txt", "looks binary", "data: 1 GB of NULs"),
    data("{files}/latin1.txt", "is not valid UTF-8", "data: not UTF-8"), data("{files}/empty.txt", "is empty"),
    data("{files}/broken.jsonl", "malformed JSON", "data: malformed JSONL"),
    data("{files}/robot.jsonl", "has role 'robot'", "data: unknown chat role"),
    data("{files}/nomessages.jsonl", 'non-empty "messages" list', "data: no messages list"),
]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path below `folder` with its size and modification time (SQLite's side files left out: a reader may
    create them)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else () for p in folder.rglob("*")
            if not p.name.endswith(("-wal", "-shm", "-journal"))}


def unescaped(text: str) -> str:
    """An element's text as the user reads it (ui.plain escapes markdown with backslashes)."""
    return re.sub(r"\\(.)", r"\1", text)


def messages(at: AppTest, kinds=("error",)) -> list[str]:
    return [str(e.value) for kind in kinds for e in getattr(at, kind)]


def shown_texts(at: AppTest) -> list[str]:
    return messages(at, ("markdown", "caption", "error", "warning", "info", "success", "subheader", "title"))


@pytest.fixture(scope="module")
def form(tmp_path_factory):
    """One Configure page session over a runs root holding one finished run; the process start is stubbed."""
    base = tmp_path_factory.mktemp("form-bad-inputs")
    root, files = base / "runs", base / "files"
    make_files(files)
    write_synthetic_run(RunStore(root), 20, "finished", name="existing", seed=0)
    calls = []

    class Proc:
        pid = os.getpid()

        def poll(self):
            return None

    from hybrid_optimization import launch as launch_path
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYBRID_RUNS_ROOT", str(root))
        patch.setattr(launch_path, "start", lambda argv, log_dir, **kw: calls.append(argv) or Proc())
        at = AppTest.from_file(APP, default_timeout=120)
        at.session_state["runs_root"] = str(root)
        at.run()
        assert not at.exception and messages(at) == [] and not at.button(key="launch").disabled
        yield at, calls, root, files
    launcher._CHILDREN.clear()


def widget(at: AppTest, kind: str, key: str):
    return {"text": at.text_input, "number": at.number_input, "select": at.selectbox, "radio": at.radio,
            "toggle": at.toggle}[kind](key=key)


def set_value(element, kind: str, value) -> None:
    element.input(value) if kind == "text" else element.set_value(value)


def test_the_tables_are_big_enough():
    assert len(FORM_CASES) >= 40 and len({case.id for case in FORM_CASES}) == len(FORM_CASES)
    assert len(URL_CASES) >= 15 and len({case.id for case in URL_CASES}) == len(URL_CASES)
    assert len({case.id for case in SWEEP_CASES}) == len(SWEEP_CASES)


@pytest.mark.parametrize("case", FORM_CASES, ids=[case.id for case in FORM_CASES])
def test_a_bad_form_value_shows_one_error_and_launches_nothing(form, case):
    at, calls, root, files = form
    before, runs_before = snapshot(root), len(RunStore(root).list_runs())
    undo = []
    try:
        for kind, key, value in case.settings:
            element = widget(at, kind, key)
            undo.append((kind, key, element.value))
            set_value(element, kind, value.replace("{files}", str(files)) if isinstance(value, str) else value)
            at.run()
        assert not at.exception, [e.value for e in at.exception]
        errors = [unescaped(text) for text in messages(at)]
        assert len(errors) == 1, errors
        assert case.expect in errors[0], errors[0]
        assert len(errors[0]) < 600 and "Traceback" not in errors[0]        # one clear line, the value cut
        assert at.button(key="launch").disabled
        assert any("1 problem(s)" in text for text in messages(at, ("warning",)))
    finally:
        for kind, key, value in reversed(undo):       # put the form back for the next case
            set_value(widget(at, kind, key), kind, value)
    assert calls == [] and len(RunStore(root).list_runs()) == runs_before and snapshot(root) == before


def test_the_form_is_clean_again_after_every_case(form):
    at, calls, root, _ = form
    at.run()
    assert messages(at) == [] and not at.button(key="launch").disabled     # every case above was undone
    assert calls == []


# -- the Sweep page's form -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepCase:
    settings: tuple[tuple[str, str, object], ...]
    expect: str
    press_start: bool = False      # the value is checked when Start is pressed (the name), not as it is typed
    note: str = ""

    @property
    def id(self) -> str:
        return self.note or " + ".join(f"{key.split('.', 1)[-1]}={str(value)[:30]}" for _, key, value in self.settings)


def sweep_range(field: str, end: str, value: str, expect: str, note: str = "") -> SweepCase:
    return SweepCase((("text", f"sweep_{end}.{field}", value),), expect, note=note)


def sweep_name(value: str, note: str = "") -> SweepCase:
    return SweepCase((("text", "sweep_name", value),), "Not started: --name", True, note)


SWEEP_CASES = [
    sweep_range("base_learning_rate", "low", "abc", "must be numbers"),
    sweep_range("base_learning_rate", "low", "1", "LOW < HIGH", "learning rate: low above high"),
    sweep_range("base_learning_rate", "low", "0", "needs LOW > 0", "learning rate: log range from 0"),
    sweep_range("base_learning_rate", "high", "nan", "finite LOW < HIGH"),
    sweep_range("base_learning_rate", "high", "100", "at its high end", "learning rate: high end over the bound"),
    sweep_range("initial_trust_radius", "high", "1000", "at its high end", "trust radius: high end over the bound"),
    sweep_range("initial_trust_radius", "low", "0.0001", "at its low end", "trust radius: low end under the bound"),
    SweepCase((("multiselect", "sweep_fields", ["base_learning_rate", "initial_trust_radius", "target_bits"]),
               ("text", "sweep_choices.target_bits", "1.58,3")), "target_bits", note="target_bits: 3 bits"),
    SweepCase((("multiselect", "sweep_fields", ["base_learning_rate", "initial_trust_radius", "batch_size"]),
               ("text", "sweep_low.batch_size", "70000"), ("text", "sweep_high.batch_size", "80000")),
              "batch_size", note="batch_size: over the bound"),
    sweep_name("", "name: empty"), sweep_name("../x", "name: a path"), sweep_name(LONG, "name: 100,000 characters"),
    sweep_name(MARKUP, "name: markdown and HTML"),
]


@pytest.fixture(scope="module")
def sweep_form(tmp_path_factory):
    """One Sweep page session over an empty runs root; the sweep process start is recorded, never made."""
    import subprocess
    from types import SimpleNamespace

    from workbench import sweeps
    root = tmp_path_factory.mktemp("sweep-bad-inputs") / "runs"
    root.mkdir()
    calls = []
    recorder = SimpleNamespace(Popen=lambda *a, **k: calls.append(a) or pytest.fail("a sweep was started"),
                               DEVNULL=subprocess.DEVNULL, STDOUT=subprocess.STDOUT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYBRID_RUNS_ROOT", str(root))
        patch.setattr(sweeps, "subprocess", recorder)
        at = AppTest.from_file(APP, default_timeout=120)
        at.session_state["runs_root"] = str(root)
        at.run()
        at.switch_page("workbench/pages/sweep.py")
        at.run()
        assert not at.exception and messages(at) == [] and not at.button(key="sweep_start").disabled
        yield at, calls, root


@pytest.mark.parametrize("case", SWEEP_CASES, ids=[case.id for case in SWEEP_CASES])
def test_a_bad_sweep_form_value_shows_one_error_and_starts_nothing(sweep_form, case):
    at, calls, root = sweep_form
    before = snapshot(root)
    undo = []
    try:
        for kind, key, value in case.settings:
            element = at.multiselect(key=key) if kind == "multiselect" else widget(at, kind, key)
            undo.append((kind, key, element.value))
            set_value(element, kind, value)
            at.run()
        if case.press_start:
            assert not at.button(key="sweep_start").disabled
            at.button(key="sweep_start").click().run()
        else:
            assert at.button(key="sweep_start").disabled
        assert not at.exception, [e.value for e in at.exception]
        errors = [unescaped(text) for text in messages(at)]
        assert len(errors) == 1 and case.expect in errors[0], errors
        assert len(errors[0]) < 600
        raw = [text for text in shown_texts(at) if any(mark in text for mark in RAW_MARKUP)]
        assert raw == [], raw
    finally:
        for kind, key, value in reversed(undo):
            element = at.multiselect(key=key) if kind == "multiselect" else widget(at, kind, key)
            set_value(element, kind, value)
        at.run()
    assert calls == [] and snapshot(root) == before


# -- URL query parameters ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UrlCase:
    page: str
    params: tuple[tuple[str, str], ...]
    expect: str | None = None      # a fragment of the one message shown; None: ignored without a message
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.page}:{self.note or '&'.join(f'{k}={v[:30]}' for k, v in self.params)}"


def url(page: str, expect: str | None = None, note: str = "", **params: str) -> UrlCase:
    return UrlCase(page, tuple(params.items()), expect, note)


IGNORED = "is ignored"
URL_CASES = [
    url("summary", IGNORED, run="no-such-run"), url("summary", IGNORED, "run: 100,000 characters", run=LONG),
    url("summary", IGNORED, "run: markdown and HTML", run=MARKUP), url("live", IGNORED, run="no-such-run"),
    url("live", IGNORED, "run: markdown and HTML", run=MARKUP), url("clusters", IGNORED, run="../etc/passwd"),
    url("precision", IGNORED, run="' OR 1=1 --"), url("chat", IGNORED, run="no-such-run"),
    url("live", IGNORED, "chart: unknown names", chart="bogus"), url("live", IGNORED, "chart: markdown", chart=MARKUP),
    url("sweep", IGNORED, sweep="no-such-sweep"), url("sweep", IGNORED, "sweep: markdown and HTML", sweep=MARKUP),
    url("sweep", IGNORED, "sweep: 100,000 characters", sweep=LONG),
    url("compare", IGNORED, runs="nope,also-nope"), url("compare", IGNORED, "runs: markdown and HTML", runs=MARKUP),
    url("compare", "is invalid", "q: markdown and HTML", q=MARKUP),
    url("compare", "is invalid", "q: 100,000 characters", q="(" + LONG),
    url("compare", "is invalid", q="status == "), url("compare", "must be below", xmin="100", xmax="1"),
    url("compare", IGNORED, smooth="abc"), url("compare", IGNORED, smooth="nan"), url("compare", IGNORED, xmin="abc"),
    url("compare", IGNORED, x="bogus"), url("compare", IGNORED, stat="bogus"), url("compare", IGNORED, layout="x"),
    # names of groupings, metrics and log axes that do not exist are dropped from the view, and said in one line
    url("compare", IGNORED, group="bogus"), url("compare", IGNORED, "group: markdown and HTML", group=MARKUP),
    url("compare", IGNORED, metrics="bogus,metric"), url("compare", IGNORED, "logy: markdown and HTML", logy=MARKUP),
    url("compare", None, "group: a config field that does not vary now is kept", group="cfg.seed"),
]


@pytest.fixture(scope="module")
def store_for_links(tmp_path_factory):
    root = tmp_path_factory.mktemp("url-bad-inputs") / "runs"
    store = RunStore(root)
    write_synthetic_run(store, 40, "finished", name="adamw-baseline", seed=0, hybrid=False)
    write_synthetic_run(store, 40, "finished", name="hybrid-run", seed=1)
    return root


@pytest.mark.parametrize("case", URL_CASES, ids=[case.id for case in URL_CASES])
def test_a_bad_url_parameter_is_ignored_or_refused_in_one_message(store_for_links, case, monkeypatch):
    root = store_for_links
    monkeypatch.setenv("HYBRID_RUNS_ROOT", str(root))
    before = snapshot(root)
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["runs_root"] = str(root)
    for key, value in case.params:
        at.query_params[key] = value
    at.run()
    at.switch_page(f"workbench/pages/{case.page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    shown = [unescaped(text) for text in messages(at, ("error", "warning"))]
    if case.page == "chat":             # the synthetic run has no real student: the page says so in its own error
        shown = [text for text in shown if "safetensors" not in text and "student" not in text]
    if case.expect is None:
        assert len(shown) <= 1, shown
    else:
        assert len(shown) == 1 and case.expect in shown[0], shown
    assert all(len(text) < 600 for text in shown), [len(text) for text in shown]     # a huge value is cut
    raw = [text for text in shown_texts(at) if any(mark in text for mark in RAW_MARKUP)]
    assert raw == [], raw               # the value is never rendered as markdown or HTML
    assert snapshot(root) == before     # nothing written to the runs root


def test_a_query_cannot_reach_python_through_a_link():
    """?q= is evaluated by pandas' python engine, which also runs attribute access and method calls: a link could
    call any loaded module's functions (`a.__class__.__mro__[-1].__subclasses__()[i].__init__.__globals__[...]`).
    Only columns, numbers, text, comparisons, and / or / not and arithmetic are accepted (a method call such as
    kind.str.upper() used to run and filter)."""
    import pandas as pd

    from workbench.queries import QueryError, query_runs
    frame = pd.DataFrame({"val_loss": [1.0, 5.0], "kind": ["hybrid", "baseline"]})
    assert query_runs(frame, "val_loss < 4 and kind = 'hybrid'").tolist() == [True, False]
    assert query_runs(frame, "not (val_loss > 2) or -val_loss < -3").tolist() == [True, True]
    for text in ("val_loss.__class__.__mro__[-1].__subclasses__().__len__() > 0", "kind.str.upper() == 'HYBRID'",
                 "val_loss.sum() > 0", "`val_loss`.__class__ == 1", "kind[0] == 'h'", "(lambda: 1)() == 1"):
        with pytest.raises(QueryError, match="is invalid"):
            query_runs(frame, text)


def test_a_links_unknown_metric_is_named_once_and_its_known_metrics_stay(store_for_links, monkeypatch):
    """?metrics=loss,bogus&logy=loss: the view keeps loss (and its log axis), drops bogus, and says so in one line;
    the next rerun (the user's next change) does not repeat it."""
    monkeypatch.setenv("HYBRID_RUNS_ROOT", str(store_for_links))
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["runs_root"] = str(store_for_links)
    at.query_params["metrics"] = "loss,bogus"
    at.query_params["logy"] = "loss"
    at.run()
    at.switch_page("workbench/pages/compare.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    shown = [unescaped(text) for text in messages(at, ("error", "warning"))]
    assert len(shown) == 1 and "metrics=bogus is ignored" in shown[0] and "loss" in shown[0], shown
    assert at.multiselect(key="compare_metrics").value == ["loss"]
    assert at.multiselect(key="compare_logy").value == ["loss"]
    at.run()
    assert [unescaped(text) for text in messages(at, ("error", "warning"))] == []
