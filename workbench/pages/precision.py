"""Precision: the per-layer precision plan (bits by layer and module type), the sensitivity features behind it,
parameter-cluster membership, per-layer quantization error and ternary code distribution, and the model's size."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from hybrid_optimization.tracking import StoreError
from workbench import charts, headline, queries, ui

FEATURES = {
    "sensitivity": "HAWQ-V2 score: curvature × ‖W − Q(W)‖² at the lowest bit-width; the planner gives the most "
                   "sensitive layers the most bits",
    "hessian_trace": "curvature: Hutchinson estimate of the Hessian's trace per parameter, tr(H)/n",
    "fisher": "curvature: mean squared gradient of the layer's weights (empirical Fisher)",
    "curvature": "the curvature used in the score: hessian_trace, or fisher where that estimate is ≤ 0",
}


def feature_meaning(name: str) -> str:
    if name.startswith("err_"):
        return f"relative quantization error ‖W − Q(W)‖ / ‖W‖ at {name[4:]} bits"
    return FEATURES.get(name, "a feature the planner stored")


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
summary = run.get("summary") or {}
# Two meanings, two labels (headline.py): the plan's bits (codes only) here, the packed export's (codes + scales)
# beside them when the run exported — the same numbers and labels as the Run summary page.
m = st.columns(4)
m[0].metric(headline.PLANNED_BITS_LABEL, headline.format_value("avg_bits", size["avg_bits"]),
            help="Parameter-weighted average of the plan's bits over the quantized linear layers: codes only, "
                 "without the per-group scales.")
m[1].metric(headline.PLANNED_COMPRESSION_LABEL, headline.format_value("planned_compression", size["compression"]),
            help="32 bits ÷ the planned bits/weight. No scales, embeddings or head.")
m[2].metric(headline.STORED_BITS_LABEL, headline.format_value("linear_bits_per_weight",
                                                             summary.get("linear_bits_per_weight")),
            help="What the packed export stores for the linear layers: codes + scales, × 8 ÷ parameters. Empty until "
                 "the run exports.")
m[3].metric(headline.STORED_COMPRESSION_LABEL, headline.format_value("compression_vs_fp32_linear",
                                                                    summary.get("compression_vs_fp32_linear")),
            help="32 bits ÷ the stored bits/weight (the Run summary's number).")
n = st.columns(4)
n[0].metric(headline.value_label("quantized_params"), headline.format_value("quantized_params", size["params"] or None))
n[1].metric("Planned code size (linear layers, no scales)",
            headline.format_value("export_bytes", size["bytes"]) if size["bytes"] is not None else "—",
            help="bits × parameters of the planned layers, without scales.")
n[2].metric("FP32 size (linear layers)",
            headline.format_value("export_bytes", size["fp32_bytes"]) if size["fp32_bytes"] else "—")
export = (run.get("artifacts") or {}).get("export")
if export and Path(export).is_file():
    n[3].metric("Exported file (whole model)", headline.format_value("export_bytes", Path(export).stat().st_size),
                help="Packed codes plus scales, embeddings and head"
                     + (f"; {headline.value_label('compression_vs_fp32_file')} "
                        f"{headline.format_value('compression_vs_fp32_file', summary['compression_vs_fp32_file'])}"
                        if summary.get("compression_vs_fp32_file") else "") + ".")

left, right = st.columns([2, 1])
left.plotly_chart(charts.bits_per_layer_figure(plan), key="precision_bits")
right.plotly_chart(charts.bits_by_module_figure(plan), key="precision_bits_module")
sensitivity = queries.sensitivity_table(plan)
st.plotly_chart(charts.sensitivity_heatmap(sensitivity), key="precision_sensitivity")
if not sensitivity.empty:
    # The heatmap's rows, explained (hybrid_optimization/precision.py measures them).
    st.dataframe(pd.DataFrame({"feature": list(sensitivity.columns),
                               "what it measures": [feature_meaning(c) for c in sensitivity.columns]}),
                 hide_index=True, width="stretch", key="precision_sensitivity_legend")
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
