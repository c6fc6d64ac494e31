"""Compare runs: a run table (status, preset, key config, final metrics, editable tags and notes) with selection;
overlaid curves of the selected runs, one colour per run across charts; config diff; metrics CSV; archive/delete."""
from __future__ import annotations

import hashlib
import time

import pandas as pd
import streamlit as st

from hybrid_optimization.tracking import STEP_COLUMNS, RunStore, StoreError
from workbench import charts, queries, ui

from workbench import headline

# The run table's columns: store column -> what the user reads. Metric columns come from the run's summary (or
# its latest evaluation while it trains): one definition each (workbench/headline.py).
KEY_CONFIG = {"cfg.target_bits": "bits", "cfg.base_learning_rate": "base LR", "cfg.data_clusters": "data clusters",
              "cfg.parameter_clusters": "param clusters", "cfg.use_auxiliary_nn": "aux NN",
              "cfg.use_trust_region": "trust region", "cfg.max_steps": "max steps"}
RESULTS = ("final_loss", "val_loss", "val_ppl", "kl_teacher", "top1_agreement", "tokens_per_s")
STEP_METRICS = ("loss", "learning_rate", "lr_multiplier", "trust_radius", "constraint_rate", "update_magnitude",
                "gradient_magnitude", "quantization_error", "flip_rate", "tokens_per_s")
EVAL_PREFIX = "eval:"
SELECTED = "compare_selected"
RAW_LINES_UP_TO = 6    # more overlaid runs: smoothed lines only, or the chart becomes a blur (and slow to draw)

ui.page_header("Compare runs")
store = ui.open_store()
if store is None:
    st.stop()
show_archived = st.toggle("Show archived runs", key="compare_archived")
all_runs = ui.list_runs(store, include_archived=show_archived)
if all_runs.empty:
    st.info("No runs in this runs root yet. Start one on the **Configure** page.")
    st.stop()

# Colours follow creation order over all runs, so a run keeps its colour whatever else is selected.
colors = charts.run_colors(list(all_runs.sort_values("created_at").run_id))
labels = {row.run_id: queries.run_label(row._asdict()) for row in all_runs.itertuples()}
selected: set[str] = st.session_state.setdefault(SELECTED, set())
linked = [r for r in st.query_params.get("runs", "").split(",") if r in set(all_runs.run_id)]
if linked and ",".join(linked) != st.session_state.get("_runs_in_url"):   # ?runs=<id>,<id> links to a comparison
    selected.clear()
    selected.update(linked)
if not selected:
    selected.update(all_runs.run_id.head(min(2, len(all_runs))))

f1, f2, f3 = st.columns([2, 2, 2])
name_filter = f1.text_input("Filter by name", key="compare_filter_name", placeholder="part of the name or id")
all_tags = sorted({t for tags in all_runs.tags for t in (tags or [])})
tag_filter = f2.multiselect("Tags", all_tags, key="compare_filter_tags")
status_filter = f3.multiselect("Status", sorted(all_runs.status.unique()), key="compare_filter_status")
runs = all_runs
if name_filter.strip():
    needle = name_filter.strip().lower()
    runs = runs[runs.name.fillna("").str.lower().str.contains(needle, regex=False)
                | runs.run_id.str.lower().str.contains(needle, regex=False)]
if tag_filter:
    runs = runs[runs.tags.apply(lambda t: bool(set(t or []) & set(tag_filter)))]
if status_filter:
    runs = runs[runs.status.isin(status_filter)]


@st.cache_data(max_entries=512, show_spinner=False)
def kind_of(_store: RunStore, root: str, run_id: str) -> str:
    """hybrid or baseline (from the run's options; they never change, so cached for good)."""
    try:
        return "hybrid" if headline.is_hybrid(_store.get_run(run_id)) else "baseline"
    except StoreError:
        return "—"


def _number(value):
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else value


table = pd.DataFrame({
    "select": runs.run_id.isin(selected),
    "name": runs.name.fillna(runs.run_id),
    "status": runs.status,
    "kind": [kind_of(store, str(store.root), r) for r in runs.run_id],
    "created": pd.to_datetime(runs.created_at, unit="s"),
    "step": runs.step,
})
for col, label in KEY_CONFIG.items():
    if col in runs.columns:
        table[label] = runs[col].map(_number)
for key in RESULTS:
    col = f"final.{key}"
    if col in runs.columns:
        table[headline.value_label(key)] = pd.to_numeric(runs[col], errors="coerce")
table["tags"] = runs.tags.apply(lambda t: ", ".join(t or []))
table["notes"] = runs.notes.fillna("")
table["run id"] = runs.run_id
if "archived" in runs and show_archived:
    table["archived"] = runs.archived
table = table.reset_index(drop=True)

# The editor's edits are kept by row position; a new key whenever the list of runs changes avoids applying
# them to the wrong rows.
signature = hashlib.sha1("|".join(runs.run_id).encode()).hexdigest()[:10]
column_config = {"select": st.column_config.CheckboxColumn("✓", help="Compare this run", width="small"),
                 "created": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
                 "tags": st.column_config.TextColumn(help="comma-separated; saved to the store"),
                 "notes": st.column_config.TextColumn(help="saved to the store", width="large"),
                 "status": st.column_config.TextColumn(width="small"),
                 "base LR": st.column_config.NumberColumn(format="%.2e"),
                 headline.value_label("top1_agreement"): st.column_config.NumberColumn(format="percent"),
                 headline.value_label("tokens_per_s"): st.column_config.NumberColumn(format="localized")}
for key in ("final_loss", "val_loss", "kl_teacher"):
    column_config[headline.value_label(key)] = st.column_config.NumberColumn(format="%.4f")
column_config[headline.value_label("val_ppl")] = st.column_config.NumberColumn(format="%.2f")
column_config[headline.value_label("final_loss")] = st.column_config.NumberColumn(
    format="%.4f", help=headline.FINAL_LOSS_HELP)
edited = st.data_editor(
    table, key=f"runs_table.{signature}", hide_index=True, width="stretch",
    disabled=[c for c in table.columns if c not in ("select", "tags", "notes")], column_config=column_config)
st.caption(f"{len(runs)} of {len(all_runs)} run(s) shown. Click a column header to sort; "
           f"“{headline.FINAL_LOSS_LABEL}”: {headline.FINAL_LOSS_HELP[0].lower()}{headline.FINAL_LOSS_HELP[1:]} "
           "Tags and notes are saved as you edit them.")
visible = set(runs.run_id)
selected.difference_update(visible)
selected.update(edited.loc[edited["select"], "run id"])
for before, after in zip(table.itertuples(), edited.itertuples()):
    try:
        if after.tags != before.tags:
            store.set_tags(table.at[before.Index, "run id"], [t for t in after.tags.split(",")])
        if after.notes != before.notes:
            store.set_notes(table.at[before.Index, "run id"], after.notes)
    except StoreError as exc:
        st.error(str(exc))
chosen = [r for r in runs.run_id if r in selected]      # what the filters show is what is compared
# The URL names the comparison, so it can be bookmarked or sent.
st.query_params["runs"] = ",".join(chosen)
st.session_state["_runs_in_url"] = ",".join(chosen)
st.caption(f"{len(chosen)} run(s) selected.")
if not chosen:
    st.stop()
info = all_runs.set_index("run_id")


@st.cache_data(max_entries=256, show_spinner=False)
def series_of(_store: RunStore, root: str, run_id: str, last_step: int | None, status: str, metrics: tuple[str, ...],
              x: str, smoothing: float, max_points: int) -> dict[str, pd.DataFrame]:
    """One run's downsampled series of every chosen metric (step metrics from one read, evaluation metrics from
    another); cached until the run logs a new step (a finished run: for good). `root`, `last_step` and `status`
    are part of the cache key."""
    step_metrics = [m for m in metrics if not m.startswith(EVAL_PREFIX)]
    columns = sorted({"constraint_active" if m == "constraint_rate" else m for m in step_metrics})
    steps = queries.with_derived(queries.read_steps(_store, run_id, columns=columns))
    out = {m: queries.chart_series(steps, m, x, smoothing, max_points, run=run_id) for m in step_metrics}
    eval_keys = [m[len(EVAL_PREFIX):] for m in metrics if m.startswith(EVAL_PREFIX)]
    if eval_keys:
        evals = queries.read_evals(_store, run_id)
        t0 = float(steps.wall_time.iloc[0]) if len(steps) else None
        for key in eval_keys:
            out[EVAL_PREFIX + key] = queries.eval_series(evals, [key], run=run_id, x=x, t0=t0)
    return out


@st.cache_data(max_entries=64, show_spinner=False)
def eval_keys_of(_store: RunStore, root: str, run_ids: tuple[str, ...], marks: tuple) -> list[str]:
    keys: set[str] = set()
    for run_id in run_ids:
        evals = queries.read_evals(_store, run_id)
        keys.update(evals.key.unique() if len(evals) else [])
    return sorted(keys)


def _metric_label(metric: str) -> str:
    key = metric[len(EVAL_PREFIX):] if metric.startswith(EVAL_PREFIX) else metric
    return charts.series_name(key)


eval_keys = eval_keys_of(store, str(store.root), tuple(chosen),
                         tuple(str(info.at[r, "step"]) + info.at[r, "status"] for r in chosen))
named_evals = [k for k in eval_keys if not k.startswith("val_loss_cluster_")]
options = [*(EVAL_PREFIX + k for k in named_evals), *STEP_METRICS,
           *(EVAL_PREFIX + k for k in eval_keys if k.startswith("val_loss_cluster_"))]
default_metrics = [m for m in (EVAL_PREFIX + "val_loss", "loss") if m in options]
c1, c2, c3 = st.columns([3, 1.5, 1])
if any(m not in options for m in st.session_state.get("compare_metrics", [])):
    st.session_state["compare_metrics"] = [m for m in st.session_state["compare_metrics"] if m in options]
metrics = c1.multiselect("Curves (any logged metric; evaluation metrics first)", options, default=default_metrics,
                         key="compare_metrics", format_func=_metric_label)
smoothing = c2.slider("Smoothing (EMA)", 0.0, 0.99, queries.DEFAULT_SMOOTHING, 0.01, key="compare_smoothing",
                      help="Applies to per-step metrics; evaluation points are drawn as logged.")
x_axis = c3.radio("x axis", ("step", "wall time"), horizontal=True, key="compare_x")
# Many runs share a chart's drawing budget, so the browser stays responsive; never more than MAX_POINTS.
max_points = max(500, min(queries.MAX_POINTS, 20_000 // max(1, len(chosen))))
show_raw = len(chosen) <= RAW_LINES_UP_TO
st.caption(f"At most {max_points:,} points per series here (min/max per bucket; fewer when many runs are "
           "overlaid); smoothing uses every point."
           + ("" if show_raw else f" Faint raw lines are drawn for up to {RAW_LINES_UP_TO} runs."))
x_col, x_title = ("step", "step") if x_axis == "step" else ("time_s", "seconds since the run's first step")
started = time.perf_counter()
per_run = {r: series_of(store, str(store.root), r, None if pd.isna(info.at[r, "step"]) else int(info.at[r, "step"]),
                        info.at[r, "status"], tuple(metrics), x_col,
                        smoothing, max_points) for r in chosen}
grid = st.columns(2)
for i, metric in enumerate(metrics):
    parts = [per_run[r][metric] for r in chosen if not per_run[r][metric].empty]
    series = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if metric.startswith(EVAL_PREFIX) and not series.empty:
        series = series.assign(smooth=series.raw)        # evaluations: the logged values, not smoothed
    title = _metric_label(metric)
    with grid[i % 2]:
        log_y = st.toggle("log y", key=f"compare_logy.{metric}")
        st.plotly_chart(charts.line_figure(series, title[0].upper() + title[1:], x_title=x_title, log_y=log_y,
                                           colors=colors, labels=labels, y_title=title,
                                           uirevision=f"compare:{metric}:{x_col}:{log_y}", color_by="run",
                                           raw=show_raw),
                        key=f"compare_chart.{metric}", config={"displaylogo": False})
st.caption(f"curves of {len(chosen)} run(s) prepared in {time.perf_counter() - started:.2f} s")

st.subheader("Config vs result")
if len(chosen) < 2:
    st.caption("Select two or more runs to see how their configs relate to their results.")
else:
    frame = info.loc[chosen].copy()
    frame["kind"] = [kind_of(store, str(store.root), r) for r in chosen]
    config_cols = [c for c in frame.columns if c.startswith("cfg.")]
    dims = [("kind", "kind")] + [(c, c[4:], "learning_rate" in c or "radius" in c) for c in config_cols]
    result = "final.val_loss" if "final.val_loss" in frame else "final.final_loss"
    dims += [(f"final.{k}", headline.value_label(k)) for k in RESULTS if f"final.{k}" in frame]
    st.plotly_chart(charts.parallel_coordinates(frame.reset_index(), dims, color=result,
                                                color_title=headline.value_label(result[6:])),
                    key="compare_parcoords", config={"displaylogo": False})
    st.caption("One line per run; only fields that differ get an axis. Drag along an axis to filter.")

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
