"""Compare runs: a run table (status, preset, key config, final metrics, editable tags and notes) with selection;
overlaid curves of the selected runs, one colour per run across charts; config diff; metrics CSV; archive/delete."""
from __future__ import annotations

import hashlib
import time

import pandas as pd
import streamlit as st

from hybrid_optimization.tracking import STEP_COLUMNS, RunStore, StoreError
from workbench import charts, queries, ui

KEY_CONFIG = ("cfg.target_bits", "cfg.base_learning_rate", "cfg.data_clusters", "cfg.parameter_clusters",
              "cfg.use_auxiliary_nn", "cfg.use_trust_region", "cfg.max_steps")
FINAL_FIRST = ("final.loss", "final.val_loss", "final.val_ppl", "final.top1_agreement")
METRICS = ("loss", "learning_rate", "lr_multiplier", "trust_radius", "constraint_rate", "update_magnitude",
           "gradient_magnitude", "quantization_error", "flip_rate", "tokens_per_s")
SELECTED = "compare_selected"
RAW_LINES_UP_TO = 6    # more overlaid runs: smoothed lines only, or the chart becomes a blur (and slow to draw)

ui.page_header("Compare runs")
store = ui.open_store()
if store is None:
    st.stop()
show_archived = st.toggle("Show archived runs", key="compare_archived")
runs = ui.list_runs(store, include_archived=show_archived)
if runs.empty:
    st.info("No runs in this runs root yet. Start one on the **Configure** page.")
    st.stop()

# Colours follow creation order over all runs, so a run keeps its colour whatever else is selected.
colors = charts.run_colors(list(runs.sort_values("created_at").run_id))
labels = {row.run_id: queries.run_label(row._asdict()) for row in runs.itertuples()}
selected: set[str] = st.session_state.setdefault(SELECTED, set())
linked = [r for r in st.query_params.get("runs", "").split(",") if r in set(runs.run_id)]
if linked and not st.session_state.get("_linked_runs_used"):   # ?runs=<id>,<id> links to a comparison
    st.session_state["_linked_runs_used"] = True
    selected.clear()
    selected.update(linked)
if not selected:
    selected.update(runs.run_id.head(min(2, len(runs))))

table = pd.DataFrame({
    "select": runs.run_id.isin(selected),
    "run": runs.run_id,
    "name": runs.name,
    "status": runs.status,
    "preset": runs.preset,
    "created": pd.to_datetime(runs.created_at, unit="s"),
    "step": runs.step,
})
for col in [*KEY_CONFIG, *FINAL_FIRST, *sorted(c for c in runs.columns if c.startswith("final.")
                                                and c not in FINAL_FIRST)]:
    if col in runs.columns:
        table[col] = runs[col]
table["tags"] = runs.tags.apply(lambda t: ", ".join(t or []))
table["notes"] = runs.notes.fillna("")
if "archived" in runs and show_archived:
    table["archived"] = runs.archived

# The editor's edits are kept by row position; a new key whenever the list of runs changes avoids applying
# them to the wrong rows.
signature = hashlib.sha1("|".join(runs.run_id).encode()).hexdigest()[:10]
edited = st.data_editor(
    table, key=f"runs_table.{signature}", hide_index=True, disabled=[c for c in table.columns
                                                                    if c not in ("select", "tags", "notes")],
    column_config={"select": st.column_config.CheckboxColumn("✓", help="Compare this run"),
                   "created": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
                   "tags": st.column_config.TextColumn(help="comma-separated; saved to the store"),
                   "notes": st.column_config.TextColumn(help="saved to the store", width="large"),
                   "status": st.column_config.TextColumn(width="small")})
selected.clear()
selected.update(edited.loc[edited["select"], "run"])
for before, after in zip(table.itertuples(), edited.itertuples()):
    try:
        if after.tags != before.tags:
            store.set_tags(after.run, [t for t in after.tags.split(",")])
        if after.notes != before.notes:
            store.set_notes(after.run, after.notes)
    except StoreError as exc:
        st.error(str(exc))
chosen = [r for r in runs.run_id if r in selected]
st.caption(f"{len(chosen)} of {len(runs)} run(s) selected.")
if not chosen:
    st.stop()


@st.cache_data(max_entries=256, show_spinner=False)
def series_of(_store: RunStore, root: str, run_id: str, last_step: int | None, status: str, metrics: tuple[str, ...],
              x: str, smoothing: float, max_points: int) -> dict[str, pd.DataFrame]:
    """One run's downsampled series of every chosen metric, from one read; cached until the run logs a new step
    (a finished run: for good). `root`, `last_step` and `status` are part of the cache key."""
    columns = sorted({"constraint_active" if m == "constraint_rate" else m for m in metrics})
    steps = queries.with_derived(_store.read_steps(run_id, columns=columns))
    return {m: queries.chart_series(steps, m, x, smoothing, max_points, run=run_id) for m in metrics}


c1, c2, c3 = st.columns([3, 1.5, 1])
metrics = c1.multiselect("Curves", METRICS, default=["loss", "lr_multiplier"], key="compare_metrics")
smoothing = c2.slider("Smoothing (EMA)", 0.0, 0.99, queries.DEFAULT_SMOOTHING, 0.01, key="compare_smoothing")
x_axis = c3.radio("x axis", ("step", "wall time"), horizontal=True, key="compare_x")
# Many runs share a chart's drawing budget, so the browser stays responsive; never more than MAX_POINTS.
max_points = max(500, min(queries.MAX_POINTS, 20_000 // max(1, len(chosen))))
show_raw = len(chosen) <= RAW_LINES_UP_TO
st.caption(f"At most {max_points:,} points per series here (min/max per bucket; fewer when many runs are "
           "overlaid); smoothing uses every point."
           + ("" if show_raw else f" Faint raw lines are drawn for up to {RAW_LINES_UP_TO} runs."))
x_col, x_title = ("step", "step") if x_axis == "step" else ("time_s", "seconds since the run's first step")
info = runs.set_index("run_id")
started = time.perf_counter()
per_run = {r: series_of(store, str(store.root), r, None if pd.isna(info.at[r, "step"]) else int(info.at[r, "step"]),
                        info.at[r, "status"], tuple(metrics), x_col, smoothing, max_points) for r in chosen}
grid = st.columns(2)
for i, metric in enumerate(metrics):
    parts = [per_run[r][metric] for r in chosen if not per_run[r][metric].empty]
    series = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    with grid[i % 2]:
        log_y = st.toggle("log y", key=f"compare_logy.{metric}")
        st.plotly_chart(charts.line_figure(series, metric, x_title=x_title, log_y=log_y, colors=colors, labels=labels,
                                           uirevision=f"compare:{metric}:{x_col}:{log_y}", color_by="run",
                                           raw=show_raw),
                        key=f"compare_chart.{metric}")
st.caption(f"curves of {len(chosen)} run(s) prepared in {time.perf_counter() - started:.2f} s")

st.subheader("Config diff")
# From the run table's cfg.* columns: no extra query per run.
details = {labels[r]: {"preset": info.at[r, "preset"],
                       "config": {c[4:]: info.at[r, c] for c in info.columns if c.startswith("cfg.")
                                  and not (isinstance(info.at[r, c], float) and pd.isna(info.at[r, c]))}}
           for r in chosen}
diff = queries.config_diff(details)
if len(details) < 2:
    st.caption("Select two or more runs to see what differs; the selected run's config:")
    st.dataframe(diff.astype(str), width="stretch")
elif diff.empty:
    st.success("The selected runs have identical configs and presets.")
else:
    st.dataframe(diff.astype(str), width="stretch")

st.subheader("Export and housekeeping")
d1, d2, d3 = st.columns(3)
d1.download_button("Download metrics CSV", data=lambda: queries.metrics_csv(store, chosen),
                   file_name=f"metrics-{len(chosen)}-runs.csv", mime="text/csv", icon=":material/download:",
                   key="compare_csv", help=f"Every logged step of the selected run(s); columns: run_id, step, "
                                           f"wall_time, {', '.join(STEP_COLUMNS)}")
archive_label = "Unarchive selected" if show_archived and info.loc[chosen, "archived"].all() else "Archive selected"
if d2.button(archive_label, key="compare_archive", icon=":material/archive:"):
    for r in chosen:
        store.archive(r, archived=archive_label.startswith("Archive"))
    selected.clear()
    st.rerun()
confirm = d3.checkbox("Yes, delete the selected runs and their folders", key="compare_confirm_delete")
if d3.button("Delete selected", key="compare_delete", icon=":material/delete:", disabled=not confirm, type="primary"):
    problems = []
    for r in chosen:
        try:
            store.delete_run(r)
        except StoreError as exc:
            problems.append(str(exc))
    selected.clear()
    st.session_state.pop("compare_confirm_delete", None)
    if problems:
        st.session_state["compare_problems"] = problems
    st.rerun()
for problem in st.session_state.pop("compare_problems", []):
    st.error(problem)
