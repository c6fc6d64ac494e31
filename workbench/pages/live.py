"""Live run: status, progress, curves refreshed by st.fragment(run_every=...) while the run is active, reading only
the rows added since the last refresh; stop / resume; the last log lines; a failed run's traceback."""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from hybrid_optimization.tracking import ACTIVE_STATUSES, StoreError
from workbench import charts, launcher, queries, ui
from workbench.launcher import LaunchError

REFRESH_CHOICES = (1, 2, 3, 5)
CACHES = "live_caches"

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
    st.error(str(exc))
    st.stop()

c1, c2, c3, c4 = st.columns([1.2, 1, 1.6, 1.2])
refresh_s = c1.select_slider("Refresh every (s)", REFRESH_CHOICES, value=queries.DEFAULT_REFRESH_S, key="live_refresh")
paused = c2.toggle("Pause", key="live_paused", help="Stop refreshing (the run goes on).")
smoothing = c3.slider("Smoothing (EMA)", 0.0, 0.99, queries.DEFAULT_SMOOTHING, 0.01, key="live_smoothing",
                      help="Exponential moving average, debiased, over every logged point; the raw curve stays faint.")
x_axis = c4.radio("x axis", ("step", "wall time"), horizontal=True, key="live_x")
shown = st.multiselect("Charts", [*queries.LIVE_CHARTS, *queries.EVAL_CHARTS, queries.OTHER_EVALS],
                       default=list(queries.DEFAULT_LIVE_CHARTS), key="live_charts")
st.caption(f"Each series is downsampled on the server to at most {queries.MAX_POINTS:,} points (the minimum and "
           "maximum of every bucket are kept, so spikes stay visible); smoothing is computed on all points first. "
           "Zoom and pan are kept across refreshes; double-click a chart to reset.")

active = page_run["status"] in ACTIVE_STATUSES
interval = None if paused or not active else refresh_s


def _cache(run_id: str) -> queries.RunCache:
    caches = st.session_state.setdefault(CACHES, {})
    if run_id not in caches:
        caches.clear()  # one run's rows at a time per session keeps memory flat
        caches[run_id] = queries.RunCache(run_id)
    return caches[run_id]


def _chart(title: str, series, x_title: str, key: str) -> None:
    log_y = st.toggle("log y", key=f"logy.{title}")
    fig = charts.line_figure(series, title, x_title=x_title, log_y=log_y,
                             uirevision=f"{run_id}:{title}:{x_title}:{log_y}")
    st.plotly_chart(fig, key=key, config={"displaylogo": False})


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
                st.error(f"Not resumed: {exc}")
            else:
                st.rerun()  # full rerun: the run is active again, so the fragment starts refreshing


@st.fragment(run_every=interval)
def live_view() -> None:
    try:
        run = store.get_run(run_id)
    except StoreError as exc:
        st.error(str(exc))
        return
    if run["status"] != page_run["status"] and not paused:
        st.rerun()  # the run started, ended or changed state: redraw the page (refreshing switches on or off)
    cache = _cache(run_id)
    refresh_started = time.perf_counter()
    cache.refresh(store, run, columns=queries.columns_for(shown))
    steps = queries.with_derived(cache.steps)
    info = queries.progress(run, steps)

    head = st.columns([1.3, 1, 1, 1, 1])
    head[0].markdown(f"### {ui.status_badge(run['status'])}")
    head[1].metric("Step", "—" if info["step"] is None else f"{info['step']:,}",
                   help=None if not info["total"] else f"of {info['total']:,}")
    head[2].metric("Tokens/s", "—" if info["tokens_per_s"] is None else f"{info['tokens_per_s']:,.0f}")
    head[3].metric("ETA", queries.format_duration(info["eta_s"]))
    started, ended = run.get("started_at"), run.get("ended_at")
    head[4].metric("Elapsed", queries.format_duration(((ended or time.time()) - started) if started else None))
    if info["fraction"] is not None:
        st.progress(info["fraction"], text=f"{info['step']:,} / {info['total']:,} steps")
    if run.get("stop_requested"):
        st.info("Stop requested — waiting for the trainer to finish its step.")
    _controls(run)
    if run["status"] == "failed" and run.get("error"):
        st.error("The run failed. Traceback:")
        st.code(run["error"], language="text")
    elif run["status"] == "lost":
        st.warning((run.get("error") or "The run's process is gone.") + " Resume continues from its last checkpoint.")

    x_col, x_title = ("step", "step") if x_axis == "step" else ("time_s", "seconds since the first step")
    grid = st.columns(2)
    for slot, title in enumerate(shown):
        if title in queries.LIVE_CHARTS:
            parts = [queries.chart_series(steps, col, x_col, smoothing, run=run_id)
                     for col in queries.LIVE_CHARTS[title]]
            chart_x = x_title
        else:   # evaluation metrics: logged every few steps, plotted against the step
            keys = queries.EVAL_CHARTS.get(title) or queries.other_eval_keys(
                cache.evals.key.unique() if not cache.evals.empty else [])
            parts = [queries.eval_series(cache.evals, [k], run=run_id) for k in keys]
            chart_x = "step"
        parts = [p for p in parts if not p.empty]
        series = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        with grid[slot % 2]:
            _chart(title, series, chart_x, key=f"live.{title}")

    st.markdown("**Last log lines**")
    if cache.logs.empty:
        st.caption("No log lines yet.")
    else:
        lines = cache.logs.tail(20)
        st.code("\n".join(f"{time.strftime('%H:%M:%S', time.localtime(t))} {lvl:7s} {msg}"
                          for t, lvl, msg in zip(lines.time, lines.level, lines.message)), language="text")
    if run["status"] in ("failed", "lost"):
        tail = launcher.stderr_tail(store, run_id, max_bytes=4000)
        if tail:
            with st.expander("stderr of the training process"):
                st.code(tail, language="text")
    st.caption(f"{'refreshing every %d s' % interval if interval else 'not refreshing'} · "
               f"{len(cache.steps):,} steps read in {cache.reads} incremental read(s) · "
               f"this refresh took {time.perf_counter() - refresh_started:.2f} s on the server")


live_view()
