"""K-means clustering for data and parameters, backed by scikit-learn.

`KMeansClustering` keeps the guide's API (`fit`, `predict`, `get_cluster_info`) and delegates the algorithm to
scikit-learn: `KMeans` (k-means++ init, Lloyd/Elkan iterations) for small inputs and `MiniBatchKMeans` when the
input is large, where full-batch iterations would dominate the run's start-up time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:                       # scikit-learn is imported when a model is fitted: importing it costs ~1.7 CPU-s,
    from sklearn.cluster import KMeans, MiniBatchKMeans     # which every training start paid even on a cluster-cache hit


def as_feature_matrix(data: Any, what: str = "data") -> np.ndarray:
    """Turn an array-like (numpy, torch tensor, nested lists) into a finite 2-D float32 matrix, one row per sample.

    Inputs with more than two dimensions are flattened per sample; a 1-D input is one feature per sample.
    """
    if hasattr(data, "detach"):  # torch.Tensor, without importing torch here
        data = data.detach().cpu().float().numpy()
    try:
        array = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a numeric array (samples × features); could not convert it: {exc}") from None
    if array.ndim == 0:
        raise ValueError(f"{what} must be an array of samples, got a scalar")
    if array.shape[0] == 0 or array.size == 0:
        raise ValueError(f"{what} is empty: K-means needs at least one sample with at least one feature")
    if array.ndim == 1:
        array = array[:, None]
    elif array.ndim > 2:
        array = array.reshape(array.shape[0], -1)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        shown = ", ".join(str(i) for i in bad[:5]) + (", …" if len(bad) > 5 else "")
        raise ValueError(f"{what} has {len(bad)} row(s) with NaN or Inf values (rows {shown}); "
                         "remove or impute them before clustering")
    return array


class KMeansClustering:
    """K-means over the rows of a matrix.

    Parameters
    ----------
    n_clusters : number of clusters (≥ 1, at most the number of samples given to `fit`).
    random_state : seed for the k-means++ initialisation, so results are reproducible.
    minibatch_threshold : from this many samples on, `MiniBatchKMeans` is used instead of `KMeans`.
    max_iter, n_init : passed to scikit-learn.
    """

    def __init__(self, n_clusters: int = 8, random_state: int | None = 0, minibatch_threshold: int = 20_000,
                 max_iter: int = 300, n_init: int | str = "auto"):
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
            raise ValueError(f"n_clusters must be an integer ≥ 1, got {n_clusters!r}")
        self.n_clusters = int(n_clusters)
        self.random_state = random_state
        self.minibatch_threshold = int(minibatch_threshold)
        self.max_iter = max_iter
        self.n_init = n_init
        self.model_: KMeans | MiniBatchKMeans | None = None

    # -- estimator API ----------------------------------------------------------------------------------------------
    def fit(self, data: Any) -> "KMeansClustering":
        from sklearn.cluster import KMeans, MiniBatchKMeans

        X = as_feature_matrix(data)
        if self.n_clusters > X.shape[0]:
            raise ValueError(f"n_clusters={self.n_clusters} is larger than the number of samples ({X.shape[0]}); "
                             f"use at most {X.shape[0]} clusters or provide more samples")
        if X.shape[0] >= self.minibatch_threshold:
            # 4096-sample batches: large enough for stable centroid updates, small enough to stay fast on 2 cores.
            self.model_ = MiniBatchKMeans(n_clusters=self.n_clusters, random_state=self.random_state,
                                          batch_size=4096, n_init=3 if self.n_init == "auto" else self.n_init,
                                          max_iter=min(self.max_iter, 100))
        else:
            self.model_ = KMeans(n_clusters=self.n_clusters, random_state=self.random_state,
                                 n_init=self.n_init, max_iter=self.max_iter)
        self.model_.fit(X)
        return self

    def predict(self, data: Any) -> np.ndarray:
        model = self._fitted()
        X = as_feature_matrix(data)
        if X.shape[1] != model.cluster_centers_.shape[1]:
            raise ValueError(f"data has {X.shape[1]} features per sample but the clustering was fitted on "
                             f"{model.cluster_centers_.shape[1]}")
        return model.predict(X).astype(np.int64)

    def fit_predict(self, data: Any) -> np.ndarray:
        return self.fit(data).predict(data)

    @property
    def labels_(self) -> np.ndarray:
        return self._fitted().labels_.astype(np.int64)

    @property
    def cluster_centers_(self) -> np.ndarray:
        return self._fitted().cluster_centers_

    @property
    def inertia_(self) -> float:
        return float(self._fitted().inertia_)

    def get_cluster_info(self, data: Any) -> dict[int, dict[str, Any]]:
        """Statistics of each cluster on `data`: size, mean and std of its values, centroid, mean distance to it.

        Every cluster id appears, also when no sample of `data` falls into it (size 0, mean/std NaN).
        """
        X = as_feature_matrix(data)
        labels = self.predict(X)
        centers = self.cluster_centers_
        info: dict[int, dict[str, Any]] = {}
        for cid in range(self.n_clusters):
            members = X[labels == cid]
            size = int(members.shape[0])
            if size:
                distances = np.linalg.norm(members - centers[cid], axis=1)
                info[cid] = {"size": size, "mean": float(members.mean()), "std": float(members.std()),
                             "centroid": centers[cid].copy(), "mean_distance": float(distances.mean())}
            else:
                info[cid] = {"size": 0, "mean": float("nan"), "std": float("nan"),
                             "centroid": centers[cid].copy(), "mean_distance": float("nan")}
        return info

    def _fitted(self):
        if self.model_ is None:
            raise RuntimeError("KMeansClustering is not fitted yet: call fit(data) first")
        return self.model_


class ClusterBalancedSampler:
    """Batches of sample indices that give every data cluster an equal share of the batches, with a repetition cap.

    Plain balanced sampling over-repeats small clusters: a cluster of 10 samples gets as many batches as one of
    10,000. Following ClusterClip (Shao et al., ACL 2024), each sample may be drawn at most `max_repeats` times per
    epoch (an epoch is `len(self)` batches, i.e. one pass worth of samples); a cluster that has used up its
    allowance leaves the rotation until the next epoch, and a batch that its cluster cannot fill is completed from
    the next clusters in the rotation.

    mixed=False: each batch comes from one cluster (the guide's per-cluster sampling, which the aux net's cluster
    feature describes exactly). mixed=True: each batch takes an equal share from the clusters next in the rotation
    (⌈batch_size / n_clusters⌉ each), so every batch is balanced — the same data distribution with a far smaller
    batch-to-batch gradient variance (benchmarks/bench_hybrid.py measures the difference).

    Iterating yields np.ndarray batches of indices; `last_cluster` is the cluster that supplied (most of) the last
    batch and `batches_per_cluster` counts them (`samples_per_cluster` counts samples). `state_dict()` makes a
    resumed run draw the same batches.
    """

    def __init__(self, labels: Any, batch_size: int, max_repeats: int = 2, seed: int = 0, mixed: bool = False):
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if labels.size == 0:
            raise ValueError("ClusterBalancedSampler needs at least one labelled sample")
        if labels.min() < 0:
            raise ValueError("cluster labels must be ≥ 0")
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
        if isinstance(max_repeats, bool) or int(max_repeats) < 1:
            raise ValueError(f"max_repeats must be an integer ≥ 1, got {max_repeats!r}")
        self.labels = labels
        self.batch_size = int(batch_size)
        self.max_repeats = int(max_repeats)
        self.mixed = bool(mixed)
        self.n_clusters = int(labels.max()) + 1
        self.members = [np.flatnonzero(labels == c) for c in range(self.n_clusters)]
        self.rng = np.random.default_rng(seed)
        self.batches_per_cluster = np.zeros(self.n_clusters, dtype=np.int64)
        self.samples_per_cluster = np.zeros(self.n_clusters, dtype=np.int64)
        self.last_cluster: int | None = None
        self.epoch = 0
        self._start_epoch()

    def __len__(self) -> int:
        return max(1, -(-len(self.labels) // self.batch_size))

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return self.next_batch()

    # -- epoch bookkeeping --------------------------------------------------------------------------------------
    def _start_epoch(self) -> None:
        self._batches_in_epoch = 0
        self._draws = np.zeros(self.n_clusters, dtype=np.int64)       # draws from each cluster this epoch
        self._perm = [self.rng.permutation(m) for m in self.members]  # current pass over each cluster
        self._pos = np.zeros(self.n_clusters, dtype=np.int64)
        self._rotation: list[int] = []

    def _allowance(self, c: int) -> int:
        return self.max_repeats * len(self.members[c]) - int(self._draws[c])

    def _take(self, c: int, k: int) -> np.ndarray:
        """Up to k indices of cluster c, continuing its shuffled pass and starting a new pass when needed."""
        taken = []
        k = min(k, self._allowance(c))
        while k > 0:
            if self._pos[c] >= len(self._perm[c]):
                self._perm[c] = self.rng.permutation(self.members[c])
                self._pos[c] = 0
            chunk = self._perm[c][self._pos[c]:self._pos[c] + k]
            self._pos[c] += len(chunk)
            self._draws[c] += len(chunk)
            taken.append(chunk)
            k -= len(chunk)
        return np.concatenate(taken) if taken else np.empty(0, dtype=np.int64)

    def _next_cluster(self) -> int | None:
        for _ in range(2):
            while self._rotation:
                c = self._rotation.pop()
                if self._allowance(c) > 0:
                    return c
            # A new round: every cluster with allowance left, in a fresh random order.
            self._rotation = [int(c) for c in self.rng.permutation(self.n_clusters) if self._allowance(int(c)) > 0]
        return None

    # -- sampling -----------------------------------------------------------------------------------------------
    def next_batch(self) -> np.ndarray:
        """The next balanced batch (indices into the labelled samples)."""
        if self._batches_in_epoch >= len(self):
            self.epoch += 1
            self._start_epoch()
        first = self._next_cluster()
        if first is None:                       # every cluster used its allowance: the epoch is over
            self.epoch += 1
            self._start_epoch()
            first = self._next_cluster()
        share = -(-self.batch_size // self.n_clusters) if self.mixed else self.batch_size
        return self._fill_from(first, self.batch_size, share)

    def sample_from_cluster(self, cluster_id: int, batch_size: int | None = None) -> np.ndarray:
        """A batch from one named cluster; when that cluster has used its allowance, the next one serves."""
        if not 0 <= int(cluster_id) < self.n_clusters:
            raise ValueError(f"cluster_id must be in [0, {self.n_clusters - 1}], got {cluster_id!r}")
        if self._batches_in_epoch >= len(self) or all(self._allowance(c) <= 0 for c in range(self.n_clusters)):
            self.epoch += 1
            self._start_epoch()
        c = int(cluster_id) if self._allowance(int(cluster_id)) > 0 else self._next_cluster()
        return self._fill_from(c, batch_size or self.batch_size)

    def _fill_from(self, first: int, size: int, share: int | None = None) -> np.ndarray:
        """`size` indices: up to `share` from `first`, then from the next clusters in the rotation."""
        parts, counts = [], {}
        c = first
        while size > 0 and c is not None:
            chunk = self._take(c, min(size, share or size))
            if len(chunk):
                parts.append(chunk)
                counts[c] = counts.get(c, 0) + len(chunk)
                size -= len(chunk)
            if size > 0:
                c = self._next_cluster()
        if size > 0 and not parts:
            raise RuntimeError("no samples left to draw")      # unreachable: a new epoch restores allowances
        batch = np.concatenate(parts)
        self.last_cluster = max(counts, key=counts.get) if counts else first
        self.batches_per_cluster[self.last_cluster] += 1
        for cid, n in counts.items():
            self.samples_per_cluster[cid] += n
        self._batches_in_epoch += 1
        return batch

    # -- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state, "epoch": self.epoch, "batches_in_epoch": self._batches_in_epoch,
            "draws": self._draws.tolist(), "perm": [p.tolist() for p in self._perm], "pos": self._pos.tolist(),
            "rotation": list(self._rotation), "batches_per_cluster": self.batches_per_cluster.tolist(),
            "samples_per_cluster": self.samples_per_cluster.tolist(), "last_cluster": self.last_cluster,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["perm"]) != self.n_clusters:
            raise ValueError(f"sampler state has {len(state['perm'])} clusters, this sampler has {self.n_clusters}")
        self.rng.bit_generator.state = state["rng"]
        self.epoch = int(state["epoch"])
        self._batches_in_epoch = int(state["batches_in_epoch"])
        self._draws = np.asarray(state["draws"], dtype=np.int64)
        self._perm = [np.asarray(p, dtype=np.int64) for p in state["perm"]]
        self._pos = np.asarray(state["pos"], dtype=np.int64)
        self._rotation = [int(c) for c in state["rotation"]]
        self.batches_per_cluster = np.asarray(state["batches_per_cluster"], dtype=np.int64)
        self.samples_per_cluster = np.asarray(state["samples_per_cluster"], dtype=np.int64)
        self.last_cluster = state["last_cluster"]
