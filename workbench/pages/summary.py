"""Run summary: the guide's HYBRID OPTIMIZATION SUMMARY of a finished run, its other final values, and downloads
of what it produced (the exported model, the metrics CSV, ...)."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from hybrid_optimization.tracking import StoreError
from workbench import launcher, queries, ui

ui.page_header("Run summary")
store = ui.open_store()
if store is None:
    st.stop()
runs = ui.list_runs(store)
run_id = ui.pick_run(runs, key="summary_run")
if run_id is None:
    st.stop()
try:
    run = store.get_run(run_id)
except StoreError as exc:
    st.error(str(exc))
    st.stop()

st.markdown(f"**{queries.run_label(run)}** {ui.status_badge(run['status'])} · preset `{run.get('preset')}` · "
            f"created {time.strftime('%Y-%m-%d %H:%M', time.localtime(run['created_at']))}")
summary = run.get("summary") or {}
if run["status"] != "finished":
    st.info(f"This run is {run['status']}; its summary is written when it finishes."
            + (" Values below are what it reported so far." if summary else ""))
if run["status"] == "failed" and run.get("error"):
    with st.expander("Traceback"):
        st.code(run["error"], language="text")

if summary:
    st.code(queries.summary_text(summary), language="text")
    shown = {key for _, key, _ in queries.SUMMARY_LINES}
    others = {k: v for k, v in summary.items() if k not in shown and isinstance(v, (int, float, str, bool))}
    if others:
        st.dataframe(pd.DataFrame({"value": [f"{v:.6g}" if isinstance(v, float) else str(v)
                                             for v in others.values()]}, index=list(others.keys())), width="stretch")

st.subheader("Files")
artifacts = dict(run.get("artifacts") or {})
for name in (launcher.STDOUT_NAME, launcher.STDERR_NAME, launcher.CONFIG_NAME):
    path = store.root / run_id / name
    if path.is_file() and path.stat().st_size:
        artifacts.setdefault(name, str(path))
if not artifacts:
    st.caption("This run has produced no files yet.")
# The exported model first: it is what a finished run is for.
for kind, path_text in sorted(artifacts.items(), key=lambda item: (item[0] != "export", item[0])):
    path = Path(path_text)
    col1, col2 = st.columns([3, 1])
    if path.is_file():
        col1.markdown(f"**{kind}** — `{path}` ({path.stat().st_size / 2**20:.2f} MiB)")
        col2.download_button("Download", data=lambda p=path: p.read_bytes(), file_name=path.name,
                             key=f"summary_download.{kind}", icon=":material/download:")
    elif path.is_dir():
        col1.markdown(f"**{kind}** — folder `{path}`")
    else:
        col1.markdown(f"**{kind}** — `{path}` (missing on disk)")

with st.expander("Config and command line"):
    st.json(run.get("config") or {}, expanded=False)
    args = run.get("args")
    argv = args.get("argv") if isinstance(args, dict) else args
    if argv:
        st.code(" ".join(str(a) for a in argv), language="bash")
