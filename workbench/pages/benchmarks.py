"""Benchmarks: the reports that benchmarks/bench_hybrid.py wrote (markdown + plotly figures), as committed or as
regenerated on this machine. Nothing here is computed by the app: every number comes from the run that wrote it."""
from __future__ import annotations

import plotly.io as pio
import streamlit as st

from workbench import queries, ui

ui.page_header("Benchmarks", "Hybrid vs baselines, measured by `python benchmarks/bench_hybrid.py --quick` "
                             "(or `--full`); the report states its command, date, machine and versions.")
root = queries.benchmark_results_root()
reports = queries.benchmark_reports(root)
if not reports:
    st.info(f"No benchmark report under {root}. Run `python benchmarks/bench_hybrid.py --quick` to make one.")
    st.stop()
chosen = st.selectbox("Report", reports, format_func=lambda p: p.name, key="benchmark_report")
figures = sorted((chosen / "figures").glob("*.json")) if (chosen / "figures").is_dir() else []
report_tab, figures_tab = st.tabs(["Report", f"Figures ({len(figures)})"])
with report_tab:
    st.markdown((chosen / "report.md").read_text(encoding="utf-8"))
with figures_tab:
    for path in figures:
        try:
            st.plotly_chart(pio.read_json(path), width="stretch", key=f"bench-{path.stem}")
        except ValueError as exc:                 # a damaged figure file: say which, show the rest
            st.warning(f"{path.name}: not a plotly figure ({exc})")
