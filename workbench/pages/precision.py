"""Precision: the per-layer precision plan (bits by layer and module type), the sensitivity features behind it,
parameter-cluster membership, per-layer quantization error and ternary code distribution, and the model's size."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from hybrid_optimization.tracking import StoreError
from workbench import charts, queries, ui

ui.page_header("Precision", "How many bits each layer got, why, and what quantization does to it.")
store = ui.open_store()
if store is None:
    st.stop()
run_id = ui.pick_run(ui.list_runs(store), key="precision_run")
if run_id is None:
    st.stop()

try:
    run = store.get_run(run_id)
    plan = queries.read_plan(store, run_id)
    history = queries.read_layers(store, run_id, all_steps=True)
except StoreError as exc:
    st.error(ui.plain(exc))
    st.stop()

if plan.empty:
    st.info("No precision plan for this run yet. The trainer plans per-layer bits after a short warm-up, and only "
            "for hybrid runs that quantize with parameter clustering on; layer statistics appear every "
            "log_interval steps of a quantized run.")
size = queries.plan_size(plan)
m = st.columns(5)
m[0].metric("Average bits (linear layers)", "—" if size["avg_bits"] is None else f"{size['avg_bits']:.3f}",
            help="Parameter-weighted over the layers of the plan.")
m[1].metric("Quantized parameters", f"{size['params']:,}" if size["params"] else "—")
m[2].metric("Packed size (linear layers)", "—" if size["bytes"] is None else f"{size['bytes'] / 2**20:.2f} MiB",
            help="bits × parameters of the planned layers, without scales.")
m[3].metric("FP32 size (linear layers)", "—" if size["fp32_bytes"] is None else f"{size['fp32_bytes'] / 2**20:.2f} MiB")
m[4].metric("Compression vs FP32 (linear layers)", "—" if size["compression"] is None else f"{size['compression']:.2f}×",
            help="32 bits ÷ the plan's average bits over the quantized linear layers only (no scales, embeddings "
                 "or head). The exported file below is the whole model.")
export = (run.get("artifacts") or {}).get("export")
summary = run.get("summary") or {}
if export and Path(export).is_file():
    whole = summary.get("compression_vs_fp32_file")
    st.caption(f"Exported file {ui.plain(Path(export).name)}: {Path(export).stat().st_size / 2**20:.2f} MiB on disk — the "
               "whole file: packed codes plus scales, embeddings and head"
               + (f"; compression vs FP32 (whole file) {whole:.2f}×" if whole else "") + ".")

left, right = st.columns([2, 1])
left.plotly_chart(charts.bits_per_layer_figure(plan), key="precision_bits")
right.plotly_chart(charts.bits_by_module_figure(plan), key="precision_bits_module")
st.plotly_chart(charts.sensitivity_heatmap(queries.sensitivity_table(plan)), key="precision_sensitivity")
st.plotly_chart(charts.param_cluster_figure(plan), key="precision_clusters")

steps = sorted(history.step.unique()) if not history.empty else []
if steps:
    step = st.select_slider("Layer statistics at step", steps, value=steps[-1], key="precision_step") \
        if len(steps) > 1 else steps[0]
    layers = history[history.step == step]
    if len(steps) == 1:
        st.caption(f"Layer statistics were logged once, at step {steps[0]:,} (every log_interval steps of a "
                   "quantized run).")
else:
    layers = history
a, b = st.columns(2)
a.plotly_chart(charts.layer_error_figure(layers), key="precision_error")
b.plotly_chart(charts.code_distribution_figure(layers), key="precision_codes")
if not plan.empty:
    with st.expander("The plan as a table"):
        st.dataframe(plan.drop(columns=["features_json"], errors="ignore"), hide_index=True)
