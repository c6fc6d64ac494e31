"""Live run: status, progress, curves refreshed by st.fragment(run_every=...) while the run is active, reading only
the rows added since the last refresh; stop / resume; the last log lines; a failed run's traceback."""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from hybrid_optimization.system_metrics import SYSTEM_METRICS_FILE, read_system_metrics
from hybrid_optimization.tracking import ACTIVE_STATUSES, StoreError
from workbench import charts, headline, launcher, queries, ui
from workbench.launcher import LaunchError

REFRESH_CHOICES = (1, 2, 3, 5)
CACHES = "live_caches"
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

# Sections of the chosen charts, one lazy tab each.
CHART_SECTIONS = {
    "Training": ("Loss", "Learning rate", "LR multiplier", "Trust radius", "Constraint activation (running rate)"),
    "Gradients & speed": ("Update magnitude ‖ΔΘ‖", "Gradient magnitude ‖g‖", "Tokens/s"),
    "Evaluation": ("Validation loss", "Validation perplexity", "KL to the teacher", "Top-1 agreement with the teacher",
                   "Other evaluation metrics"),
    "Quantization": ("Quantization error", "Flip rate", "Quantized vs full-precision logits"),
    "System": tuple(SYSTEM_CHARTS),
}

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

c1, c2, c3, c4 = st.columns([1.2, 1, 1.6, 1.2])
refresh_s = c1.select_slider("Refresh every (s)", REFRESH_CHOICES, value=queries.DEFAULT_REFRESH_S, key="live_refresh")
paused = c2.toggle("Pause", key="live_paused", help="Stop refreshing (the run goes on).")
smoothing = c3.slider("Smoothing (EMA)", 0.0, 0.99, queries.DEFAULT_SMOOTHING, 0.01, key="live_smoothing",
                      help="Exponential moving average, debiased, over every logged point; the raw curve stays faint.")
x_axis = c4.radio("x axis", ("step", "wall time"), horizontal=True, key="live_x")
hybrid = headline.is_hybrid(page_run)
# A baseline run has no LR multiplier, trust radius or constraint: its page does not offer those charts.
available = [c for c in [*queries.LIVE_CHARTS, *queries.EVAL_CHARTS, queries.OTHER_EVALS, *SYSTEM_CHARTS]
             if hybrid or c not in headline.HYBRID_ONLY_CHARTS]
defaults = [c for c in queries.DEFAULT_LIVE_CHARTS if c in available]
if not hybrid:
    defaults += ["Gradient magnitude ‖g‖", "Validation perplexity"]
charts_key = f"live_charts.{'hybrid' if hybrid else 'baseline'}"
if any(c not in available for c in st.session_state.get(charts_key, [])):
    st.session_state.pop(charts_key)
# ?chart=Loss&chart=Tokens/s names the charts (a link opens the same view); read once per session and kind.
linked = [c for c in st.query_params.get_all("chart") if c in available]
if linked and not st.session_state.get(f"_linked.{charts_key}"):
    st.session_state[charts_key] = linked
    st.session_state[f"_linked.{charts_key}"] = True
shown = st.multiselect("Charts", available, default=defaults, key=charts_key)
if shown != defaults:
    st.query_params["chart"] = shown
elif "chart" in st.query_params:
    del st.query_params["chart"]
st.caption(f"**{ui.plain(queries.run_label(page_run))}** · {headline.kind_label(page_run)}")
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


def y_title(title: str, run: dict) -> str | None:
    """The y-axis title with its unit; the trust radius's unit depends on the run's trust-region mode."""
    if title == "Trust radius" and (run.get("config") or {}).get("trust_region_mode") == "relative":
        return "μ (fraction of ‖W‖₂, per tensor)"
    return Y_TITLES.get(title)


def _chart(title: str, series, x_title: str, key: str, y_title: str | None = None) -> None:
    log_y = st.toggle("log y", key=f"logy.{title}")
    fig = charts.line_figure(series, title, x_title=x_title, log_y=log_y, y_title=y_title,
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


def chart_groups(titles: list[str]) -> list[tuple[str, list[str]]]:
    """The chosen charts by section (a tab each), in the order chosen; empty sections left out."""
    groups = [(label, [t for t in titles if t in members]) for label, members in CHART_SECTIONS.items()]
    placed = {t for _, members in groups for t in members}
    groups.append(("Other", [t for t in titles if t not in placed]))
    return [(label, members) for label, members in groups if members]


def _draw(title: str, run: dict, steps: pd.DataFrame, cache, system: pd.DataFrame, x_col: str, x_title: str,
          t0: float | None) -> None:
    if title in queries.LIVE_CHARTS:
        parts = [queries.chart_series(steps, col, x_col, smoothing, run=run_id) for col in queries.LIVE_CHARTS[title]]
    elif title in SYSTEM_CHARTS:
        parts = [queries.chart_series(system, col, "time_s", 0.0, run=run_id) for col in SYSTEM_CHARTS[title]]
    else:   # evaluation metrics: logged every few steps, on the same x axis as the step charts
        keys = queries.EVAL_CHARTS.get(title) or queries.other_eval_keys(
            cache.evals.key.unique() if not cache.evals.empty else [])
        parts = [queries.eval_series(cache.evals, [k], run=run_id, x=x_col, t0=t0) for k in keys]
    parts = [p for p in parts if not p.empty]
    series = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    chart_x = "seconds since the first step" if title in SYSTEM_CHARTS else x_title
    _chart(title, series, chart_x, key=f"live.{title}", y_title=y_title(title, run))


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
    system = _system_frame(run_id, t0) if any(t in SYSTEM_CHARTS for t in shown) else pd.DataFrame()
    setting_up = run["status"] in ACTIVE_STATUSES and steps.empty
    if setting_up:   # empty charts say nothing while the run sets up: they appear with the first step
        st.caption("The charts appear with the first training step.")
    groups = [] if setting_up else chart_groups(shown)
    # Charts in tabs that run lazily (on_change="rerun"): only the open tab's figures are built and sent, so 12
    # charts cost what 4–5 do, on the server and in the browser (issue 19: 12–14 s with every chart at once).
    tabs = (st.tabs([f"{label} ({len(titles)})" for label, titles in groups], key="live_tab", on_change="rerun")
            if len(groups) > 1 else [st.container() for _ in groups])
    for tab, (_, titles) in zip(tabs, groups):
        if getattr(tab, "open", True) is False:
            continue
        with tab:
            grid = st.columns(2)
            for slot, title in enumerate(titles):
                with grid[slot % 2]:
                    _draw(title, run, steps, cache, system, x_col, x_title, t0)

    st.markdown("**Last log lines**")
    if cache.logs.empty:
        st.caption("No log lines yet.")
    else:
        lines = cache.logs.tail(20)
        st.code("\n".join(f"{time.strftime('%H:%M:%S', time.localtime(t))} {lvl:7s} {msg}"
                          for t, lvl, msg in zip(lines.time, lines.level, lines.message)), language="text",
                wrap_lines=True)
    if run["status"] in ("failed", "lost"):
        tail = launcher.stderr_tail(store, run_id, max_bytes=4000)
        if tail:
            with st.expander("stderr of the training process"):
                st.code(tail, language="text")
    st.caption(f"{'refreshing every %d s' % interval if interval else 'not refreshing'} · "
               f"{len(cache.steps):,} steps read in {cache.reads} incremental read(s) · "
               f"this refresh took {time.perf_counter() - refresh_started:.2f} s on the server")


live_view()
