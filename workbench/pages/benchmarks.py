"""Benchmarks: the reports that benchmarks/bench_hybrid.py wrote (markdown + plotly figures), for a user: the
verdict first, the headline table with plain method names and a legend, details folded. Nothing here is computed
by the app: every number comes from the run that wrote the report (workbench/bench_view.py only rewords it)."""
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
preamble, sections = bench_view.split_report(markdown)

summary = bench_view.verdict(markdown)
if summary:
    st.markdown("### Verdict")
    st.info(summary)
# The quick report's headline table, or the two-track report's targets table: shown open, the rest folded.
headline = [(t, b) for t, b in sections if t.startswith(("Headline", "Targets"))]
for title, body in headline:
    st.markdown(f"### {bench_view.plain(title)}")
    st.markdown(bench_view.plain(body))
with st.expander("What the names mean", expanded=not summary):
    st.markdown("\n".join(f"- **{code}** — {name}" for code, name in bench_view.METHODS.items()))
    st.markdown("\n".join(f"- **{code}** — {name}" for code, name in bench_view.WORKLOADS.items()))
    st.caption("Ratios are method ÷ reference (lower is better) with a 95 % paired bootstrap interval; "
               "“(win)” means the whole interval is below 1, “(loss)” above 1.")
with st.expander("How it was measured"):
    st.markdown(bench_view.plain(preamble))
for title, body in sections:
    if (title, body) in headline:
        continue
    with st.expander(bench_view.plain(title)):
        st.markdown(bench_view.plain(body))

figures = sorted((chosen / "figures").glob("*.json")) if (chosen / "figures").is_dir() else []
with st.expander(f"Figures ({len(figures)})"):
    for path in figures:
        try:
            st.plotly_chart(bench_view.recolor(pio.read_json(path)), width="stretch", key=f"bench-{path.stem}")
        except ValueError as exc:                 # a damaged figure file: say which, show the rest
            st.warning(f"{ui.plain(path.name)}: not a plotly figure ({ui.plain(exc)})")
