"""Streamlit pieces shared by the pages: the runs root, opening the store with a clear message, the run picker,
liveness upkeep, status badges. Pages stay short and read top to bottom.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from hybrid_optimization import schema
from hybrid_optimization.tracking import ACTIVE_STATUSES, RunStore, StoreError, StoreMissing, default_runs_root
from workbench import launcher, queries
from workbench.queries import run_label

PAGES = {  # path relative to app.py -> title; app.py builds st.navigation from it
    "configure": "workbench/pages/configure.py",
    "live": "workbench/pages/live.py",
    "clusters": "workbench/pages/clusters.py",
    "precision": "workbench/pages/precision.py",
    "compare": "workbench/pages/compare.py",
    "summary": "workbench/pages/summary.py",
    "chat": "workbench/pages/chat.py",
    "benchmarks": "workbench/pages/benchmarks.py",
    "sweep": "workbench/pages/sweep.py",
}
STATUS_COLORS = schema.STATUS_COLORS    # one definition of the badge colours (hybrid_optimization/schema.py)
LIVENESS_EVERY_S = 5.0


# Characters that start a markdown, HTML or Streamlit construct (links and images `![..](..)`, tags `<b>`, entities
# `&lt;`, emphasis, code, tables, strikethrough, LaTeX `$..$`, `:red[..]` / `:material/..:` directives, headings,
# setext underlines). Escaped with a backslash (CommonMark renders `\x` as `x`), so the text shows as typed.
_MARKDOWN_SPECIALS = re.compile(r"([\\`*\[\]<>!|~$:&#={}])")
_WORD_UNDERSCORE = re.compile(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")   # `_` that can open or close emphasis
_LINE_START = re.compile(r"^(\s*)([-+>]|\d+[.)])(?=\s|$)", re.M)                 # list items and quotes at a line's start


def plain(text) -> str:
    """`text` (a run name, tag, note, error message: anything a user or a file controls) escaped so that any
    Streamlit text element (st.markdown, st.caption, st.error, ...) shows it literally: never a link, an image
    fetched from a host, HTML, a heading or a colour. Line breaks are kept. Use it on every interpolated value:
    st.error(f"Not launched: {ui.plain(exc)}")."""
    text = _MARKDOWN_SPECIALS.sub(r"\\\1", str(text))
    text = _WORD_UNDERSCORE.sub(r"\\_", text)
    text = _LINE_START.sub(lambda m: m.group(1) + "".join("\\" + c if not c.isdigit() else c for c in m.group(2)),
                           text)
    return text.replace("\n", "  \n")


def ignored_link(param: str, value, why: str) -> None:
    """A URL parameter that names nothing here (a stale bookmark, a typo, a crafted link): one line saying it is
    ignored and why; the page shows its usual view. The value is shown cut and literally (never markdown)."""
    text = str(value)
    shown = text if len(text) <= 80 else f"{text[:80]}… ({len(text):,} characters)"
    st.warning(f"The link's {param}={plain(shown)} is ignored: {plain(why)}.", icon=":material/link_off:")


def runs_root() -> Path:
    if "runs_root" not in st.session_state:
        st.session_state["runs_root"] = str(default_runs_root())
    return Path(st.session_state["runs_root"]).expanduser()


def open_store(create: bool = False) -> RunStore | None:
    """The store at the chosen runs root, or None after telling the user why not (no traceback)."""
    root = runs_root()
    try:
        store = RunStore(root, create=create)
    except StoreMissing as exc:
        st.info(f"{plain(exc)}\n\nStart one on the **Configure** page.")
        return None
    except StoreError as exc:
        st.error(plain(exc))
        return None
    upkeep(store)
    return store


def upkeep(store: RunStore) -> None:
    """Reap finished children and mark runs whose process died as lost — at most every few seconds per session."""
    now = time.monotonic()
    if now - st.session_state.get("_upkeep_at", 0.0) < LIVENESS_EVERY_S:
        return
    st.session_state["_upkeep_at"] = now
    try:
        launcher.reap(store)
        launcher.mark_lost(store)
    except StoreError as exc:  # e.g. a read-only runs root: show the runs, say why liveness is unknown
        st.caption(f"could not update run liveness: {plain(exc)}")


def status_badge(status: str) -> str:
    return f":{STATUS_COLORS.get(status, 'gray')}-badge[{status}]"


def pick_run(runs: pd.DataFrame, label: str = "Run", key: str = "run_picker",
             prefer_active: bool = False) -> str | None:
    """A run selector whose choice is shared by every page (session_state['selected_run'])."""
    if runs.empty:
        st.info("No runs in this runs root yet. Start one on the **Configure** page.")
        return None
    ids = list(runs.run_id)
    # No status in the labels: a browser keeps showing the selected option's old label when only the label
    # changes, so "queued" would stay on screen for a running run. Pages show the status next to the picker.
    labels = {row.run_id: run_label(row._asdict()) for row in runs.itertuples()}
    linked = st.query_params.get("run")       # ?run=<id> links straight to a run
    if linked in ids and linked != st.session_state.get("_run_in_url"):
        st.session_state["selected_run"] = linked
        st.session_state.pop(key, None)
    elif linked is not None and linked not in ids and linked != st.session_state.get("_run_in_url"):
        ignored_link("run", linked, "no run with this id in this runs root")
    chosen = st.session_state.get("selected_run")
    if chosen not in ids:
        active = runs[runs.status.isin(ACTIVE_STATUSES)]
        chosen = active.run_id.iloc[0] if prefer_active and len(active) else ids[0]
    if st.session_state.get(key) not in ids:
        st.session_state.pop(key, None)
    run_id = st.selectbox(label, ids, index=ids.index(chosen), format_func=labels.get, key=key)
    st.session_state["selected_run"] = run_id
    # The URL names the run on screen, so it can be bookmarked or sent (and opens the same view).
    st.query_params["run"] = run_id
    st.session_state["_run_in_url"] = run_id
    return run_id


def list_runs(store: RunStore, include_archived: bool = False) -> pd.DataFrame:
    try:
        return queries.list_runs(store, include_archived=include_archived)
    except StoreError as exc:
        st.error(plain(exc))
        return pd.DataFrame(columns=["run_id", "name", "status"])


def page_header(title: str, caption: str | None = None) -> None:
    st.title(title)
    if caption:
        st.caption(caption)
