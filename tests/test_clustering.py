import io

import numpy as np
import pytest
import torch

from hybrid_optimization import ClusterBalancedSampler, KMeansClustering


def blobs(sizes=(300, 200, 20), dim=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10, size=(len(sizes), dim))
    X = np.concatenate([rng.normal(size=(n, dim)) + c for n, c in zip(sizes, centres)]).astype(np.float32)
    truth = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    return X, truth


def test_kmeans_recovers_separated_blobs_and_reports_cluster_info():
    X, truth = blobs()
    km = KMeansClustering(n_clusters=3).fit(X)
    labels = km.predict(X)
    # each true blob maps to exactly one cluster
    assert all(len(set(labels[truth == t])) == 1 for t in range(3))
    info = km.get_cluster_info(X)
    assert sorted(v["size"] for v in info.values()) == [20, 200, 300]
    for cid, v in info.items():
        members = X[labels == cid]
        assert v["mean"] == pytest.approx(float(members.mean()), rel=1e-5)
        assert v["std"] == pytest.approx(float(members.std()), rel=1e-5)
        assert np.allclose(v["centroid"], members.mean(axis=0), atol=1e-3)


def test_kmeans_accepts_torch_and_uses_minibatch_for_large_inputs():
    X, _ = blobs(sizes=(3000, 3000))
    km = KMeansClustering(n_clusters=2, minibatch_threshold=5000).fit(torch.from_numpy(X))
    assert type(km.model_).__name__ == "MiniBatchKMeans"
    assert set(km.predict(X)) == {0, 1}
    assert type(KMeansClustering(2).fit(X[:100]).model_).__name__ == "KMeans"


@pytest.mark.parametrize("data,message", [
    (np.zeros((0, 3)), "empty"),
    (np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 2.0]]), "NaN or Inf.*rows 0"),
    (np.array([[1.0, 2.0], [np.inf, 1.0], [3.0, 3.0]]), "NaN or Inf.*rows 1"),
    (np.ones((2, 3)), "n_clusters=3 is larger than the number of samples \\(2\\)"),
    ([["a", "b"], ["c", "d"], ["e", "f"]], "numeric array"),
])
def test_kmeans_bad_input_gives_a_clear_error(data, message):
    with pytest.raises(ValueError, match=message):
        KMeansClustering(n_clusters=3).fit(data)


def test_kmeans_predict_before_fit_and_wrong_width():
    with pytest.raises(RuntimeError, match="not fitted"):
        KMeansClustering(2).predict(np.ones((3, 2)))
    km = KMeansClustering(2).fit(np.random.rand(10, 3))
    with pytest.raises(ValueError, match="3"):
        km.predict(np.ones((2, 4)))
    with pytest.raises(ValueError, match="n_clusters"):
        KMeansClustering(0)


def test_sampler_balances_clusters_and_caps_repetition():
    labels = np.array([0] * 1000 + [1] * 200 + [2] * 8)
    sampler = ClusterBalancedSampler(labels, batch_size=16, max_repeats=2, seed=0)
    epoch = [sampler.next_batch() for _ in range(len(sampler))]
    drawn = np.bincount(np.concatenate(epoch), minlength=len(labels))
    assert drawn.max() <= 2                         # no sample more than max_repeats times per epoch
    assert drawn[labels == 2].sum() == 16           # the tiny cluster gave all it may, no more
    # batches are shared evenly between clusters that can still supply them
    per_cluster = sampler.batches_per_cluster
    assert per_cluster[1] >= 0.3 * per_cluster[0]
    assert all(len(b) == 16 for b in epoch)


def test_sampler_state_dict_resumes_the_same_sequence():
    labels = np.random.default_rng(0).integers(0, 4, size=500)
    a = ClusterBalancedSampler(labels, 10, max_repeats=2, seed=3)
    for _ in range(37):
        a.next_batch()
    b = ClusterBalancedSampler(labels, 10, max_repeats=2, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(80):       # crosses an epoch boundary
        assert np.array_equal(a.next_batch(), b.next_batch())
        assert a.last_cluster == b.last_cluster

    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["epoch"] == a.epoch


def test_sampler_named_cluster_and_bad_arguments():
    labels = np.array([0] * 50 + [1] * 3)
    sampler = ClusterBalancedSampler(labels, batch_size=4, max_repeats=1)
    batch = sampler.sample_from_cluster(1, 4)       # cluster 1 has 3 samples: the 4th comes from cluster 0
    assert sorted(labels[batch].tolist()) == [0, 1, 1, 1] and sampler.last_cluster == 1
    batch = sampler.sample_from_cluster(1, 4)       # exhausted for this epoch: another cluster serves
    assert set(labels[batch]) == {0}
    with pytest.raises(ValueError, match="cluster_id"):
        sampler.sample_from_cluster(5)
    with pytest.raises(ValueError, match="batch_size"):
        ClusterBalancedSampler(labels, batch_size=0)
    with pytest.raises(ValueError, match="at least one"):
        ClusterBalancedSampler([], batch_size=2)


def test_mixed_sampler_gives_every_batch_an_equal_share_of_each_cluster():
    labels = np.array([0] * 300 + [1] * 100 + [2] * 40 + [3] * 60)
    sampler = ClusterBalancedSampler(labels, batch_size=16, max_repeats=2, seed=0, mixed=True)
    for _ in range(10):
        batch = sampler.next_batch()
        assert len(batch) == 16
        assert np.bincount(labels[batch], minlength=4).tolist() == [4, 4, 4, 4]
    single = ClusterBalancedSampler(labels, batch_size=16, max_repeats=2, seed=0)
    assert all(len(set(labels[single.next_batch()])) == 1 for _ in range(10))
    assert sampler.samples_per_cluster.tolist() == [40, 40, 40, 40]
