"""TrainingState: the six quantities the auxiliary network sees, and how they are normalised.

The raw quantities span very different ranges (a gradient norm of 1e-6 and a step number of 10⁵ are both
normal), so a small network cannot use them as they are. `feature_values()` maps each to roughly [-3, 3]:
log scale for quantities that span decades, a log-ratio for the loss trend, a bounded code for the cluster id.
The mapping is fixed (not learned), so a saved auxiliary network means the same thing when it is loaded again.
Torch-free (plain numbers), like the controller that uses it; auxiliary_nn.features(state) is the tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

FEATURE_NAMES = ("log_loss", "log_grad_norm", "cluster", "log_loss_trend", "log_grad_variance", "log_step")


@dataclass
class TrainingState:
    current_loss: float
    gradient_magnitude: float
    cluster_id: int | None      # None: the batch has no cluster of its own (a mixed batch)
    loss_trend: float           # ratio of the short-term to the long-term loss average (< 1: the loss is falling)
    gradient_variance: float    # variance of the gradient norm over recent steps
    step_number: int
    n_clusters: int | None = None   # when known, the cluster id is scaled to [-1, 1]

    def feature_values(self) -> list[float]:
        """The six normalised features (each clipped to [-5, 5]); non-finite inputs map to 0."""
        values = (
            _signed_log1p(self.current_loss),
            _log10(self.gradient_magnitude) / 4.0,
            _cluster_code(self.cluster_id, self.n_clusters),
            10.0 * _log(self.loss_trend),
            _log10(self.gradient_variance) / 4.0,
            math.log10(1.0 + max(float(self.step_number), 0.0)) / 2.0,
        )
        return [max(-5.0, min(5.0, v)) if math.isfinite(v) else 0.0 for v in values]


def _signed_log1p(x: float) -> float:
    x = float(x)
    return math.copysign(math.log1p(abs(x)), x) if math.isfinite(x) else float("nan")


def _log10(x: float) -> float:
    x = float(x)
    return math.log10(x + 1e-12) if math.isfinite(x) and x >= 0 else float("nan")


def _log(x: float) -> float:
    x = float(x)
    return math.log(x) if math.isfinite(x) and x > 0 else float("nan")


def _cluster_code(cluster_id: int | None, n_clusters: int | None) -> float:
    # A batch without a cluster (mixed batches) is the midpoint 0 of the code range, not cluster 0 (which is -1
    # when the number of clusters is known).
    if cluster_id is None:
        return 0.0
    if n_clusters and n_clusters > 1:
        return 2.0 * float(cluster_id) / (n_clusters - 1) - 1.0
    return math.tanh(float(cluster_id) / 4.0)


class TrainingStateTracker:
    """Builds a TrainingState every step from the raw loss and gradient norm (running averages, no extra passes)."""

    def __init__(self, fast: float = 0.9, slow: float = 0.99):
        self.fast, self.slow = fast, slow
        self.step = 0
        self._loss_fast = self._loss_slow = 0.0
        self._norm_mean = self._norm_sq = 0.0
        self._n_loss = self._n_norm = 0
        self.last_loss: float | None = None

    def update(self, loss: float | None, grad_norm: float, cluster_id: int | None,
               n_clusters: int | None = None) -> TrainingState:
        if loss is not None and math.isfinite(loss):
            self._n_loss += 1
            self._loss_fast = self.fast * self._loss_fast + (1 - self.fast) * loss
            self._loss_slow = self.slow * self._loss_slow + (1 - self.slow) * loss
            self.last_loss = loss
        if math.isfinite(grad_norm):
            self._n_norm += 1
            self._norm_mean = self.slow * self._norm_mean + (1 - self.slow) * grad_norm
            self._norm_sq = self.slow * self._norm_sq + (1 - self.slow) * grad_norm ** 2
        state = TrainingState(
            current_loss=self.last_loss if self.last_loss is not None else float("nan"),
            gradient_magnitude=grad_norm,
            cluster_id=None if cluster_id is None else int(cluster_id),
            loss_trend=self.loss_trend(),
            gradient_variance=self.gradient_variance(),
            step_number=self.step,
            n_clusters=n_clusters,
        )
        self.step += 1
        return state

    def loss_trend(self) -> float:
        if self._n_loss == 0:
            return 1.0
        fast = self._loss_fast / (1 - self.fast ** self._n_loss)   # bias-corrected averages
        slow = self._loss_slow / (1 - self.slow ** self._n_loss)
        return fast / slow if slow > 0 else 1.0

    def gradient_variance(self) -> float:
        if self._n_norm == 0:
            return 0.0
        correction = 1 - self.slow ** self._n_norm
        mean, mean_sq = self._norm_mean / correction, self._norm_sq / correction
        return max(mean_sq - mean ** 2, 0.0)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
