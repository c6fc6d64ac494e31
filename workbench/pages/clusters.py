"""Clusters: the training samples in 2-D coloured by data cluster (hover shows the text), cluster sizes, how many
batches each cluster supplied (the repetition cap at work) and the validation loss of every cluster over steps."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from hybrid_optimization.tracking import ACTIVE_STATUSES, StoreError
from workbench import charts, headline, queries, ui

ui.page_header("Clusters", "Data clusters of a run: what the K-means grouping found and how the cluster-balanced "
                           "sampler used it.")
store = ui.open_store()
if store is None:
    st.stop()
run_id = ui.pick_run(ui.list_runs(store), key="clusters_run")
if run_id is None:
    st.stop()


@st.cache_data(max_entries=4, show_spinner="Running t-SNE on the stored sample features…")
def tsne(run_key: str, features: np.ndarray, seed: int = 0) -> np.ndarray:
    # Imported here: scikit-learn is only loaded into the app process when someone asks for t-SNE.
    from sklearn.manifold import TSNE
    perplexity = float(min(30, max(5, (len(features) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


try:
    run = store.get_run(run_id)
    samples = queries.read_samples(store, run_id, features=True)
    batches = queries.read_cluster_batches(store, run_id)
    evals = queries.read_evals(store, run_id)
except StoreError as exc:
    st.error(ui.plain(exc))
    st.stop()

has_features = not samples.empty and samples.features.notna().all()
c1, c2 = st.columns([2, 1])
projection = c1.radio("Projection", ("PCA", "t-SNE"), horizontal=True, key="clusters_projection",
                      help="PCA: the trainer's 2-D projection of the sample features. t-SNE: computed here from the "
                           "stored features (a few seconds, then cached).")
splits = sorted(samples.split.unique()) if not samples.empty else []
split = c2.selectbox("Split", splits, key="clusters_split") if len(splits) > 1 else (splits[0] if splits else None)
shown = samples[samples.split == split] if split else samples

if projection == "t-SNE" and not has_features:
    st.info("This run stored no sample features, so only the trainer's PCA projection is available.")
    projection = "PCA"
if projection == "t-SNE" and len(shown) >= 5:
    coords = tsne(f"{run_id}:{split}:{len(shown)}", np.stack(shown.features.to_list()))
    shown = shown.assign(tx=coords[:, 0], ty=coords[:, 1])
    fig = charts.cluster_scatter(shown, "tx", "ty", title=f"Samples by cluster (t-SNE, {split})")
else:
    fig = charts.cluster_scatter(shown, title=f"Samples by cluster (PCA{', ' + split if split else ''})")
st.plotly_chart(fig, key="clusters_scatter")

left, right = st.columns(2)
train = samples[samples.split == "train"] if "train" in splits else samples
sizes = (train.groupby("cluster").size().rename("samples").reset_index()
         if not train.empty else pd.DataFrame(columns=["cluster", "samples"]))
left.plotly_chart(charts.cluster_bar(sizes, "samples", "Cluster sizes (training samples)", "samples"),
                  key="clusters_sizes")
reference = None
if not batches.empty and not sizes.empty:
    share = sizes.set_index("cluster").samples / sizes.samples.sum()
    reference = share * batches.batches.sum()
config = run.get("config") or {}
cap = config.get("max_sample_repeats")
clustered = headline.is_hybrid(run) and config.get("use_clustering", True)
if not clustered:
    # A baseline (or clustering switched off) draws its batches uniformly: no balanced sampling to explain.
    right.info("This run did not cluster its data: it draws its batches uniformly at random "
               f"({ui.plain(headline.kind_label(run)) if not headline.is_hybrid(run) else 'use_clustering off'}). "
               "The groups on this page are K-means clusters computed only to report the validation loss per "
               "cluster; training did not use them.")
elif batches.empty and config.get("cluster_batches") == "mixed":
    # Mixed batches have no single cluster: the sampler gives every batch an equal share of each cluster.
    right.info("This run used mixed cluster-balanced batches: every batch takes an equal share of each data cluster "
               f"(a sample at most max_sample_repeats = {cap if cap is not None else '—'} times per epoch), so there "
               "is no per-batch cluster to count. Runs with `--cluster_batches single` show the batches per cluster "
               "here.")
elif batches.empty and run["status"] not in ACTIVE_STATUSES:
    right.info(f"This run ({run['status']}) recorded no batches per cluster.")
else:
    right.plotly_chart(charts.cluster_bar(batches, "batches", "Batches supplied per cluster", "batches",
                                          reference=reference, reference_name="if sampled in proportion to size"),
                       key="clusters_batches")
    right.caption("Balanced sampling draws clusters evenly; the repetition cap "
                  f"(max_sample_repeats = {cap if cap is not None else '—'}) stops small clusters from being "
                  "repeated without end, so they supply fewer batches than large ones.")

cluster_keys = sorted((k for k in evals.key.unique() if k.startswith("val_loss_cluster_")),
                      key=lambda k: int(k.rsplit("_", 1)[1]) if k.rsplit("_", 1)[1].isdigit() else 0) \
    if not evals.empty else []
series = queries.eval_series(evals, cluster_keys, run=run_id)
ids = {k: int(k.rsplit("_", 1)[1]) for k in cluster_keys if k.rsplit("_", 1)[1].isdigit()}
log_y = st.toggle("log y", key="clusters_logy")
st.plotly_chart(charts.line_figure(series, "Validation loss per cluster", log_y=log_y, y_title="loss (nats/token)",
                                   colors={k: charts.color_for(c) for k, c in ids.items()},
                                   labels={k: f"cluster {c}" for k, c in ids.items()},
                                   uirevision=f"{run_id}:cluster-loss:{log_y}"),
                key="clusters_val_loss")
