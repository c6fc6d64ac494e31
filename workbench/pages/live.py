"""Live run: status, progress, curves refreshed by st.fragment(run_every=...) while the run is active, reading only
the rows added since the last refresh; other runs overlaid, or grouped into median/mean lines over a band as on
Compare; stop / resume; the last log lines; a failed run's traceback.

Every chart is a subplot of one figure on one shared x axis: zooming or panning one zooms them all, and one hover
line reads them all (plotly's hovermode "x unified" with hoversubplots="axis"). One figure rather than twelve is
also what makes the page draw fast in the browser (issue 19: 13–16 s with twelve separate charts). The view —
charts, smoothing, x axis, log-y charts, overlays and grouping — lives in the session and in the URL.
"""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from hybrid_optimization.schema import MAX_UPDATE_RMS, PER_TENSOR_TRUST_REGIONS
from hybrid_optimization.system_metrics import SYSTEM_METRICS_FILE, read_system_metrics
from hybrid_optimization.tracking import ACTIVE_STATUSES, StoreError
from workbench import charts, headline, launcher, queries, ui
from workbench.launcher import LaunchError

REFRESH_CHOICES = (1, 2, 3, 5)
# Every tick redraws all the charts' curves (each new step shifts the downsampling buckets); measured with
# bench_live.py --browser, a 1 s tick kept a loaded 2-core machine's browser busy from one tick to the next, so the
# first view waited behind them. 2 s halves that work and still shows a new point within ~3 s (1 s stays a choice).
LIVE_REFRESH_S = 2
CACHES = "live_caches"
OVERLAY_CACHES = "live_overlay_caches"   # run id -> queries.RunCache of each overlaid run
LIVE_POINTS = 1000       # per curve: the browser draws 12 charts × (raw + smoothed) of these on every tick
OVERLAYS_UP_TO = 50
ROW_HEIGHT = 190         # px per chart in the stacked figure
X_AXES = ("step", "wall time")
# Widget key -> URL parameter (read once per link, written from the widgets on every run). Repeated parameters
# (?chart=A&chart=B) hold lists; chart titles may contain commas.
URL_KEYS = {"live_smoothing": "smooth", "live_x": "x", "live_logy": "logy", "live_overlays": "overlay",
            "live_group": "group", "live_stat": "stat", "live_band": "band"}
LIST_KEYS = ("live_logy", "live_overlays")
# System metrics (a file in the run folder, sampled every few seconds): chart title -> columns.
SYSTEM_CHARTS = {"CPU (%)": ("cpu_percent",), "Memory (RSS, MiB)": ("rss_mb",),
                 "GPU memory (MiB)": ("gpu_memory_mb",), "GPU utilisation (%)": ("gpu_utilization",)}
# y-axis titles with units.
Y_TITLES = {"Loss": "loss (nats/token)", "Learning rate": "learning rate", "LR multiplier": "× base LR",
            "Trust radius": "μ (L2 norm)", "Constraint activation (running rate)": "fraction of steps",
            "Update magnitude ‖ΔΘ‖": "‖ΔΘ‖₂", "Gradient magnitude ‖g‖": "‖g‖₂",
            "Quantization error": "‖W−Q(W)‖/‖W‖", "Flip rate": "fraction of codes", "Tokens/s": "tokens/s per step",
            "Validation loss": "loss (nats/token)", "Validation perplexity": "perplexity",
            "KL to the teacher": "KL (nats/token)", "Top-1 agreement with the teacher": "fraction",
            "Quantized vs full-precision logits": "|Δ logit|", "CPU (%)": "% of one core",
            "Memory (RSS, MiB)": "MiB", "GPU memory (MiB)": "MiB", "GPU utilisation (%)": "%"}

ui.page_header("Live run")
store = ui.open_store()
if store is None:
    st.stop()
runs = ui.list_runs(store)
run_id = ui.pick_run(runs, prefer_active=True, key="live_run")
if run_id is None:
    st.stop()
try:
    page_run = store.get_run(run_id)
except StoreError as exc:
    st.error(ui.plain(exc))
    st.stop()

hybrid = headline.is_hybrid(page_run)
# A baseline run has no LR multiplier, trust radius or constraint: its page does not offer those charts.
available = [c for c in [*queries.LIVE_CHARTS, *queries.EVAL_CHARTS, queries.OTHER_EVALS, *SYSTEM_CHARTS]
             if hybrid or c not in headline.HYBRID_ONLY_CHARTS]
defaults = [c for c in queries.DEFAULT_LIVE_CHARTS if c in available]
if not hybrid:
    defaults += ["Gradient magnitude ‖g‖", "Validation perplexity"]
charts_key = f"live_charts.{'hybrid' if hybrid else 'baseline'}"
others = runs[runs.run_id != run_id]
other_ids = list(others.run_id)


def _from_url() -> list[tuple[str, str, str]]:
    """Restore the view from the URL (a bookmark or a sent link) once per link: ?chart=Loss&chart=Tokens/s,
    smooth, x, logy (repeated), overlay (repeated run ids), group, stat, band. A value that cannot apply is left
    out; the list returned holds (parameter, value, why) of each; the rest of the link still applies."""
    params = {"chart": st.query_params.get_all("chart"), **{p: st.query_params.get_all(p) for p in URL_KEYS.values()}}
    params = {k: v for k, v in params.items() if v}
    signature = repr(sorted(params.items())) + charts_key
    if not params or signature == st.session_state.get("_live_url"):
        return []
    st.session_state["_live_url"] = signature
    state, problems = st.session_state, []

    def known(param: str, values: list[str], allowed, what: str) -> list[str]:
        bad = [v for v in values if v not in allowed]
        if bad:
            problems.append((param, bad[0], what))
        return [v for v in values if v in allowed]

    charts_given = known("chart", params.get("chart", []), available, "not a chart of this run")
    if charts_given:
        state[charts_key] = charts_given
    if "smooth" in params:
        try:
            value = float(params["smooth"][0])
        except ValueError:
            value = float("nan")
        if 0.0 <= value <= 0.99:
            state["live_smoothing"] = round(value, 2)
        else:
            problems.append(("smooth", params["smooth"][0], "it must be a number from 0 to 0.99"))
    for param, key, allowed in (("x", "live_x", X_AXES), ("stat", "live_stat", queries.GROUP_STATS),
                                ("band", "live_band", queries.GROUP_BANDS)):
        if param in params and known(param, params[param][:1], allowed, "it is one of " + ", ".join(allowed)):
            state[key] = params[param][0]
    if "logy" in params:
        state["live_logy"] = known("logy", params["logy"], available, "not a chart of this run")
    if "overlay" in params:
        state["live_overlays"] = known("overlay", params["overlay"], other_ids, "no other run has that id")[
            :OVERLAYS_UP_TO]
    if "group" in params:
        group = params["group"][0]
        if group in (queries.NO_GROUP, *queries.GROUP_SPECIAL) or (group.startswith("cfg.") and group in runs):
            state["live_group"] = group
        else:
            problems.append(("group", group, f"it is {queries.NO_GROUP}, {', '.join(queries.GROUP_SPECIAL)} or a "
                                             "config field as cfg.<name>"))
    return problems


def _to_url(values: dict, chart_values: list[str]) -> None:
    """Write the view into the URL; a value at its default is left out, so a plain link stays short."""
    view_defaults = {"live_smoothing": queries.DEFAULT_SMOOTHING, "live_x": "step", "live_logy": [],
                     "live_overlays": [], "live_group": queries.NO_GROUP, "live_stat": queries.GROUP_STATS[0],
                     "live_band": queries.GROUP_BANDS[0]}
    for key, param in URL_KEYS.items():
        value = values.get(key)
        if value is None or value == view_defaults[key] or (key in ("live_stat", "live_band") and
                                                           values.get("live_group") == queries.NO_GROUP):
            st.query_params.pop(param, None)
        else:
            st.query_params[param] = value if isinstance(value, list) else str(value)
    if chart_values != defaults:
        st.query_params["chart"] = chart_values
    else:
        st.query_params.pop("chart", None)
    params = {"chart": st.query_params.get_all("chart"), **{p: st.query_params.get_all(p) for p in URL_KEYS.values()}}
    st.session_state["_live_url"] = repr(sorted((k, v) for k, v in params.items() if v)) + charts_key


link_problems = _from_url()
if link_problems:      # one line: the first, and how many more
    param, value, why = link_problems[0]
    more = f" (and {len(link_problems) - 1} more parameter(s) of this link)" if len(link_problems) > 1 else ""
    ui.ignored_link(param, value, why + more)
state = st.session_state
if any(c not in available for c in state.get(charts_key, [])):
    state.pop(charts_key)
state.setdefault(charts_key, defaults)
state.setdefault("live_smoothing", queries.DEFAULT_SMOOTHING)
state.setdefault("live_x", "step")
if any(r not in other_ids for r in state.get("live_overlays", [])):
    state["live_overlays"] = [r for r in state["live_overlays"] if r in other_ids]

c1, c2, c3, c4 = st.columns([1.2, 1, 1.6, 1.2])
refresh_s = c1.select_slider("Refresh every (s)", REFRESH_CHOICES, value=LIVE_REFRESH_S, key="live_refresh")
paused = c2.toggle("Pause", key="live_paused", help="Stop refreshing (the run goes on).")
smoothing = c3.slider("Smoothing (EMA)", 0.0, 0.99, step=0.01, key="live_smoothing",
                      help="Exponential moving average, debiased, over every logged point; the raw curve stays faint.")
x_axis = c4.radio("x axis", X_AXES, horizontal=True, key="live_x")
shown = st.multiselect("Charts", available, key=charts_key)
if any(c not in shown for c in state.get("live_logy", [])):
    state["live_logy"] = [c for c in state["live_logy"] if c in shown]
log_charts = st.multiselect("Log y", shown, key="live_logy", help="Charts drawn with a logarithmic y axis.")

labels = {row.run_id: queries.run_label(row._asdict()) for row in runs.itertuples()}   # the figure escapes them
with st.expander("Overlay other runs", expanded=bool(state.get("live_overlays"))):
    overlays = st.multiselect("Runs to overlay", other_ids, format_func=labels.get, key="live_overlays",
                              max_selections=OVERLAYS_UP_TO,
                              help="Their smoothed curves on the same charts; group them to see a band over seeds.")
    shown_others = others[others.run_id.isin(overlays)]
    varying = [c for c in shown_others.columns if c.startswith("cfg.")
               and shown_others[c].map(lambda v: repr(v)).nunique() > 1]
    group_options = [queries.NO_GROUP, *queries.GROUP_SPECIAL, *varying]
    if state.get("live_group") not in group_options:
        if state.get("live_group") and str(state["live_group"]).startswith("cfg.") and state["live_group"] in runs:
            group_options.append(state["live_group"])          # from a link: a field that may vary once chosen
        else:
            state.pop("live_group", None)
    g1, g2, g3 = st.columns([2, 1.2, 1.2])
    group_by = g1.selectbox("Group overlays by", group_options, key="live_group", disabled=not overlays,
                            help="One line per group — the median or mean over its runs — over a shaded band (min–max "
                                 "or ± std), the run count in the legend; computed as on Compare. This run stays "
                                 "its own line.")
    grouped = bool(overlays) and group_by != queries.NO_GROUP
    stat = g2.radio("Line", queries.GROUP_STATS, key="live_stat", horizontal=True, disabled=not grouped)
    band = g3.radio("Band", queries.GROUP_BANDS, key="live_band", horizontal=True, disabled=not grouped)
_to_url({"live_smoothing": smoothing, "live_x": x_axis, "live_logy": log_charts, "live_overlays": overlays,
         "live_group": group_by, "live_stat": stat, "live_band": band}, shown)

st.caption(f"**{ui.plain(queries.run_label(page_run))}** · {headline.kind_label(page_run)}")
st.caption(f"Each curve is downsampled on the server to at most {LIVE_POINTS:,} points (the minimum and maximum of "
           "every bucket are kept, so spikes stay visible); smoothing is computed on all points first. The charts "
           "share one x axis: zoom or pan one and all follow, hover reads them all; double-click to reset. A "
           "refresh with new steps redraws the figure (and its zoom): Pause to study a zoomed view.")

active = page_run["status"] in ACTIVE_STATUSES
interval = None if paused or not active else refresh_s


def _cache(run_id: str) -> queries.RunCache:
    caches = st.session_state.setdefault(CACHES, {})
    if run_id not in caches:
        caches.clear()  # one run's rows at a time per session keeps memory flat
        caches[run_id] = queries.RunCache(run_id)
    return caches[run_id]


def y_title(title: str, run: dict) -> str | None:
    """The y-axis title with its unit; the trust radius's unit depends on the run's trust-region mode."""
    if title == "Trust radius" and (run.get("config") or {}).get("trust_region_mode") in PER_TENSOR_TRUST_REGIONS:
        return "μ (fraction of ‖W‖₂, per tensor)"        # bounded: the same μ, with each update's RMS capped
    if title == "Trust radius" and (run.get("config") or {}).get("trust_region_mode") == "rms":
        return f"μ (update RMS ÷ {MAX_UPDATE_RMS:g})"      # ‖ΔΘ‖ ≤ μ·MAX_UPDATE_RMS·√N
    return Y_TITLES.get(title)


def _controls(run: dict) -> None:
    status = run["status"]
    b1, _ = st.columns([1, 5])
    if status in ACTIVE_STATUSES:
        if b1.button("Stop", key="live_stop", icon=":material/stop_circle:",
                     disabled=bool(run.get("stop_requested"))):
            if launcher.stop(store, run["run_id"]):
                st.toast("Stop requested: the trainer stops at its next step (SIGTERM after "
                         f"{launcher.STOP_GRACE_S:.0f} s if it does not).")
    elif status in ("stopped", "lost", "failed"):
        if b1.button("Resume", key="live_resume", icon=":material/play_circle:",
                     help="Start the training CLI again with --resume (from the last checkpoint)."):
            try:
                launcher.resume(store, run["run_id"])
            except (LaunchError, StoreError) as exc:
                st.error(f"Not resumed: {ui.plain(exc)}")
            else:
                st.rerun()  # full rerun: the run is active again, so the fragment starts refreshing


def _setup_stages(run_id: str, logs: pd.DataFrame) -> None:
    """Before the first step: the setup stages (data, teacher training n/N, teacher logits n/N, clustering, student)
    with a bar and an ETA each, from the store's stage rows the trainer updates as it goes (refreshed with the
    fragment); a run recorded before those rows existed falls back to its log lines."""
    try:
        rows = list(store.read_stages(run_id)) if hasattr(store, "read_stages") else []
    except StoreError:
        rows = []
    stages = headline.store_stages(rows, has_steps=False) if rows else headline.setup_stages(logs, has_steps=False)
    with st.container(border=True):
        st.markdown("**Setting up** — no training step yet; the first run on new data trains a tokenizer and a "
                    "teacher and caches the teacher's logits (later runs read the cache).")
        marks = {"done": ":green[✓ done]", "active": ":blue[● in progress]", "pending": ":gray[○ waiting]"}
        for stage in stages:
            cols = st.columns([1.4, 1, 2.6])
            cols[0].markdown(f"**{stage.name}**")
            cols[1].markdown(marks[stage.state])
            if stage.fraction is not None and stage.state != "pending":
                cols[2].progress(min(1.0, stage.fraction), text=ui.plain(stage.detail))
            elif stage.detail:
                cols[2].caption(ui.plain(stage.detail))


def _system_frame(run_id: str, t0: float | None) -> pd.DataFrame:
    rows = read_system_metrics(store.root / run_id / SYSTEM_METRICS_FILE)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["time_s"] = frame.wall_time - (t0 if t0 is not None else frame.wall_time.iloc[0])
    return frame


@st.cache_data(max_entries=4096, show_spinner=False)
def kind_of(_store, root: str, run_id: str) -> str:
    """hybrid or baseline (from the run's options; they never change, so cached for good)."""
    try:
        return "hybrid" if headline.is_hybrid(_store.get_run(run_id)) else "baseline"
    except StoreError:
        return "—"


def _overlay_caches(run_ids: list[str], columns: tuple[str, ...]) -> list[queries.RunCache]:
    """The overlaid runs' caches, each refreshed with its new rows; a finished run is read once."""
    caches = st.session_state.setdefault(OVERLAY_CACHES, {})
    for gone in [r for r in caches if r not in run_ids]:
        del caches[gone]
    out = []
    for other in run_ids:
        cache = caches.setdefault(other, queries.RunCache(other))
        if cache.reads == 0 or cache.status in ACTIVE_STATUSES or not set(columns) <= set(cache.columns):
            try:
                cache.refresh(store, store.get_run(other), columns=columns, log_lines=0)
            except StoreError:
                continue                        # deleted meanwhile: left out
        out.append(cache)
    return out


def _metrics(title: str, cache) -> list[str]:
    """What a chart plots, as queries.run_series metric names (a step column, or eval:<key>)."""
    if title in queries.LIVE_CHARTS:
        return list(queries.LIVE_CHARTS[title])
    keys = queries.EVAL_CHARTS.get(title) or queries.other_eval_keys(
        cache.evals.key.unique() if not cache.evals.empty else [])
    return [queries.EVAL_PREFIX + k for k in keys]


def _concat(parts: list[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def teacher_loss(run: dict) -> float | None:
    """The teacher's own held-out loss on the student's evaluation windows (the floor the student distils
    towards), stored on the run at set-up; None for a run recorded before it existed."""
    value = run.get("teacher_val_loss")
    if value is None:
        value = (run.get("summary") or {}).get("teacher_val_loss")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value else None


def build_panels(run: dict, steps: pd.DataFrame, cache, overlays: list, x_col: str, t0: float | None,
                 groups: dict[str, str] | None, stat: str, band: str) -> list[charts.Panel]:
    """One panel per chosen training/evaluation chart: this run's curves (raw + smoothed), the overlaid runs'
    smoothed curves — or, grouped, their group lines over bands (queries.group_series, Compare's grouping) —
    and on the validation loss the teacher's own loss as a reference line."""
    panels = []
    teacher = teacher_loss(run)
    for title in shown:
        if title in SYSTEM_CHARTS:
            continue
        metrics = _metrics(title, cache)
        if title in queries.LIVE_CHARTS:
            mine = [queries.chart_series(steps, col, x_col, smoothing, LIVE_POINTS, run=run_id) for col in metrics]
        else:   # evaluation metrics: logged every few steps, on the same x axis as the step charts
            mine = [queries.eval_series(cache.evals, [m[len(queries.EVAL_PREFIX):]], run=run_id, x=x_col, t0=t0,
                                        max_points=LIVE_POINTS) for m in metrics]
        theirs = _concat([queries.run_series(other, m, x_col, smoothing, LIVE_POINTS)
                          for other in overlays for m in metrics])
        panel = charts.Panel(title, _concat(mine), y_title=y_title(title, run), log_y=title in log_charts)
        if groups and not theirs.empty:
            panel.groups = queries.group_series(theirs, groups, stat, band)
        else:
            panel.series = _concat([panel.series, theirs])
        if title == "Validation loss" and teacher is not None:
            panel.references.append(("teacher", teacher))
        panels.append(panel)
    return panels


def system_panels(run_id: str, t0: float | None) -> list[charts.Panel]:
    system = _system_frame(run_id, t0)
    return [charts.Panel(title, _concat([queries.chart_series(system, col, "time_s", 0.0, LIVE_POINTS, run=run_id)
                                         for col in SYSTEM_CHARTS[title]]), y_title=Y_TITLES.get(title),
                         log_y=title in log_charts)
            for title in shown if title in SYSTEM_CHARTS]


@st.fragment(run_every=interval)
def live_view() -> None:
    try:
        run = store.get_run(run_id)
    except StoreError as exc:
        st.error(ui.plain(exc))
        return
    if run["status"] != page_run["status"] and not paused:
        st.rerun()  # the run started, ended or changed state: redraw the page (refreshing switches on or off)
    cache = _cache(run_id)
    refresh_started = time.perf_counter()
    cache.refresh(store, run, columns=queries.columns_for(shown))
    steps = queries.with_derived(cache.steps)
    info = queries.progress(run, steps)

    head = st.columns([0.9, 0.8, 1.3, 0.9, 1.5])     # wide enough for the labels that say what they include
    head[0].markdown(f"### {ui.status_badge(run['status'])}")
    head[1].metric("Step", "—" if info["step"] is None else f"{info['step']:,}",
                   help=None if not info["total"] else f"of {info['total']:,}")
    rate = headline.throughput(run, steps)
    head[2].metric(headline.TOKENS_LABEL, headline.format_value("tokens_per_s", rate), help=headline.TOKENS_HELP)
    head[3].metric("ETA", queries.format_duration(headline.eta_seconds(run, steps)),
                   help="Steps to go × measured seconds per step over the run so far (evaluations included).")
    head[4].metric(headline.ELAPSED_LABEL, queries.format_duration(headline.elapsed_seconds(run)),
                   help=headline.ELAPSED_HELP)
    if info["fraction"] is not None and info["step"]:
        st.progress(info["fraction"], text=f"{info['step']:,} / {info['total']:,} steps")
    if run["status"] in ACTIVE_STATUSES and steps.empty:
        _setup_stages(run_id, cache.logs)
    if run.get("stop_requested"):
        st.info("Stop requested — waiting for the trainer to finish its step.")
    _controls(run)
    if run["status"] == "failed" and run.get("error"):
        st.error("The run failed. Traceback:")
        st.code(run["error"], language="text")
    elif run["status"] == "lost":
        st.warning(ui.plain(run.get("error") or "The run's process is gone.") + " Resume continues from its last checkpoint.")

    x_col, x_title = ("step", "step") if x_axis == "step" else ("time_s", "seconds since the first step")
    t0 = float(steps.wall_time.iloc[0]) if len(steps) else None
    setting_up = run["status"] in ACTIVE_STATUSES and steps.empty
    if setting_up:   # empty charts say nothing while the run sets up: they appear with the first step
        st.caption("The charts appear with the first training step.")
    elif shown:
        columns = queries.columns_for(shown)
        others = _overlay_caches(overlays, columns) if overlays else []
        groups = None
        if grouped and others:
            runs_shown = runs[runs.run_id.isin([c.run_id for c in others])]
            kinds = {r: kind_of(store, str(store.root), r) for r in runs_shown.run_id}
            groups = queries.group_labels(runs_shown, group_by, kinds)
        panels = build_panels(run, steps, cache, others, x_col, t0, groups, stat, band)
        if panels:
            colors = charts.run_colors(list(runs.sort_values("created_at").run_id))  # the run's colour on Compare
            group_colors = ({g: charts.color_for(i + 1) for i, g in enumerate(sorted(set(groups.values())))}
                            if groups else None)
            fig = charts.stacked_figure(panels, x_title=x_title, colors=colors, labels=labels,
                                        group_colors=group_colors, main_run=run_id, row_height=ROW_HEIGHT,
                                        stat=stat, band=band, uirevision=f"{run_id}:{x_col}")
            st.plotly_chart(fig, key="live_chart", config={"displaylogo": False})
        if any(t in SYSTEM_CHARTS for t in shown):
            st.plotly_chart(charts.stacked_figure(system_panels(run_id, t0), x_title="seconds since the first step",
                                                  main_run=run_id, row_height=ROW_HEIGHT - 30,
                                                  uirevision=f"{run_id}:system"),
                            key="live_system_chart", config={"displaylogo": False})
        if groups:
            counts = pd.Series(groups).value_counts()
            st.caption(f"{len(others)} overlaid run(s) in {len(counts)} group(s) by {group_by}: each line is the "
                       f"{stat} over its runs, the band their {band}; this run is the bold line of its own colour.")

    st.markdown("**Last log lines**")
    if cache.logs.empty:
        st.caption("No log lines yet.")
    else:
        lines = cache.logs.tail(20)
        # st.text, not st.code: the code block's syntax highlighter re-ran on every tick and was the browser's
        # largest cost after plotly itself (issue 19's render time); the lines are plain text either way.
        st.text("\n".join(f"{time.strftime('%H:%M:%S', time.localtime(t))} {lvl:7s} {msg}"
                          for t, lvl, msg in zip(lines.time, lines.level, lines.message)))
    if run["status"] in ("failed", "lost"):
        tail = launcher.stderr_tail(store, run_id, max_bytes=4000)
        if tail:
            with st.expander("stderr of the training process"):
                st.code(tail, language="text")
    st.caption(f"{'refreshing every %d s' % interval if interval else 'not refreshing'} · "
               f"{len(cache.steps):,} steps read in {cache.reads} incremental read(s) · "
               f"this refresh took {time.perf_counter() - refresh_started:.2f} s on the server")


live_view()
