"""Run summary: the guide's HYBRID OPTIMIZATION SUMMARY of a finished run, its other final values, and downloads
of what it produced (the exported model, the metrics CSV, ...)."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from hybrid_optimization.tracking import StoreError
from workbench import export_panel, headline, launcher, queries, ui

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
    st.error(ui.plain(exc))
    st.stop()

hybrid = headline.is_hybrid(run)
st.subheader(("Hybrid optimization summary" if hybrid else "Training summary — baseline: AdamW at constant LR"))
st.markdown(f"**{ui.plain(queries.run_label(run))}** {ui.status_badge(run['status'])} · preset {ui.plain(run.get('preset'))} · "
            f"created {time.strftime('%Y-%m-%d %H:%M', time.localtime(run['created_at']))}")
summary = run.get("summary") or {}
if run["status"] != "finished":
    st.info(f"This run is {run['status']}; its summary is written when it finishes."
            + (" Values below are what it reported so far." if summary else ""))
if run["status"] == "failed" and run.get("error"):
    with st.expander("Traceback"):
        st.code(run["error"], language="text")

# The student's reference: the teacher's own loss on the very windows the student is evaluated on (stored on the
# run at set-up, so a run still training has it too; runs recorded before it have none).
TEACHER_HELP = ("The teacher's own cross-entropy on the same validation windows, over the student's vocabulary: "
                "the loss the student is distilled toward.")
GAP_HELP = ("The student's validation loss minus its teacher's, on the same windows (0: as good as the teacher). "
            "Below it: the ratio of the two losses.")
teacher_loss = summary.get("teacher_val_loss", run.get("teacher_val_loss"))
if not summary and teacher_loss is not None:
    st.metric(headline.value_label("teacher_val_loss"), headline.format_value("teacher_val_loss", teacher_loss),
              help=TEACHER_HELP)

if summary:
    # The block exactly as the trainer printed it (hybrid or baseline), then the same numbers readable.
    st.code(headline.summary_text(run), language="text")
    values = {**summary, "teacher_val_loss": teacher_loss}
    headline_keys = ["final_loss", "val_loss", "teacher_val_loss", "teacher_gap", "val_ppl", "top1_agreement",
                     "kl_teacher", "tokens_per_s"]
    if hybrid:
        headline_keys += ["avg_lr_multiplier", "constraint_activation_rate"]
    shown_keys = [k for k in headline_keys if values.get(k) is not None]
    helps = {"final_loss": headline.FINAL_LOSS_HELP, "tokens_per_s": headline.TOKENS_HELP,
             "teacher_val_loss": TEACHER_HELP, "teacher_gap": GAP_HELP}
    ratio = values.get("teacher_gap_ratio")
    cols = st.columns(4)
    for i, key in enumerate(shown_keys):
        cols[i % 4].metric(headline.value_label(key), headline.format_value(key, values[key]), help=helps.get(key),
                           delta=(f"{headline.format_value('teacher_gap_ratio', ratio)} the teacher's loss"
                                  if key == "teacher_gap" and ratio is not None else None), delta_color="off")
    st.caption(f"“Final Loss”: {headline.FINAL_LOSS_HELP[0].lower() + headline.FINAL_LOSS_HELP[1:]} "
               "Validation values are from the last evaluation."
               + (" The teacher's validation loss is its own, on the same windows: the student's reference."
                  if teacher_loss is not None else ""))
    rest = {k: v for k, v in summary.items() if k not in shown_keys and k not in headline.HIDDEN_VALUES
            and k != "teacher_gap_ratio"
            and not str(k).startswith("val_loss_cluster_") and isinstance(v, (int, float, str, bool))}
    clusters = {k: v for k, v in summary.items() if str(k).startswith("val_loss_cluster_")}
    with st.expander("Timings, memory, size and every other value"):
        st.dataframe(pd.DataFrame({"value": [headline.format_cell(k, v) for k, v in rest.items()]},
                                  index=[headline.value_label(k) for k in rest]), width="stretch",
                     height=min(35 * (len(rest) + 1) + 3, 800))
        if clusters:
            st.dataframe(pd.DataFrame({"validation loss": [f"{v:.4f}" for v in clusters.values()]},
                                      index=[headline.value_label(k) for k in clusters]), width="stretch")

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
        size = path.stat().st_size
        col1.markdown(f"**{ui.plain(kind)}** — {ui.plain(path.name)} ({headline.format_value('export_bytes', size)})")
        export_panel.download(col2, path, key=f"summary_download.{kind}")
    elif path.is_dir():
        col1.markdown(f"**{ui.plain(kind)}** — folder {ui.plain(path)}")
    else:
        col1.markdown(f"**{ui.plain(kind)}** — {ui.plain(path)} (missing on disk)")

export_panel.show(run)

with st.expander("Config and command line"):
    st.json(run.get("config") or {}, expanded=False)
    args = run.get("args")
    argv = args.get("argv") if isinstance(args, dict) else args
    if argv:
        st.code(" ".join(str(a) for a in argv), language="bash", wrap_lines=True)
