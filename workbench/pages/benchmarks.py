"""Benchmarks: the reports that benchmarks/bench_hybrid.py wrote (markdown + plotly figures), for a newcomer: what to
use in each situation first (from the report's own verdict), the method names explained, the headline table, the
robustness table when the report has one, the figures, and the details folded. Nothing here is computed by the
app: every number comes from the run that wrote the report (workbench/bench_view.py only rewords it)."""
from __future__ import annotations

import plotly.io as pio
import streamlit as st

from workbench import bench_view, queries, ui

ui.page_header("Benchmarks", "Hybrid vs baselines, measured by `python benchmarks/bench_hybrid.py --medium` "
                             "(both AlgoPerf tracks; `--quick` for a 10-minute check, `--full --device cuda` on a "
                             "GPU); each report states its command, date, machine and versions.")
root = queries.benchmark_results_root()
reports = queries.benchmark_reports(root)
if not reports:
    st.info(f"No benchmark report under {ui.plain(root)}. Run `python benchmarks/bench_hybrid.py --quick` to make one.")
    st.stop()
chosen = st.selectbox("Report", reports, format_func=lambda p: p.name, key="benchmark_report")
markdown = (chosen / "report.md").read_text(encoding="utf-8")
names = bench_view.method_names(chosen)        # the report's own method codes and labels (its results.json)
preamble, sections = bench_view.split_report(markdown)

# What to use, one sentence per situation, from the report's verdict (the two-track reports write one).
advice = bench_view.situations(markdown)
if advice:
    st.markdown("### What to use")
    st.markdown("\n".join(f"- {bench_view.plain(line, names)}" for line in advice))
summary = bench_view.verdict(markdown)
if summary:
    with st.expander("The verdict in full", expanded=not advice):
        st.markdown(bench_view.plain(summary, names))
with st.expander("What the names mean", expanded=True):
    left, right = st.columns(2)
    left.markdown("\n".join(f"- **{code}**: {name}" for code, name in names.items())
                  or "This report lists no method names (its results.json predates them).")
    right.markdown("\n".join(f"- **{code}**: {name}" for code, name in bench_view.WORKLOADS.items())
                   + "\n" + "\n".join(f"- **{term}**: {meaning}" for term, meaning in bench_view.TERMS.items()))
# The quick report's headline table or the two-track report's targets table, and a robustness table (how a method
# copes with a mis-set LR) when the report has one: shown open; the rest folded.
opened = [(t, b) for t, b in sections if t.startswith(("Headline", "Targets")) or "robust" in t.lower()]
for title, body in opened:
    st.markdown(f"### {bench_view.plain(title)}")
    st.markdown(bench_view.plain(body, names))

figures: list[tuple[str, object]] = []
for path in sorted((chosen / "figures").glob("*.json")) if (chosen / "figures").is_dir() else []:
    try:
        figures.append((path.stem, pio.read_json(path)))
    except ValueError as exc:                 # a damaged figure file: say which, show the rest
        st.warning(f"{ui.plain(path.name)}: not a plotly figure ({ui.plain(exc)})")
if not figures and (chosen / "figures.html").is_file():
    # figures.html loads plotly.js from a CDN: its figures are read out of it and drawn here instead.
    html = (chosen / "figures.html").read_text(encoding="utf-8", errors="replace")
    figures = [(f"figure-{i}", fig) for i, fig in enumerate(bench_view.figures_from_html(html))]
if figures:
    st.markdown(f"### Figures ({len(figures)})")
    for name, fig in figures:
        st.plotly_chart(bench_view.recolor(fig, names), width="stretch", key=f"bench-{name}")

with st.expander("How it was measured"):
    st.markdown(bench_view.plain(preamble))
for title, body in sections:
    if (title, body) in opened or title == "Verdict":
        continue
    with st.expander(bench_view.plain(title)):
        st.markdown(bench_view.plain(body, names))
