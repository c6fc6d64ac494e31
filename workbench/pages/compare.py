"""Compare runs: a run table (status, preset, key config, final metrics, editable tags and notes) with a query and
selection; overlaid curves of the selected runs — one colour per run, or one line per group (median or mean over
its runs with a min–max or ± std band) — that refresh incrementally while a run trains; parallel coordinates of
config vs result; config diff; metrics CSV; archive/delete. Chart choice, smoothing, axes and grouping live in
session state and in the URL, so a comparison can be bookmarked or sent."""
from __future__ import annotations

import hashlib
import html
import math
import threading
import time
from collections import OrderedDict

import numpy as np
import pandas as pd
import streamlit as st

from hybrid_optimization.tracking import ACTIVE_STATUSES, STEP_COLUMNS, RunStore, StoreError
from workbench import charts, headline, queries, ui

# The run table's columns: store column -> what the user reads. Metric columns come from the run's summary (or
# its latest evaluation while it trains): one definition each (workbench/headline.py).
KEY_CONFIG = {"cfg.target_bits": "bits", "cfg.base_learning_rate": "base LR", "cfg.data_clusters": "data clusters",
              "cfg.parameter_clusters": "param clusters", "cfg.use_auxiliary_nn": "aux NN",
              "cfg.use_trust_region": "trust region", "cfg.max_steps": "max steps"}
RESULTS = ("final_loss", "val_loss", "val_ppl", "kl_teacher", "top1_agreement", "tokens_per_s")
COLUMN_HELP = {"final_loss": headline.FINAL_LOSS_HELP,
               "teacher_val_loss": "The teacher's own loss on the same validation windows as the student: the "
                                   "reference the student is distilled towards (dashed on the validation-loss chart).",
               "teacher_gap": "Validation loss (quantized) − the teacher's validation loss; the latest evaluation "
                              "while a run trains."}
TEACHER_CHARTS = ("eval:val_loss", "eval:val_loss_fp")   # the charts that get the teacher's dashed reference line
STEP_METRICS = ("loss", "learning_rate", "lr_multiplier", "trust_radius", "constraint_rate", "update_magnitude",
                "gradient_magnitude", "quantization_error", "flip_rate", "tokens_per_s")
EVAL_PREFIX = queries.EVAL_PREFIX
SELECTED = "compare_selected"
CACHES = "compare_caches"       # run id -> queries.RunCache: what this session has read of each run
MEMOS = "compare_memos"         # metric -> the groups and the figure last drawn from this session's series
DIFF_UP_TO = 20       # config diff columns (one per run)
CSV_AT_ONCE_ROWS = 50_000   # a larger selection's CSV is built on request ("Prepare"), not on every render
RAW_LINES_UP_TO = 6    # more overlaid runs: smoothed lines only, or the chart becomes a blur (and slow to draw)
X_AXES = ("step", "wall time")
LAYOUTS = ("separate", "linked")     # linked: one figure, the charts share zoom, pan and hover
ROWS = ("runs", "groups")
# Widget key -> URL parameter; the URL is written from the widgets on every run and read once per session.
URL_KEYS = {"compare_metrics": "metrics", "compare_smoothing": "smooth", "compare_x": "x", "compare_group": "group",
            "compare_stat": "stat", "compare_band": "band", "compare_rows": "rows", "compare_query": "q",
            "compare_xmin": "xmin", "compare_xmax": "xmax", "compare_logy": "logy", "compare_layout": "layout"}

ui.page_header("Compare runs")
store = ui.open_store()
if store is None:
    st.stop()
show_archived = st.toggle("Show archived runs", key="compare_archived")
all_runs = ui.list_runs(store, include_archived=show_archived)
if all_runs.empty:
    st.info("No runs in this runs root yet. Start one on the **Configure** page.")
    st.stop()


def _from_url() -> None:
    """Restore the view from the URL (a bookmark or a sent link) once per session, or when the link changes."""
    params = {k: st.query_params.get(k) for k in URL_KEYS.values() if st.query_params.get(k) is not None}
    signature = repr(sorted(params.items()))
    if not params or signature == st.session_state.get("_compare_url"):
        return
    st.session_state["_compare_url"] = signature
    state = st.session_state
    ignored: list[tuple[str, str, str]] = []        # (parameter, value, why): said in one line below

    def number(param: str, low: float | None = None, high: float | None = None) -> float | None:
        try:
            value = float(params[param])
        except ValueError:
            value = float("nan")
        if not math.isfinite(value):
            ignored.append((param, params[param], "not a number"))
            return None
        return min(high, max(low, value)) if low is not None and high is not None else value

    if "metrics" in params:
        state["compare_metrics"] = [m for m in params["metrics"].split(",") if m]
        # Which of them the chosen runs logged is known only below, once runs are chosen: judged there, in one line.
        state["_compare_link_metrics"] = {"metrics": state["compare_metrics"]}
    if "smooth" in params and (smooth := number("smooth", 0.0, 0.99)) is not None:
        state["compare_smoothing"] = smooth
    for param, key, choices in (("x", "compare_x", X_AXES), ("stat", "compare_stat", queries.GROUP_STATS),
                                ("band", "compare_band", queries.GROUP_BANDS), ("rows", "compare_rows", ROWS),
                                ("layout", "compare_layout", LAYOUTS)):
        if param in params:
            if params[param] in choices:
                state[key] = params[param]
            else:
                ignored.append((param, params[param], f"it is one of {', '.join(choices)}"))
    if "group" in params:
        group = params["group"]
        if group in (queries.NO_GROUP, *queries.GROUP_SPECIAL) or (group.startswith("cfg.") and len(group) > 4):
            state["compare_group"] = group      # a cfg. field that does not vary now is kept: it may vary again
        else:
            ignored.append(("group", group, f"it is one of {', '.join((queries.NO_GROUP, *queries.GROUP_SPECIAL))} "
                                            "or a config field cfg.NAME"))
    if "q" in params:
        state["compare_query"] = params["q"]
    for key in ("xmin", "xmax"):
        if key in params:
            state[f"compare_{key}"] = number(key) if params[key] else None
    if "logy" in params:
        state["compare_logy"] = [m for m in params["logy"].split(",") if m]
        state.setdefault("_compare_link_metrics", {})["logy"] = state["compare_logy"]
    if ignored:
        param, value, why = ignored[0]
        more = f" (and {len(ignored) - 1} more parameter(s) of this link)" if len(ignored) > 1 else ""
        ui.ignored_link(param, value, why + more)


def _to_url(values: dict) -> None:
    for key, param in URL_KEYS.items():
        value = values.get(key)
        if value is None or value == "" or value == []:
            st.query_params.pop(param, None)
        else:
            st.query_params[param] = ",".join(value) if isinstance(value, list) else str(value)
    # What this page wrote is not a new link: the next run must not "restore" it over the user's next change.
    params = {k: st.query_params.get(k) for k in URL_KEYS.values() if st.query_params.get(k) is not None}
    st.session_state["_compare_url"] = repr(sorted(params.items()))


_from_url()
# Colours follow creation order over all runs, so a run keeps its colour whatever else is selected.
colors = charts.run_colors(list(all_runs.sort_values("created_at").run_id))
labels = {row.run_id: queries.run_label(row._asdict()) for row in all_runs.itertuples()}   # charts escape them
selected: set[str] = st.session_state.setdefault(SELECTED, set())
linked = [r for r in st.query_params.get("runs", "").split(",") if r in set(all_runs.run_id)]
unknown = [r for r in st.query_params.get("runs", "").split(",") if r and r not in set(all_runs.run_id)]
if unknown and st.query_params.get("runs") != st.session_state.get("_runs_in_url"):
    ui.ignored_link("runs", ",".join(unknown), f"no run with {'this id' if len(unknown) == 1 else 'these ids'} here")
if linked and ",".join(linked) != st.session_state.get("_runs_in_url"):   # ?runs=<id>,<id> links to a comparison
    selected.clear()
    selected.update(linked)
if not selected and not st.session_state.get("compare_cleared"):
    selected.update(all_runs.run_id.head(min(2, len(all_runs))))


@st.cache_resource(show_spinner=False)
def server_memo() -> dict:
    """One dict per server, shared by every session: a run's kind, and the rows of runs that no longer train.
    One lookup per run instead of one st.cache_* call per run (hashing the arguments of 100 calls cost more than
    the lookups)."""
    return {"kinds": {}, "finished": OrderedDict(), "lock": threading.Lock()}


def kind_of(_store: RunStore, root: str, run_id: str) -> str:
    """hybrid or baseline (from the run's options; they never change, so remembered for good)."""
    kinds = server_memo()["kinds"]
    kind = kinds.get((root, run_id))
    if kind is None:
        try:
            kind = kinds[(root, run_id)] = "hybrid" if headline.is_hybrid(_store.get_run(run_id)) else "baseline"
        except StoreError:
            return "—"
    return kind


f1, f2, f3 = st.columns([2, 2, 2])
name_filter = f1.text_input("Filter by name", key="compare_filter_name", placeholder="part of the name or id")
all_tags = sorted({t for tags in all_runs.tags for t in (tags or [])})
tag_filter = f2.multiselect("Tags", all_tags, key="compare_filter_tags")
status_filter = f3.multiselect("Status", sorted(all_runs.status.unique()), key="compare_filter_status")
query_text = st.text_input(
    "Query", key="compare_query", placeholder='e.g. val_loss < 4.1 and trust_region_mode == "relative"',
    help="A pandas query over the run table: config fields and results by name (val_loss, base_learning_rate, "
         "trust_region_mode, kind, status, name, tags); text in quotes; and / or / not; = is read as ==.")
runs = all_runs
if name_filter.strip():
    needle = name_filter.strip().lower()
    runs = runs[runs.name.fillna("").str.lower().str.contains(needle, regex=False)
                | runs.run_id.str.lower().str.contains(needle, regex=False)]
if tag_filter:
    runs = runs[runs.tags.apply(lambda t: bool(set(t or []) & set(tag_filter)))]
if status_filter:
    runs = runs[runs.status.isin(status_filter)]
kinds = {r: kind_of(store, str(store.root), r) for r in runs.run_id}
if query_text.strip():
    try:
        runs = runs[queries.query_runs(queries.query_frame(runs, kinds), query_text)]
    except queries.QueryError as exc:
        st.error(ui.plain(exc), icon=":material/error:")

# -- grouping ---------------------------------------------------------------------------------------------------------
varying = [c for c in runs.columns if c.startswith("cfg.")
           and runs[c].map(lambda v: repr(v)).nunique() > 1]
group_options = [queries.NO_GROUP, *queries.GROUP_SPECIAL, *varying]
if st.session_state.get("compare_group") not in (None, *group_options):
    group_options.append(st.session_state["compare_group"])      # from a link: keep it, it may vary again
g1, g2, g3, g4 = st.columns([2, 1, 1, 1])
group_by = g1.selectbox("Group runs by", group_options, key="compare_group",
                        format_func=lambda o: o[4:] if o.startswith("cfg.") else o,
                        help="One line per group: the median or mean over its runs with a shaded band, the number "
                             "of runs in the legend (e.g. seeds of one config). Any config field, tag or sweep.")
stat = g2.radio("Line", queries.GROUP_STATS, key="compare_stat", horizontal=True, disabled=group_by == queries.NO_GROUP)
band = g3.radio("Band", queries.GROUP_BANDS, key="compare_band", horizontal=True,
                disabled=group_by == queries.NO_GROUP)
rows_as = g4.radio("Table rows", ROWS, key="compare_rows", horizontal=True, disabled=group_by == queries.NO_GROUP)
grouped = group_by != queries.NO_GROUP
groups = queries.group_labels(runs, group_by, kinds) if grouped else {}

# -- the run table ----------------------------------------------------------------------------------------------------
table = pd.DataFrame({
    "select": runs.run_id.isin(selected),
    "name": runs.name.fillna(runs.run_id),
    "status": runs.status,
    "kind": [kinds[r] for r in runs.run_id],
    "created": pd.to_datetime(runs.created_at, unit="s"),
    "step": runs.step,
})
if grouped:
    table.insert(1, "group", [groups[r] for r in runs.run_id])
for col, label in KEY_CONFIG.items():
    if col in runs.columns:
        values = runs[col]
        # Numbers stay numbers (sortable); switches and text become text; a missing value is an empty cell.
        table[label] = (pd.to_numeric(values, errors="coerce") if values.map(
            lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))).all()
            else values.map(queries.display_text))
result_columns = []
for key in RESULTS:
    col = f"final.{key}"
    if col in runs.columns:
        scale, fmt = queries.column_format(headline.VALUE_LABELS[key][1])
        values = pd.to_numeric(runs[col], errors="coerce") * scale
        table[headline.value_label(key)] = values.round(0) if fmt == "localized" else values
        result_columns.append(key)
# The teacher's own loss on the student's validation windows, and the student's gap to it (issue 16): the gap
# from the latest validation loss, so a run still training has one too. Runs from before the teacher reference
# (no value) leave both cells empty.
teacher_loss = (pd.to_numeric(runs["teacher_val_loss"], errors="coerce") if "teacher_val_loss" in runs.columns
                else pd.Series(float("nan"), index=runs.index))
if teacher_loss.notna().any():
    student_loss = (pd.to_numeric(runs["final.val_loss"], errors="coerce") if "final.val_loss" in runs.columns
                    else float("nan"))
    table[headline.value_label("teacher_val_loss")] = teacher_loss
    table[headline.value_label("teacher_gap")] = student_loss - teacher_loss
    result_columns += ["teacher_val_loss", "teacher_gap"]
table["tags"] = runs.tags.apply(lambda t: ", ".join(t or []))
table["notes"] = runs.notes.fillna("")
table["run id"] = runs.run_id
if "archived" in runs and show_archived:
    table["archived"] = runs.archived
table = table.reset_index(drop=True)

column_config = {"select": st.column_config.CheckboxColumn("✓", help="Compare this run", width="small"),
                 "created": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
                 "tags": st.column_config.TextColumn(help="comma-separated; saved to the store"),
                 "notes": st.column_config.TextColumn(help="saved to the store", width="large"),
                 "status": st.column_config.TextColumn(width="small"),
                 "base LR": st.column_config.NumberColumn(format="%.3g")}
for key in result_columns:      # one format per number: Summary's (headline.VALUE_LABELS)
    column_config[headline.value_label(key)] = st.column_config.NumberColumn(
        format=queries.column_format(headline.VALUE_LABELS[key][1])[1],
        help=COLUMN_HELP.get(key))

s1, s2, _ = st.columns([1, 1, 4])
if s1.button("Select all shown", key="compare_select_all", icon=":material/select_all:"):
    selected.update(runs.run_id)
    st.rerun()
if s2.button("Clear selection", key="compare_select_none", icon=":material/deselect:"):
    selected.clear()
    st.session_state["compare_cleared"] = True      # not the "newest two" fallback of a first visit
    st.rerun()
if grouped and rows_as == "groups":
    numeric = [headline.value_label(k) for k in result_columns]
    shown_groups = queries.group_table(table, groups, numeric, stat)
    st.dataframe(shown_groups, hide_index=True, width="stretch", key="compare_groups_table",
                 column_config={k: v for k, v in column_config.items() if k in shown_groups.columns})
    st.caption(f"{len(shown_groups)} group(s) of {len(runs)} run(s); each number is the {stat} over the group's "
               "runs. Switch the table rows to *runs* to change the selection.")
    edited = table
else:
    # The editor's edits are kept by row position; a new key whenever the list of runs changes avoids applying
    # them to the wrong rows.
    signature = hashlib.sha1("|".join(runs.run_id).encode()).hexdigest()[:10]
    edited = st.data_editor(
        table, key=f"runs_table.{signature}", hide_index=True, width="stretch",
        disabled=[c for c in table.columns if c not in ("select", "tags", "notes")], column_config=column_config)
    st.caption(f"{len(runs)} of {len(all_runs)} run(s) shown. Click a column header to sort; "
               f"“{headline.FINAL_LOSS_LABEL}”: {headline.FINAL_LOSS_HELP[0].lower()}{headline.FINAL_LOSS_HELP[1:]} "
               "Tags and notes are saved as you edit them.")
    selected.difference_update(set(runs.run_id))
    selected.update(edited.loc[edited["select"], "run id"])
    for before, after in zip(table.itertuples(), edited.itertuples()):
        # A cleared cell comes back as None (or NaN): no text.
        tags, notes = (v if isinstance(v, str) else "" for v in (after.tags, after.notes))
        try:
            if tags != before.tags:
                store.set_tags(table.at[before.Index, "run id"], tags.split(","))
            if notes != before.notes:
                store.set_notes(table.at[before.Index, "run id"], notes)
        except (StoreError, ValueError) as exc:     # ValueError: a tag or note over its bound, in one line
            st.error(ui.plain(exc))
chosen = [r for r in runs.run_id if r in selected]      # what the filters show is what is compared
if chosen:
    st.session_state.pop("compare_cleared", None)
# The URL names the comparison, so it can be bookmarked or sent.
st.query_params["runs"] = ",".join(chosen)
st.session_state["_runs_in_url"] = ",".join(chosen)
st.caption(f"{len(chosen)} run(s) selected" + (f" in {len(set(groups[r] for r in chosen))} group(s)." if grouped
                                                else "."))
info = all_runs.set_index("run_id")

# -- curves -------------------------------------------------------------------------------------------------------------
caches: dict[str, queries.RunCache] = st.session_state.setdefault(CACHES, {})


FINISHED_KEPT = 1024     # finished runs whose rows the server keeps (oldest use dropped first)


def finished_run(_store: RunStore, root: str, run_id: str, step: int | None, status: str,
                 columns: tuple[str, ...]) -> queries.RunCache:
    """A run that no longer trains, read once for every session of this server (a reload, a second tab): its
    rows cannot change while its step and status stay what they are, and both are part of the key."""
    memo = server_memo()
    kept: OrderedDict = memo["finished"]
    key = (root, run_id)
    with memo["lock"]:
        hit = kept.get(key)
        if hit is not None and hit[0] == (step, status, columns):
            kept.move_to_end(key)
            return hit[1]
    cache = queries.RunCache(run_id)
    cache.refresh(_store, {"status": status}, columns=columns, log_lines=0)
    with memo["lock"]:
        kept[key] = ((step, status, columns), cache)
        while len(kept) > FINISHED_KEPT:
            kept.popitem(last=False)
    return cache


def refresh(run_ids: list[str], columns: tuple[str, ...], runs_now: dict[str, dict], live: bool = True) -> int:
    """Bring each run's cache up to date, reading only rows newer than its step cursor; a finished run comes from
    the server-wide cache (read once) and is not read again, and live=False leaves running runs to the refreshing
    fragment. Returns how many runs were read by this session."""
    read = 0
    for run_id in run_ids:
        run = runs_now[run_id]
        status = run.get("status")
        cache = caches.get(run_id)
        if status not in ACTIVE_STATUSES:
            if cache is None or cache.status != status or not set(columns) <= set(cache.columns):
                step = run.get("step")
                caches[run_id] = finished_run(store, str(store.root), run_id,
                                              None if step is None or pd.isna(step) else int(step), status,
                                              tuple(c for c in STEP_COLUMNS if c in set(columns)))
            continue
        if cache is None or (cache.status is not None and cache.status not in ACTIVE_STATUSES):
            # Never refresh the server-wide object of a finished run in place: a resumed run gets this session's own.
            cache = caches[run_id] = queries.RunCache(run_id)
        needs = cache.reads == 0 or live or not set(columns) <= set(cache.columns)
        if needs:
            cache.refresh(store, run, columns=columns, log_lines=0)
            read += 1
    return read


def _metric_label(metric: str) -> str:
    key = metric[len(EVAL_PREFIX):] if metric.startswith(EVAL_PREFIX) else metric
    return charts.series_name(key)


if chosen:
    st.subheader("Curves")
    base_runs = {r: {"status": info.at[r, "status"], "step": info.at[r, "step"],
                     "teacher_val_loss": info.at[r, "teacher_val_loss"] if "teacher_val_loss" in info else None}
                 for r in chosen}
    refresh(chosen, queries.step_columns_for(st.session_state.get("compare_metrics") or ["loss"]), base_runs,
            live=False)
    eval_keys = sorted(set().union(*(queries.logged_eval_keys(caches[r]) for r in chosen)))
    named_evals = [k for k in eval_keys if not k.startswith("val_loss_cluster_")]
    options = [*(EVAL_PREFIX + k for k in named_evals), *STEP_METRICS,
               *(EVAL_PREFIX + k for k in eval_keys if k.startswith("val_loss_cluster_"))]
    default_metrics = [m for m in (EVAL_PREFIX + "val_loss", "loss") if m in options]
    # Widget values live in session state (set here, from the URL or by the user), never as widget defaults too.
    state = st.session_state
    state["compare_metrics"] = [m for m in state.get("compare_metrics", default_metrics) if m in options]
    state.setdefault("compare_smoothing", queries.DEFAULT_SMOOTHING)
    state["compare_logy"] = [m for m in state.get("compare_logy", []) if m in state["compare_metrics"]]
    # A link's metric that none of the chosen runs logged is dropped from the view, and said once (never silently).
    link_metrics = state.pop("_compare_link_metrics", {})
    dropped = {param: [m for m in names if m not in options] for param, names in link_metrics.items()}
    dropped = {param: names for param, names in dropped.items() if names}
    if dropped:
        param, names = next(iter(dropped.items()))
        more = " (and the link's logy too)" if len(dropped) > 1 else ""
        ui.ignored_link(param, ",".join(names), "none of the chosen runs logged "
                        + ("it" if len(names) == 1 else "them") + "; the metrics here are "
                        + ", ".join(options[:8]) + (", …" if len(options) > 8 else "") + more)
    c1, c2, c3 = st.columns([3, 1.5, 1])
    metrics = c1.multiselect("Curves (any logged metric; evaluation metrics first)", options,
                             key="compare_metrics", format_func=_metric_label)
    smoothing = c2.slider("Smoothing (EMA)", 0.0, 0.99, step=0.01, key="compare_smoothing",
                          help="Applies to per-step metrics; evaluation points are drawn as logged.")
    x_axis = c3.radio("x axis", X_AXES, horizontal=True, key="compare_x")
    r1, r2, r3, r4 = st.columns([1, 1, 2, 1.2])
    x_min = r1.number_input("x from", value=None, key="compare_xmin", placeholder="auto",
                            help="One x range for every chart on this page (empty: all).")
    x_max = r2.number_input("x to", value=None, key="compare_xmax", placeholder="auto")
    log_y_metrics = r3.multiselect("log y", metrics, key="compare_logy", format_func=_metric_label)
    layout = r4.radio("Charts", LAYOUTS, key="compare_layout", horizontal=True,
                      help="linked: the charts are stacked in one figure with one x axis — zoom, pan and hover "
                           "move together in all of them.")
    x_range = None
    if x_min is not None or x_max is not None:
        x_range = (x_min, x_max)
        if x_min is not None and x_max is not None and x_min >= x_max:
            st.error(f"x range {x_min:g}–{x_max:g} is invalid: “x from” must be below “x to”.")
            x_range = None
    _to_url({"compare_metrics": metrics, "compare_smoothing": smoothing, "compare_x": x_axis,
             "compare_group": None if group_by == queries.NO_GROUP else group_by, "compare_stat": stat,
             "compare_band": band, "compare_rows": rows_as, "compare_query": query_text.strip(),
             "compare_xmin": x_min, "compare_xmax": x_max, "compare_logy": log_y_metrics,
             "compare_layout": None if layout == LAYOUTS[0] else layout})
    # Many runs share a chart's drawing budget, so the browser stays responsive; never more than MAX_POINTS.
    max_points = max(500, min(queries.MAX_POINTS, 20_000 // max(1, len(chosen))))
    show_raw = len(chosen) <= RAW_LINES_UP_TO and not grouped
    x_col, x_title = ("step", "step") if x_axis == "step" else ("time_s", "seconds since the run's first step")
    active = [r for r in chosen if info.at[r, "status"] in ACTIVE_STATUSES]
    st.caption(f"At most {max_points:,} points per series here (min/max per bucket; fewer when many runs are "
               "overlaid); smoothing uses every point."
               + ("" if show_raw or grouped else f" Faint raw lines are drawn for up to {RAW_LINES_UP_TO} runs.")
               + (f" {len(active)} run(s) training: refreshed every {queries.DEFAULT_REFRESH_S} s, reading only "
                  "their new rows." if active else ""))
    group_colors = {g: charts.color_for(i) for i, g in enumerate(sorted(set(groups.values())))} if grouped else {}

    def _teacher_lines(data: list[pd.DataFrame], teacher: dict[str, float]) -> list[dict]:
        """Dashed horizontal lines at each run's teacher validation loss (grouped: the median over the group's
        runs), in the run's (group's) colour over its x span; one legend entry toggles them all."""
        lines = []      # (label, y, x0, x1, color)
        if grouped:
            frame = data[0]
            names, xs = frame.group.to_numpy(dtype=object), frame.x.to_numpy(dtype="float64")
            for group in dict.fromkeys(names):
                values = [teacher[r] for r in chosen if groups.get(r) == group and r in teacher]
                if values:
                    span = xs[names == group]
                    lines.append((group, float(np.median(values)), span.min(), span.max(), group_colors.get(group)))
        else:
            for part in data:
                run = part["run"].array[0]
                if run in teacher:
                    lines.append((labels.get(run, run), teacher[run], part.x.min(), part.x.max(), colors.get(run)))
        traces = []
        for i, (label, y, x0, x1, color) in enumerate(lines):
            text = html.escape(str(label), quote=False)          # a run name is the user's text: never markup
            traces.append(dict(type="scatter", x=[x0, x1], y=[y, y], mode="lines", legendgroup="teacher",
                               name="Teacher's validation loss (dashed)" if i == 0 else f"{text} · teacher",
                               showlegend=i == 0, line=dict(color=color, width=1.5, dash="dash"),
                               hovertemplate=f"{text}: teacher %{{y:.4f}}<extra></extra>"))
        return traces

    @st.fragment(run_every=queries.DEFAULT_REFRESH_S if active else None)
    def curves() -> None:
        started, cpu_started = time.perf_counter(), time.thread_time()
        runs_now = dict(base_runs)
        still_active = []
        for run_id in active:        # the runs that train: their status and step now (one row each)
            try:
                run = store.get_run(run_id)
            except StoreError:
                continue
            runs_now[run_id] = run
            if run.get("status") in ACTIVE_STATUSES:
                still_active.append(run_id)
        read = refresh(chosen, queries.step_columns_for(metrics), runs_now)
        # A run records its teacher's loss at set-up, so a run that just started may have it only now.
        teacher = {r: float(v) for r in chosen if not queries._missing(v := runs_now[r].get("teacher_val_loss"))}
        grid = st.columns(2)
        panels = []         # linked layout: (metric, data, charts.Panel) per chart
        memos = st.session_state.setdefault(MEMOS, {})
        if sum(len(m["groups"]) for m in memos.values()) > 2000:      # old group labels pile up: start over
            memos.clear()
        for i, metric in enumerate(metrics):
            # run_series returns the same object until its run has new rows, so after a tick only the moved runs
            # (and their groups) are recomputed, and an unchanged chart reuses its figure.
            parts = [queries.run_series(caches[r], metric, x_col, smoothing, max_points) for r in chosen]
            parts = [p for p in parts if not p.empty]
            memo = memos.setdefault(metric, {"groups": {}, "figure": None})
            title = _metric_label(metric)
            log_y = metric in log_y_metrics
            if grouped:
                data = [queries.group_series(parts, groups, stat, band, memo=memo["groups"])]
                view = ("groups", title, x_title, log_y, x_range, stat, band, group_by,
                        tuple(sorted(group_colors.items())))
            else:
                data = parts
                view = ("runs", title, x_title, log_y, x_range, show_raw, tuple(labels[r] for r in chosen),
                        tuple(colors[r] for r in chosen))
            if metric in TEACHER_CHARTS:
                view += (tuple(sorted(teacher.items())),)
            if layout == "linked":          # one stacked figure of every chart, built below
                panels.append((metric, data, charts.Panel(
                    title=title[0].upper() + title[1:], series=None if grouped else (
                        pd.concat(parts, ignore_index=True) if parts else None),
                    groups=data[0] if grouped else None, y_title=title, log_y=log_y)))
                continue
            previous = memo["figure"]
            if (previous is not None and previous[0] == view and len(previous[1]) == len(data)
                    and all(a is b for a, b in zip(previous[1], data))):
                fig = previous[2]
            else:
                if grouped:
                    fig = charts.group_figure(data[0], title[0].upper() + title[1:], x_title=x_title, log_y=log_y,
                                              colors=group_colors, y_title=title, x_range=x_range, stat=stat,
                                              band=band, uirevision=f"compare:{metric}:{x_col}:{log_y}:{group_by}")
                else:
                    series = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
                    fig = charts.line_figure(series, title[0].upper() + title[1:], x_title=x_title, log_y=log_y,
                                             colors=colors, labels=labels, y_title=title, x_range=x_range,
                                             uirevision=f"compare:{metric}:{x_col}:{log_y}", color_by="run",
                                             raw=show_raw)
                if metric in TEACHER_CHARTS and teacher:
                    fig.add_traces(_teacher_lines(data, teacher))
                memo["figure"] = (view, tuple(data), fig)
            with grid[i % 2]:
                st.plotly_chart(fig, key=f"compare_chart.{metric}", config={"displaylogo": False})
        if layout == "linked" and panels:
            # Every chart on ONE x axis (charts.stacked_figure): zoom and pan move all of them, and one hover line
            # reads every chart at that x (plotly's hoversubplots spans subplots of the same axis only).
            fig = charts.stacked_figure([panel for _, _, panel in panels], x_title=x_title, colors=colors,
                                        labels=labels, group_colors=group_colors, stat=stat, band=band,
                                        uirevision=f"compare:linked:{x_col}:{group_by}")
            legend_shown = False
            for row, (metric, data, panel) in enumerate(panels):
                if metric in TEACHER_CHARTS and teacher:
                    lines = [dict(line, xaxis="x", yaxis="y" if row == 0 else f"y{row + 1}", meta=panel.title,
                                  showlegend=line["showlegend"] and not legend_shown)
                             for line in _teacher_lines(data, teacher)]
                    legend_shown = legend_shown or bool(lines)
                    fig.add_traces(lines)
            if x_range is not None:
                fig.update_xaxes(**charts.x_range_settings(x_range))
            st.plotly_chart(fig, key="compare_chart.linked", config={"displaylogo": False})
        elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
        st.session_state["compare_tick"] = {"seconds": elapsed, "cpu_seconds": cpu, "runs_read": read,
                                            "runs": len(chosen), "at": time.time()}
        st.caption(f"curves of {len(chosen)} run(s) prepared in {elapsed:.2f} s ({cpu:.2f} s CPU; {read} run(s) "
                   "read" + (", new rows only" if active else "") + ")")
        if active and not still_active:      # every run finished: one full rerun stops the timer
            st.rerun()

    curves()

    st.subheader("Config vs result")
    if len(chosen) < 2:
        st.caption("Select two or more runs to see how their configs relate to their results.")
    else:
        frame = info.loc[chosen].copy()
        frame["kind"] = [kinds.get(r, kind_of(store, str(store.root), r)) for r in chosen]
        config_cols = [c for c in frame.columns if c.startswith("cfg.")]
        result = "final.val_loss" if "final.val_loss" in frame else "final.final_loss"
        dims = [("kind", "kind")] + charts.config_axes(frame, config_cols,
                                                       log_if=lambda c: "learning_rate" in c or "radius" in c)
        dims.append((result, headline.value_label(result[6:])))
        st.plotly_chart(charts.parallel_coordinates(frame.reset_index(), dims, color=result, title=None,
                                                    color_title=headline.value_label(result[6:])),
                        key="compare_parcoords", config={"displaylogo": False})
        st.caption("One line per run: the hybrid/baseline split, the numeric config fields that differ between the "
                   "selected runs, and the result. Drag along an axis to filter.")

    st.subheader("Config diff")
    # From the run table's cfg.* columns: no extra query per run. A column per run: readable for a few runs only.
    if len(chosen) > DIFF_UP_TO:
        st.caption(f"{len(chosen)} runs selected: the diff shows up to {DIFF_UP_TO} (a column per run); group them "
                   "above, or narrow the selection.")
    cfg_columns = [c for c in info.columns if c.startswith("cfg.")]
    diffed = chosen[:DIFF_UP_TO]
    configs = info.loc[diffed, cfg_columns].to_dict("index")       # one conversion, not a lookup per cell
    details = {labels[r]: {"preset": info.at[r, "preset"],
                           "config": {c[4:]: v for c, v in configs[r].items() if not queries._missing(v)}}
               for r in diffed}
    diff = queries.config_diff(details).map(queries.display_text)
    if len(details) < 2:
        st.caption("Select two or more runs to see what differs; the selected run's config:")
        st.dataframe(diff, width="stretch")
    elif diff.empty:
        st.success("The selected runs have identical configs and presets.")
    else:
        st.dataframe(diff, width="stretch")

st.subheader("Export and housekeeping")
if not chosen:
    st.caption("Select runs in the table to export, archive or delete them.")
    st.stop()
d1, d2, d3 = st.columns(3)
# The file is built before its button renders (a deferred build can vanish in a rerun and deliver nothing): at
# once for a small selection, after "Prepare" for a large one, so that opening the page never reads every row.
csv_help = (f"Every logged step of the selected run(s) and their evaluations; columns: run_id, step, wall_time, "
            f"{', '.join(STEP_COLUMNS)}, then val_loss, val_ppl, … (empty where not logged)")
csv_key = (tuple(chosen), tuple(str(info.at[r, "step"]) + str(info.at[r, "status"]) for r in chosen))
prepared = st.session_state.get("compare_csv_file")
rows_to_write = sum(int(info.at[r, "step"] or 0) if not pd.isna(info.at[r, "step"]) else 0 for r in chosen)
if (prepared is None or prepared[0] != csv_key) and rows_to_write <= CSV_AT_ONCE_ROWS:
    prepared = st.session_state["compare_csv_file"] = (csv_key, queries.metrics_csv(store, chosen))
if prepared is not None and prepared[0] == csv_key:
    d1.download_button("Download metrics CSV", data=prepared[1], file_name=f"metrics-{len(chosen)}-runs.csv",
                       mime="text/csv", icon=":material/download:", key="compare_csv", help=csv_help,
                       on_click="ignore")
elif d1.button(f"Prepare metrics CSV ({rows_to_write:,} steps)", key="compare_csv_prepare",
               icon=":material/table:", help=csv_help):
    st.session_state["compare_csv_file"] = (csv_key, queries.metrics_csv(store, chosen))
    st.rerun()
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
        caches.pop(r, None)
    selected.clear()
    st.session_state.pop("compare_confirm_delete", None)
    if problems:
        st.session_state["compare_problems"] = problems
    st.rerun()
for problem in st.session_state.pop("compare_problems", []):
    st.error(ui.plain(problem))
