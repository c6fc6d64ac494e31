"""Hybrid Optimization Workbench: `streamlit run app.py`.

A thin router (st.navigation) over the pages in workbench/pages/. The pages read the run store; training runs are
separate processes started through the pipeline's CLI, so this app may restart while they go on.
"""
from pathlib import Path

import streamlit as st

from workbench import ui

# A local icon: a ":material/...:" page icon is fetched from a font host on the internet, and this app loads nothing
# from outside this machine.
ICON = Path(__file__).resolve().parent / "workbench" / "icon.png"
st.set_page_config(page_title="Hybrid Optimization Workbench", page_icon=str(ICON), layout="wide")

ui.runs_root()  # puts the default ($HYBRID_RUNS_ROOT or ~/.cache/...) into session state for the widget below
with st.sidebar:
    st.text_input("Runs root", key="runs_root",
                  help="Folder holding runs.db and one folder per run. Default: $HYBRID_RUNS_ROOT or "
                       "~/.cache/hybrid-workbench/runs.")

page = st.navigation({
    "Train": [st.Page(ui.PAGES["configure"], title="Configure & launch", icon=":material/tune:", default=True),
              st.Page(ui.PAGES["live"], title="Live run", icon=":material/monitoring:"),
              st.Page(ui.PAGES["sweep"], title="Sweep", icon=":material/travel_explore:")],
    "Analyse": [st.Page(ui.PAGES["clusters"], title="Clusters", icon=":material/bubble_chart:"),
                st.Page(ui.PAGES["precision"], title="Precision", icon=":material/memory:"),
                st.Page(ui.PAGES["compare"], title="Compare runs", icon=":material/compare_arrows:"),
                st.Page(ui.PAGES["summary"], title="Run summary", icon=":material/summarize:"),
                st.Page(ui.PAGES["chat"], title="Chat", icon=":material/chat:"),
                st.Page(ui.PAGES["benchmarks"], title="Benchmarks", icon=":material/speed:")],
})
page.run()
