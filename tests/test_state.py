"""The state tracker keeps "no cluster" apart from cluster 0 (issue 9, defect 4)."""
from hybrid_optimization.state import TrainingStateTracker


def test_a_mixed_batch_does_not_reach_the_aux_net_as_cluster_0():
    mixed = TrainingStateTracker().update(loss=2.0, grad_norm=1.0, cluster_id=None, n_clusters=8)
    first = TrainingStateTracker().update(loss=2.0, grad_norm=1.0, cluster_id=0, n_clusters=8)
    assert mixed.cluster_id is None and first.cluster_id == 0
    assert float(mixed.feature_values()[2]) == 0.0 and float(first.feature_values()[2]) == -1.0
    assert mixed.feature_values() != first.feature_values()
