"""Pure figure builders: DataFrame in, plotly Figure out. No Streamlit, no store access — unit-tested directly.

Conventions users bring from TensorBoard / W&B: a faint raw line under a bold smoothed one, one colour per run
kept across every chart, per-chart log-y, and a fixed `uirevision` so zoom and pan survive live refreshes.
"""
from __future__ import annotations

import html
import math
import textwrap
from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

# 34 distinct colours: Plotly's default ten, then Dark24 without repeats. Index = run position, cluster id, ...
PALETTE = list(dict.fromkeys(qualitative.Plotly + qualitative.Dark24))
RAW_OPACITY = 0.25
CODE_COLORS = {"frac_neg": "#d62728", "frac_zero": "#7f7f7f", "frac_pos": "#1f77b4"}
SERIES_DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
_LAYOUT = dict(margin=dict(l=10, r=10, t=40, b=10), height=300, hovermode="x unified",
               hoverlabel=dict(namelength=-1),       # whole run names in the hover, not "hybrid-terna…"
               legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))


def color_for(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def run_colors(run_ids: list[str]) -> dict[str, str]:
    """One colour per run, by the run's position in the given (stable, e.g. creation-ordered) list."""
    return {run_id: color_for(i) for i, run_id in enumerate(run_ids)}


def _empty(title: str, message: str = "no data yet") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, **{**_LAYOUT, "hovermode": False})
    fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font=dict(color="gray"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


# Friendly legend names of logged series (the store's keys stay internal).
SERIES_NAMES = {
    "loss": "training loss", "learning_rate": "learning rate", "lr_multiplier": "LR multiplier",
    "trust_radius": "trust radius μ", "constraint_rate": "constraint activation (running rate)",
    "update_magnitude": "‖ΔΘ‖", "gradient_magnitude": "‖g‖", "quantization_error": "relative quantization error",
    "flip_rate": "code flip rate", "tokens_per_s": "tokens/s",
    "val_loss": "validation loss (quantized)", "val_loss_fp": "validation loss (full precision)",
    "val_ppl": "validation perplexity", "kl_teacher": "KL to the teacher", "top1_agreement": "top-1 agreement",
    "qdiff_max": "max |quantized − FP logit|", "qdiff_mean": "mean |quantized − FP logit|",
    "cpu_percent": "CPU %", "rss_mb": "RSS (MiB)", "gpu_memory_mb": "GPU memory (MiB)",
    "gpu_utilization": "GPU utilisation %",
}


def series_name(key: str) -> str:
    if key.startswith("val_loss_cluster_"):
        return f"validation loss, cluster {key.rsplit('_', 1)[-1]}"
    return SERIES_NAMES.get(key, key.replace("_", " "))


def y_range_for_flat(values: np.ndarray, log_y: bool = False) -> list[float] | None:
    """An explicit y range when every value is (nearly) the same: plotly's autorange would centre a constant
    0.001 in −1…1, drawing a learning rate as a line at zero. None when autorange is fine."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    low, high = float(finite.min()), float(finite.max())
    scale = max(abs(low), abs(high))
    if high - low > 1e-6 * scale and high - low > 1e-12:
        return None
    if log_y:
        if low <= 0:
            return None
        return [math.log10(low) - 0.5, math.log10(high) + 0.5]
    pad = 0.5 * scale if scale > 0 else 1.0
    return [low - pad, high + pad]


def integer_ticks(xs: np.ndarray) -> dict:
    """Axis settings that keep step ticks on whole numbers (a 3-step run must not show 1.5, 2.5)."""
    finite = xs[np.isfinite(xs)] if xs.size else xs
    if finite.size == 0:
        return {}
    span = float(finite.max() - finite.min())
    if span <= 12:
        return {"tickmode": "linear", "dtick": 1, "tick0": 0, "tickformat": "d"}
    return {"tickformat": ",d"}


def x_range_settings(x_range: tuple[float | None, float | None]) -> dict:
    """Axis settings for a shared x range; an open end (None) keeps plotly's autorange on that end only."""
    low, high = x_range
    if low is not None and high is not None:
        return {"range": [low, high], "autorange": False}
    if low is not None:
        return {"range": [low, None], "autorange": "max"}
    if high is not None:
        return {"range": [None, high], "autorange": "min"}
    return {}


def line_figure(series: pd.DataFrame, title: str, x_title: str = "step", log_y: bool = False,
                colors: dict[str, str] | None = None, uirevision: str | None = None,
                labels: dict[str, str] | None = None, height: int = 300, color_by: str = "auto",
                raw: bool = True, y_title: str | None = None, x_range: tuple[float, float] | None = None) -> go.Figure:
    """Curves from chart series (columns run, series, x, raw, smooth — see queries.chart_series).

    Each curve is a faint raw line plus a bold smoothed line of the same colour. With one run, curves are
    coloured by series; with several runs, by run and told apart by dash per series (color_by="run" forces the
    run colours, e.g. in a comparison that happens to hold one run). `colors` and `labels` map that key (run id,
    or series name when colouring by series) to a colour and a legend label. raw=False leaves the faint raw
    lines out (many overlaid runs)."""
    if series is None or series.empty:
        return _empty(title)
    runs = list(dict.fromkeys(series.run))
    names = list(dict.fromkeys(series.series))
    by_run = len(runs) > 1 or color_by == "run"
    traces = []
    for r, run in enumerate(runs):
        for s, name in enumerate(names):
            part = series[(series.run == run) & (series.series == name)]
            if part.empty:
                continue
            key = run if by_run else name
            color = (colors or {}).get(key, color_for(r if by_run else s))
            label = (labels or {}).get(key, series_name(key) if not by_run else key)
            if by_run and len(names) > 1:
                label = f"{label} · {series_name(name)}"
            label = html.escape(label, quote=False)     # a run name is the user's text: never markup in the legend
            dash = SERIES_DASHES[s % len(SERIES_DASHES)] if by_run else "solid"
            x, y_raw, y_smooth = part.x.to_numpy(), part.raw.to_numpy(), part.smooth.to_numpy()
            if raw and not np.allclose(y_raw, y_smooth, equal_nan=True):
                traces.append(dict(type="scatter", x=x, y=y_raw, mode="lines", name=f"{label} (raw)", legendgroup=label,
                                   showlegend=False, hoverinfo="skip", line=dict(color=color, width=1),
                                   opacity=RAW_OPACITY))
            # Few points (evaluations, short runs): markers too, or a single evaluation would draw nothing.
            traces.append(dict(type="scatter", x=x, y=y_smooth, mode="lines+markers" if len(x) <= 30 else "lines",
                               name=label, legendgroup=label,
                               line=dict(color=color, width=2, dash=dash),
                               hovertemplate="%{y:.4g}"))
    values = pd.to_numeric(series.smooth, errors="coerce").to_numpy(dtype="float64")
    raw_values = pd.to_numeric(series.raw, errors="coerce").to_numpy(dtype="float64")
    yaxis = dict(type="log" if log_y else "linear", title=dict(text=y_title or ""), exponentformat="e" if not log_y else "power",
                 automargin=True)
    flat = y_range_for_flat(np.concatenate([values, raw_values if raw else values]), log_y)
    if flat is not None:
        yaxis.update(range=flat, autorange=False)
    xaxis = dict(title=dict(text=x_title), automargin=True)
    if x_title == "step":
        xaxis.update(integer_ticks(pd.to_numeric(series.x, errors="coerce").to_numpy(dtype="float64")))
    if x_range is not None:          # the page's shared x range: every chart shows the same steps
        xaxis.update(x_range_settings(x_range))
    # Legend below the plot: plotly's toolbar sits top-right and would cover a legend there.
    legend = dict(orientation="h", yanchor="top", y=-0.3, xanchor="left", x=0.0)
    # The legend takes room below the plot: grow the figure with it, so 20 runs do not squeeze the curves.
    entries = sum(1 for t in traces if t.get("showlegend", True))
    if entries > 2:
        height = min(height + 22 * entries, 900)
    layout = dict(_LAYOUT, title=dict(text=title), uirevision=uirevision or title, height=height,
                  showlegend=len(runs) > 1 or len(names) > 1, xaxis=xaxis, yaxis=yaxis, legend=legend)
    # Built without plotly's per-property validation: it costs ~10 ms a chart on every live refresh. The unit
    # tests validate every builder's output (go.Figure(fig.to_dict())), so a wrong property still fails there.
    return go.Figure(data=traces, layout=layout, _validate=False)


def cluster_scatter(samples: pd.DataFrame, x: str = "x", y: str = "y", title: str = "Samples by cluster",
                    text_chars: int = 200, uirevision: str | None = None) -> go.Figure:
    """2-D projection of the training samples, one colour per cluster; hovering shows the sample's text."""
    if samples is None or samples.empty or samples[[x, y]].dropna().empty:
        return _empty(title, "no samples stored for this run")
    fig = go.Figure()
    for cluster in sorted(samples.cluster.dropna().unique()):
        part = samples[samples.cluster == cluster]
        hover = ["<br>".join(textwrap.wrap(str(t or "")[:text_chars], 60)) for t in part.text]
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="markers", name=f"cluster {int(cluster)}",
                                 marker=dict(color=color_for(int(cluster)), size=6, opacity=0.75),
                                 hovertext=hover, hovertemplate="%{hovertext}<extra>cluster " + str(int(cluster))
                                 + "</extra>"))
    fig.update_layout(title=title, uirevision=uirevision or title,
                      **{**_LAYOUT, "height": 480, "hovermode": "closest"})
    fig.update_xaxes(title_text="component 1")
    fig.update_yaxes(title_text="component 2")
    return fig


def cluster_bar(counts: pd.DataFrame, value: str, title: str, y_title: str,
                reference: pd.Series | None = None, reference_name: str = "") -> go.Figure:
    """Bars per cluster (e.g. sizes, batches supplied), optionally with a reference marker per cluster."""
    if counts is None or counts.empty:
        return _empty(title)
    clusters = counts.cluster.astype(int)
    fig = go.Figure(go.Bar(x=clusters.astype(str), y=counts[value], name=y_title,
                           marker_color=[color_for(c) for c in clusters]))
    if reference is not None and len(reference):
        fig.add_trace(go.Scatter(x=reference.index.astype(int).astype(str), y=reference.to_numpy(), mode="markers",
                                 name=reference_name, marker=dict(symbol="line-ew-open", size=28, color="black")))
    fig.update_layout(title=title, **{**_LAYOUT, "hovermode": "closest"}, showlegend=reference is not None)
    fig.update_xaxes(title_text="cluster", type="category")
    fig.update_yaxes(title_text=y_title)
    return fig


def bits_per_layer_figure(plan: pd.DataFrame, title: str = "Bits per layer") -> go.Figure:
    """The precision plan: bits of every layer in model order, coloured by module type."""
    if plan is None or plan.empty:
        return _empty(title, "no precision plan stored for this run")
    fig = go.Figure()
    types = list(dict.fromkeys(plan.module_type.fillna("other")))
    for i, module_type in enumerate(types):
        part = plan[plan.module_type.fillna("other") == module_type]
        fig.add_trace(go.Bar(x=part.layer, y=part.bits, name=module_type, marker_color=color_for(i),
                             customdata=np.stack([part.n_params.fillna(0), part.cluster.fillna(-1)], axis=1)
                             if "cluster" in part else None,
                             hovertemplate="%{x}<br>%{y} bits<br>%{customdata[0]:,} params<br>"
                                           "cluster %{customdata[1]}<extra></extra>"))
    fig.update_layout(title=title, **{**_LAYOUT, "height": 360, "hovermode": "closest"}, barmode="overlay")
    fig.update_xaxes(categoryorder="array", categoryarray=list(plan.layer), tickangle=-45, title_text="layer")
    fig.update_yaxes(title_text="bits per weight")
    return fig


def bits_by_module_figure(plan: pd.DataFrame, title: str = "Average bits by module type") -> go.Figure:
    """Parameter-weighted average bits per module type (q_proj, mlp, ...)."""
    if plan is None or plan.empty:
        return _empty(title, "no precision plan stored for this run")
    frame = plan.assign(module_type=plan.module_type.fillna("other"), weighted=plan.bits * plan.n_params)
    grouped = frame.groupby("module_type", sort=False).agg(weighted=("weighted", "sum"), params=("n_params", "sum"))
    grouped["avg_bits"] = grouped.weighted / grouped.params
    fig = go.Figure(go.Bar(x=grouped.index, y=grouped.avg_bits,
                           marker_color=[color_for(i) for i in range(len(grouped))],
                           customdata=grouped.params, hovertemplate="%{x}: %{y:.3f} bits<br>%{customdata:,} params"
                                                                    "<extra></extra>"))
    fig.update_layout(title=title, **{**_LAYOUT, "hovermode": "closest"})
    fig.update_yaxes(title_text="bits per weight")
    return fig


def sensitivity_heatmap(features: pd.DataFrame, title: str = "Sensitivity features behind the plan") -> go.Figure:
    """Layers × features; colour is each feature scaled to [0, 1] across layers, hover shows the raw value."""
    if features is None or features.empty:
        return _empty(title, "the plan stored no sensitivity features")
    values = features.astype("float64")
    span = (values.max() - values.min()).replace(0, 1)
    scaled = (values - values.min()) / span
    fig = go.Figure(go.Heatmap(z=scaled.to_numpy().T, x=list(values.index), y=list(values.columns),
                               customdata=values.to_numpy().T, colorscale="Viridis",
                               hovertemplate="%{x}<br>%{y} = %{customdata:.4g}<extra></extra>",
                               colorbar=dict(title="scaled")))
    fig.update_layout(title=title, **{**_LAYOUT, "height": 120 + 28 * len(values.columns), "hovermode": "closest"})
    fig.update_xaxes(tickangle=-45)
    return fig


def param_cluster_figure(plan: pd.DataFrame, title: str = "Parameter cluster membership") -> go.Figure:
    """Which parameter cluster each layer fell into (marker size ~ parameter count, colour = cluster)."""
    if plan is None or plan.empty or "cluster" not in plan or plan.cluster.isna().all():
        return _empty(title, "no parameter clusters stored for this run")
    sizes = np.sqrt(plan.n_params.fillna(1).astype(float))
    sizes = 8 + 22 * sizes / sizes.max()
    fig = go.Figure()
    for cluster in sorted(plan.cluster.dropna().unique()):
        mask = plan.cluster == cluster
        part = plan[mask]
        bits = part.bits.iloc[0] if len(part) else None
        fig.add_trace(go.Scatter(x=part.layer, y=[int(cluster)] * len(part), mode="markers",
                                 name=f"cluster {int(cluster)} ({bits:g} bits)" if bits is not None else str(cluster),
                                 marker=dict(size=sizes[mask], color=color_for(int(cluster))),
                                 customdata=part.n_params, hovertemplate="%{x}<br>%{customdata:,} params<extra></extra>"))
    fig.update_layout(title=title, **{**_LAYOUT, "height": 320, "hovermode": "closest"})
    fig.update_xaxes(categoryorder="array", categoryarray=list(plan.layer), tickangle=-45)
    fig.update_yaxes(title_text="cluster", dtick=1)
    return fig


def layer_error_figure(layers: pd.DataFrame, title: str = "Relative quantization error per layer") -> go.Figure:
    if layers is None or layers.empty or layers.rel_error.isna().all():
        return _empty(title, "no per-layer quantization statistics logged yet")
    fig = go.Figure(go.Bar(x=layers.layer, y=layers.rel_error,
                           marker_color=[color_for(i) for i in pd.factorize(layers.module_type.fillna("other"))[0]],
                           hovertemplate="%{x}<br>‖W−Q(W)‖/‖W‖ = %{y:.4f}<extra></extra>"))
    fig.update_layout(title=title, **{**_LAYOUT, "height": 340, "hovermode": "closest"})
    fig.update_xaxes(categoryorder="array", categoryarray=list(layers.layer), tickangle=-45)
    fig.update_yaxes(title_text="relative error")
    return fig


def code_distribution_figure(layers: pd.DataFrame, title: str = "Ternary code distribution per layer") -> go.Figure:
    """Stacked fractions of −1 / 0 / +1 codes in every ternary layer."""
    cols = ["frac_neg", "frac_zero", "frac_pos"]
    if layers is None or layers.empty or layers[cols].isna().all().all():
        return _empty(title, "no ternary code statistics logged yet")
    part = layers.dropna(subset=cols, how="all")
    fig = go.Figure()
    for col, label in zip(cols, ("−1", "0", "+1")):
        fig.add_trace(go.Bar(x=part.layer, y=part[col], name=label, marker_color=CODE_COLORS[col],
                             hovertemplate="%{x}<br>" + label + ": %{y:.1%}<extra></extra>"))
    fig.update_layout(title=title, **{**_LAYOUT, "height": 340, "hovermode": "closest"}, barmode="stack")
    fig.update_xaxes(categoryorder="array", categoryarray=list(part.layer), tickangle=-45)
    fig.update_yaxes(title_text="fraction of codes", range=[0, 1])
    return fig


def parallel_coordinates(frame: pd.DataFrame, dims: list[tuple], color: str | None = None,
                         title: str | None = "Config vs result", color_title: str | None = None,
                         height: int = 420) -> go.Figure:
    """One line per run (or trial) across axes `dims` [(column, label) or (column, label, log)], coloured by
    `color` (the result). Text and boolean columns become categorical axes (ticks name the values); log axes
    (log-uniform searched rates) are spaced by order of magnitude with ticks in real values; constant or empty
    columns are left out, since an axis with one value says nothing. title=None: no title of its own (the page's
    heading already names it)."""
    if frame is None or frame.empty:
        return _empty(title or "", "nothing to show yet")
    dimensions = []
    for dim in dims:
        col, label, log = (*dim, False)[:3]
        if col not in frame:
            continue
        values = frame[col]
        if values.isna().all():
            continue
        numeric = pd.to_numeric(values, errors="coerce")
        if values.dtype == bool or values.map(lambda v: isinstance(v, bool)).any() or numeric.isna().any() and \
                values.notna().any() and numeric.notna().sum() < values.notna().sum():
            text = values.map(lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
            cats = sorted(text.unique())
            if len(cats) < 2 and col != color:
                continue
            dimensions.append(dict(label=label, values=[cats.index(t) for t in text],
                                   tickvals=list(range(len(cats))), ticktext=cats))
            continue
        if numeric.nunique(dropna=True) < 2 and col != color:
            continue
        filled = numeric.fillna(numeric.max() if numeric.notna().any() else 0)
        if log and (filled > 0).all():
            exps = np.log10(filled.to_numpy(dtype="float64"))
            ticks = np.unique(np.concatenate([np.arange(math.floor(exps.min()), math.ceil(exps.max()) + 1),
                                              [exps.min(), exps.max()]]))
            ticks = ticks[(ticks >= exps.min() - 1e-9) & (ticks <= exps.max() + 1e-9)]
            dimensions.append(dict(label=f"{label} (log)", values=exps, tickvals=ticks,
                                   ticktext=[f"{10 ** t:.3g}" for t in ticks]))
            continue
        dimensions.append(dict(label=label, values=filled.to_numpy(dtype="float64")))
    if not dimensions:
        return _empty(title or "", "the selected runs do not differ in these fields")
    line = {}
    if color and color in frame:
        shade = pd.to_numeric(frame[color], errors="coerce")
        if shade.notna().any():
            line = dict(color=shade.fillna(shade.max()).to_numpy(dtype="float64"), colorscale="Viridis_r",
                        showscale=True, colorbar=dict(title=dict(text=color_title or color)))
    fig = go.Figure(go.Parcoords(dimensions=dimensions, line=line, labelangle=0, labelside="top"))
    if title:
        fig.update_layout(title=dict(text=title, y=0.98, yanchor="top"), margin=dict(l=70, r=70, t=110, b=30))
    else:
        fig.update_layout(margin=dict(l=70, r=70, t=60, b=30))
    fig.update_layout(height=height)
    return fig


def short_axis_title(name: str, width: int = 16) -> str:
    """A config field as a short axis title: known abbreviations (LR, μ, NN), underscores to spaces, cut to
    `width` characters, so that neighbouring parallel-coordinate axes do not overlap."""
    text = name[4:] if name.startswith("cfg.") else name
    for long, short in (("learning_rate", "LR"), ("auxiliary_nn", "aux NN"), ("trust_radius", "μ"),
                        ("trust_region", "TR"), ("parameter_", "param "), ("initial_", "init "),
                        ("_clusters", " clusters"), ("target_", ""), ("max_", "max ")):
        text = text.replace(long, short)
    text = text.replace("_", " ").strip()
    return text if len(text) <= width else text[:width - 1] + "…"


def config_axes(frame: pd.DataFrame, columns: list[str], log_if=lambda c: False) -> list[tuple]:
    """Parallel-coordinate axes for Compare: only numeric (not boolean) config columns whose values vary across
    the shown runs, with short titles. Booleans are left out: on/off switches of the hybrid's parts repeat the
    hybrid/baseline split, which gets one axis of its own ("kind")."""
    dims = []
    for col in columns:
        if col not in frame:
            continue
        values = frame[col]
        if values.map(lambda v: isinstance(v, (bool, np.bool_))).any():
            continue
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().sum() < values.notna().sum() or numeric.nunique(dropna=True) < 2:
            continue
        dims.append((col, short_axis_title(col), bool(log_if(col))))
    return dims


def group_figure(groups: pd.DataFrame, title: str, x_title: str = "step", log_y: bool = False,
                 colors: dict[str, str] | None = None, uirevision: str | None = None, height: int = 300,
                 y_title: str | None = None, x_range: tuple[float, float] | None = None,
                 stat: str = "median", band: str = "min–max") -> go.Figure:
    """One line per group (queries.group_series: group, series, x, center, low, high, n): the median or mean over
    its runs, bold, over a shaded band (min–max or ± std) of the same colour; the legend says how many runs."""
    if groups is None or groups.empty:
        return _empty(title)
    traces = []
    names = list(dict.fromkeys(groups.series))
    lines = groups.groupby(["group", "series"], sort=False).indices    # one pass, not two filters per line
    for g, group in enumerate(dict.fromkeys(groups.group)):
        color = (colors or {}).get(group, color_for(g))
        for s, name in enumerate(names):
            if (group, name) not in lines:
                continue
            part = groups.take(lines[(group, name)])
            runs = int(part.n.max())
            label = html.escape(f"{group} (n={runs})" + (f" · {series_name(name)}" if len(names) > 1 else ""),
                                quote=False)             # a group can be a tag: the user's text, never markup
            x = part.x.to_numpy()
            traces.append(dict(type="scatter", x=x, y=part.high.to_numpy(), mode="lines", line=dict(width=0),
                               legendgroup=label, showlegend=False, hoverinfo="skip", name=f"{label} high"))
            traces.append(dict(type="scatter", x=x, y=part.low.to_numpy(), mode="lines", line=dict(width=0),
                               fill="tonexty", fillcolor=_rgba(color, 0.18), legendgroup=label, showlegend=False,
                               hoverinfo="skip", name=f"{label} low"))
            traces.append(dict(type="scatter", x=x, y=part.center.to_numpy(), name=label, legendgroup=label,
                               mode="lines+markers" if len(x) <= 30 else "lines",
                               line=dict(color=color, width=2, dash=SERIES_DASHES[s % len(SERIES_DASHES)]),
                               customdata=np.stack([part.low.to_numpy(), part.high.to_numpy(), part.n.to_numpy()],
                                                   axis=1),
                               hovertemplate=f"{stat} %{{y:.4g}} [%{{customdata[0]:.4g}}, %{{customdata[1]:.4g}}] "
                                             f"({band}, %{{customdata[2]}} runs)"))
    yaxis = dict(type="log" if log_y else "linear", title=dict(text=y_title or ""), automargin=True,
                 exponentformat="power" if log_y else "e")
    xaxis = dict(title=dict(text=x_title), automargin=True)
    if x_range is not None:
        xaxis.update(x_range_settings(x_range))
    entries = sum(1 for t in traces if t.get("showlegend", True))
    legend = dict(orientation="h", yanchor="top", y=-0.3, xanchor="left", x=0.0)
    layout = dict(_LAYOUT, title=dict(text=title), uirevision=uirevision or title,
                  height=min(height + 22 * entries, 900) if entries > 2 else height, showlegend=True,
                  xaxis=xaxis, yaxis=yaxis, legend=legend)
    return go.Figure(data=traces, layout=layout, _validate=False)


def _rgba(color: str, alpha: float) -> str:
    """'#1f77b4' (or 'rgb(…)') -> 'rgba(r, g, b, alpha)' for a band's fill."""
    from plotly.colors import hex_to_rgb, unlabel_rgb
    r, g, b = hex_to_rgb(color) if color.startswith("#") else unlabel_rgb(color)
    return f"rgba({int(r)}, {int(g)}, {int(b)}, {alpha})"


# -- Live and Compare's linked layout: every chart a subplot of one figure on one x axis -------------------------
@dataclass
class Panel:
    """One chart of a stacked figure: run curves (queries.chart_series rows), optional group bands
    (queries.group_series rows) and optional horizontal reference lines (label, y), e.g. the teacher's loss."""
    title: str
    series: pd.DataFrame | None = None
    y_title: str | None = None
    log_y: bool = False
    groups: pd.DataFrame | None = None
    references: list[tuple[str, float]] = dc_field(default_factory=list)


def stacked_figure(panels: list[Panel], x_title: str = "step", colors: dict[str, str] | None = None,
                   labels: dict[str, str] | None = None, group_colors: dict[str, str] | None = None,
                   main_run: str | None = None, uirevision: str | None = None, row_height: int = 220,
                   stat: str = "median", band: str = "min–max") -> go.Figure:
    """Several charts stacked in ONE figure whose subplots share one x axis: zoom or pan any of them and all
    follow, and the hover line reads every chart at that x (hovermode "x unified" + hoversubplots="axis", which
    plotly.js applies only to subplots on the very same axis). One figure instead of one per chart is also what
    keeps a 12-chart page fast in the browser: plotly's fixed cost per plot (axes, modebar, layout) is paid once.

    The run `main_run` gets the faint raw line under its smoothed one; other runs (overlays) their smoothed line in
    their own colour; groups a median/mean line over a band with the run count in the legend. A curve's legend
    entry toggles it in every subplot (legendgroup). Each trace's `meta` is its panel's title (tests and the
    browser find a chart's curves by it)."""
    n = len(panels)
    if n == 0:
        return _empty("Charts", "no chart chosen")
    gap = 56                                        # px between rows: the next subplot's title
    plot_height = n * row_height + (n - 1) * gap
    all_runs = list(dict.fromkeys(r for p in panels if p.series is not None and not p.series.empty
                                  for r in p.series.run))
    by_run = len(all_runs) > 1 or any(p.groups is not None and not p.groups.empty for p in panels)
    traces: list[dict] = []
    layout: dict = {}
    annotations: list[dict] = []
    shapes: list[dict] = []
    seen_legend: set[str] = set()
    x_values = []

    def legend_once(group: str) -> bool:
        first = group not in seen_legend
        seen_legend.add(group)
        return first

    for i, panel in enumerate(panels):
        axis = "y" if i == 0 else f"y{i + 1}"
        top = 1 - i * (row_height + gap) / plot_height
        domain = [max(0.0, top - row_height / plot_height), min(1.0, top)]
        annotations.append(dict(text=html.escape(panel.title, quote=False), x=0, xref="paper", y=domain[1],
                                yref="paper", xanchor="left", yanchor="bottom", showarrow=False,
                                font=dict(size=14)))
        # Fixed margins, not automargin: with twelve axes plotly measured, moved the margins and redrew — 2.5×
        # the drawing time in Chromium (0.33 s vs 0.83 s median for 12 charts on a loaded machine).
        yaxis = dict(domain=domain, anchor="x", type="log" if panel.log_y else "linear", automargin=False,
                     title=dict(text=panel.y_title or "", standoff=6), exponentformat="power" if panel.log_y else "e")
        values = []
        series = panel.series if panel.series is not None else pd.DataFrame()
        names = list(dict.fromkeys(series.series)) if not series.empty else []
        for r, run in enumerate(dict.fromkeys(series.run) if not series.empty else []):
            for s, name in enumerate(names):
                part = series[(series.run == run) & (series.series == name)]
                if part.empty:
                    continue
                if by_run:
                    color = (colors or {}).get(run, color_for(all_runs.index(run)))
                    label = (labels or {}).get(run, run)
                    group, dash = f"run:{run}", SERIES_DASHES[s % len(SERIES_DASHES)]
                    text = f"{label} · {series_name(name)}" if len(names) > 1 else label
                else:
                    color, group, dash = color_for(s), f"series:{name}", "solid"
                    text = series_name(name)
                text = html.escape(text, quote=False)           # a run name is the user's text: never markup
                x, y_raw, y_smooth = part.x.to_numpy(), part.raw.to_numpy(), part.smooth.to_numpy()
                x_values.append(pd.to_numeric(part.x, errors="coerce").to_numpy(dtype="float64"))
                values.append(y_smooth)
                main = run == main_run or not by_run
                if main and not np.allclose(y_raw, y_smooth, equal_nan=True):
                    values.append(y_raw)
                    traces.append(dict(type="scatter", x=x, y=y_raw, xaxis="x", yaxis=axis, mode="lines",
                                       name=f"{text} (raw)", legendgroup=group, showlegend=False, hoverinfo="skip",
                                       line=dict(color=color, width=1), opacity=RAW_OPACITY, meta=panel.title))
                # Single-run curves need no legend (the subplot title names them) unless a chart holds several.
                show = (by_run or len(names) > 1) and legend_once(group if by_run else f"{group}:{panel.title}")
                traces.append(dict(type="scatter", x=x, y=y_smooth, xaxis="x", yaxis=axis,
                                   mode="lines+markers" if len(x) <= 30 else "lines", name=text, legendgroup=group,
                                   showlegend=show, line=dict(color=color, width=2 if main else 1.5, dash=dash),
                                   hovertemplate="%{y:.4g}", meta=panel.title))
        if panel.groups is not None and not panel.groups.empty:
            gnames = list(dict.fromkeys(panel.groups.series))
            for g, grp in enumerate(dict.fromkeys(panel.groups.group)):
                color = (group_colors or {}).get(grp, color_for(g + 1))
                for s, name in enumerate(gnames):
                    part = panel.groups[(panel.groups.group == grp) & (panel.groups.series == name)]
                    if part.empty:
                        continue
                    runs = int(part.n.max())
                    text = html.escape(f"{grp} (n={runs})" + (f" · {series_name(name)}" if len(gnames) > 1 else ""),
                                       quote=False)
                    legend = f"group:{grp}"
                    x = part.x.to_numpy()
                    x_values.append(x.astype("float64"))
                    values.extend([part.low.to_numpy(), part.high.to_numpy()])
                    traces.append(dict(type="scatter", x=x, y=part.high.to_numpy(), xaxis="x", yaxis=axis,
                                       mode="lines", line=dict(width=0), legendgroup=legend, showlegend=False,
                                       hoverinfo="skip", name=f"{text} high", meta=panel.title))
                    traces.append(dict(type="scatter", x=x, y=part.low.to_numpy(), xaxis="x", yaxis=axis,
                                       mode="lines", line=dict(width=0), fill="tonexty", fillcolor=_rgba(color, 0.18),
                                       legendgroup=legend, showlegend=False, hoverinfo="skip", name=f"{text} low",
                                       meta=panel.title))
                    traces.append(dict(type="scatter", x=x, y=part.center.to_numpy(), xaxis="x", yaxis=axis,
                                       name=text, legendgroup=legend, showlegend=legend_once(legend),
                                       mode="lines+markers" if len(x) <= 30 else "lines",
                                       line=dict(color=color, width=2, dash=SERIES_DASHES[s % len(SERIES_DASHES)]),
                                       customdata=np.stack([part.low.to_numpy(), part.high.to_numpy(),
                                                            part.n.to_numpy()], axis=1),
                                       hovertemplate=f"{stat} %{{y:.4g}} [%{{customdata[0]:.4g}}, "
                                                     f"%{{customdata[1]:.4g}}] ({band}, %{{customdata[2]}} runs)",
                                       meta=panel.title))
        for label, value in panel.references:
            if value is None or not math.isfinite(value):
                continue
            values.append(np.array([value], dtype="float64"))
            # A shape across the whole width (it stays put when zooming) with its label and value on it.
            shapes.append(dict(type="line", xref="x domain", x0=0, x1=1, yref=axis, y0=value, y1=value,
                               line=dict(color="#444", width=1.5, dash="dash"),
                               label=dict(text=f"{html.escape(label, quote=False)} {value:.4g}",
                                          textposition="end", yanchor="bottom", font=dict(size=11, color="#444"))))
        if not values:
            annotations.append(dict(text="no data yet", x=0.5, xref="paper", y=sum(domain) / 2, yref="paper",
                                    showarrow=False, font=dict(color="gray")))
            yaxis.update(showticklabels=False, showgrid=False, zeroline=False)
        else:
            flat = y_range_for_flat(np.concatenate([np.asarray(v, dtype="float64") for v in values]), panel.log_y)
            if flat is not None:
                yaxis.update(range=flat, autorange=False)
        layout["yaxis" if i == 0 else f"yaxis{i + 1}"] = yaxis
    xaxis = dict(title=dict(text=x_title), anchor="y" if n == 1 else f"y{n}", automargin=False, domain=[0, 1],
                 showspikes=True, spikemode="across", spikethickness=1, spikedash="dot", spikecolor="#888")
    if x_title == "step" and x_values:
        xaxis.update(integer_ticks(np.concatenate(x_values)))
    legend_entries = sum(1 for t in traces if t.get("showlegend"))
    legend_rows = 0 if not legend_entries else 1 + legend_entries // 4
    title_px = 26                                   # the first subplot's title sits above its plot area
    top_margin = title_px + 24 * legend_rows + 8
    layout.update(height=plot_height + top_margin + 60, margin=dict(l=84, r=16, t=top_margin, b=50),
                  hovermode="x unified", hoversubplots="axis", hoverlabel=dict(namelength=-1),
                  uirevision=uirevision or "stacked", xaxis=xaxis, annotations=annotations, shapes=shapes,
                  showlegend=legend_entries > 0,    # legend above the first title, below plotly's toolbar
                  legend=dict(orientation="h", yanchor="bottom", y=1 + title_px / plot_height, xanchor="left",
                              x=0.0))
    # No plotly validation here (a live refresh rebuilds it every tick); the unit tests validate the output.
    return go.Figure(data=traces, layout=layout, _validate=False)
