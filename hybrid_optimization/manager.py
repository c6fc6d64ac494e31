"""HybridOptimizationManager: the guide's orchestration API over the real parts.

    hybrid_opt = HybridOptimizationManager(config)
    hybrid_opt.setup_data_clustering(training_data)            # scikit-learn K-means on the samples
    batch = hybrid_opt.get_cluster_batch(training_data, batch_size=32, cluster_id=k)   # balanced, capped
    metrics = hybrid_opt.optimization_step(model=model, loss=loss, gradients=grads, cluster_id=k, step=s, base_lr=lr)
    summary = hybrid_opt.get_summary()

`optimization_step` updates ALL parameters of the model through a HybridOptimizer built on the first call (AdamW ×
the auxiliary net's LR multiplier, inside the trust region). Each `use_*` switch of the config turns its part off:
no auxiliary net → multiplier 1 (radius by the classic rule when adaptation is on); no trust region → no projection;
no clustering → uniform random batches; no quantization → no quantization error tracking or model conversion.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .auxiliary_nn import AuxiliaryNeuralNetwork
from .clustering import ClusterBalancedSampler, KMeansClustering, as_feature_matrix
from .config import HybridTrainingConfig
from .optim import HybridOptimizer, split_gradients
from .schema import HISTORY_KEYS        # one step record: the manager's history has the pipeline's keys


class HybridOptimizationManager:
    def __init__(self, config: HybridTrainingConfig | None = None):
        self.config = config if config is not None else HybridTrainingConfig()
        if not isinstance(self.config, HybridTrainingConfig):
            raise TypeError(f"config must be a HybridTrainingConfig, got {type(self.config).__name__}")
        c = self.config
        self._auxiliary_nn = AuxiliaryNeuralNetwork(
            hidden_size=c.auxiliary_nn_hidden_size, learning_rate=c.auxiliary_nn_learning_rate,
            initial_trust_radius=c.initial_trust_radius) if c.use_auxiliary_nn else None
        self.data_clusterer: KMeansClustering | None = None
        self.cluster_labels: np.ndarray | None = None
        self.sampler: ClusterBalancedSampler | None = None
        self.optimizer: HybridOptimizer | None = None
        self.precision_plan = None
        self.last_cluster_id: int | None = None
        self.metrics_history: dict[str, list] = {k: [] for k in HISTORY_KEYS}
        self._rng = np.random.default_rng(c.seed)
        self._model_param_ids: tuple[int, ...] = ()

    # -- the auxiliary network (settable, as in the guide's checkpointing example) ------------------------------------
    @property
    def auxiliary_nn(self) -> AuxiliaryNeuralNetwork | None:
        return self._auxiliary_nn

    @auxiliary_nn.setter
    def auxiliary_nn(self, aux_nn: AuxiliaryNeuralNetwork | None) -> None:
        if aux_nn is not None and not isinstance(aux_nn, AuxiliaryNeuralNetwork):
            raise TypeError(f"auxiliary_nn must be an AuxiliaryNeuralNetwork, got {type(aux_nn).__name__}")
        self._auxiliary_nn = aux_nn
        if self.optimizer is not None:
            self.optimizer.set_aux_net(aux_nn)

    # -- data clustering -----------------------------------------------------------------------------------------------
    def setup_data_clustering(self, training_data: Any, features: Any = None) -> np.ndarray:
        """Cluster the training samples (rows of `features`, or of `training_data` itself) and prepare balanced
        sampling. Returns the cluster label of every sample."""
        X = as_feature_matrix(features if features is not None else training_data, "training data features")
        n = X.shape[0]
        if self.config.use_clustering:
            k = self.config.data_clusters
            if k > n:
                raise ValueError(f"data_clusters={k} is larger than the number of training samples ({n}); "
                                 f"use at most {n} clusters")
            self.data_clusterer = KMeansClustering(n_clusters=k, random_state=self.config.seed).fit(X)
            labels = self.data_clusterer.labels_
        else:
            labels = np.zeros(n, dtype=np.int64)          # one cluster: uniform sampling
        self.cluster_labels = labels
        self.sampler = ClusterBalancedSampler(labels, self.config.batch_size, self.config.max_sample_repeats,
                                              seed=self.config.seed)
        return labels

    def get_cluster_batch(self, training_data: Any, batch_size: int = 32, cluster_id: int | None = None):
        """A batch of `training_data` rows from one cluster (balanced and repetition-capped; when the cluster has
        used its allowance for this epoch another one serves — see `last_cluster_id`). cluster_id=None: the next
        cluster in the balanced rotation."""
        if self.sampler is None:
            raise RuntimeError("call setup_data_clustering(training_data) before get_cluster_batch")
        if len(training_data) != len(self.sampler.labels):
            raise ValueError(f"training_data has {len(training_data)} samples but clustering was set up on "
                             f"{len(self.sampler.labels)}")
        if not self.config.use_clustering:
            cluster_id = None
        if cluster_id is None:
            saved = self.sampler.batch_size
            self.sampler.batch_size = batch_size
            try:
                indices = self.sampler.next_batch()
            finally:
                self.sampler.batch_size = saved
        else:
            indices = self.sampler.sample_from_cluster(int(cluster_id) % self.sampler.n_clusters, batch_size)
        self.last_cluster_id = self.sampler.last_cluster
        return _index(training_data, indices)

    # -- optimisation -------------------------------------------------------------------------------------------------
    def build_optimizer(self, params) -> HybridOptimizer:
        self.optimizer = HybridOptimizer.from_config(params, self.config, aux_net=self._auxiliary_nn)
        return self.optimizer

    def optimization_step(self, model: nn.Module, loss, gradients=None, cluster_id: int | None = None,
                          step: int | None = None, base_lr: float | None = None) -> dict[str, Any]:
        """Update ALL parameters of `model` once. `gradients`: a list aligned with model.parameters(), a flat
        vector of all gradients, or None to use each parameter's .grad."""
        params = list(model.parameters())
        ids = tuple(id(p) for p in params)
        if self.optimizer is None or ids != self._model_param_ids:
            self.build_optimizer(params)
            self._model_param_ids = ids
        grads = split_gradients(gradients, params)
        lr = self.config.base_learning_rate if base_lr is None else float(base_lr)
        if not lr > 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if cluster_id is None:
            cluster_id = self.last_cluster_id
        loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self.optimizer.step(loss=loss_value, cluster_id=cluster_id, grads=grads)
        info = self.optimizer.last_info
        metrics = info.as_dict()
        metrics.update(loss=loss_value, cluster_id=cluster_id,
                       step=step if step is not None else len(self.metrics_history["step"]))
        for key in HISTORY_KEYS:
            self.metrics_history[key].append(metrics.get(key))
        return metrics

    def get_summary(self) -> dict[str, Any]:
        h = self.metrics_history
        taken = [i for i, s in enumerate(h["skipped"]) if not s]
        finite_losses = [x for x in h["loss"] if x is not None and math.isfinite(x)]
        multipliers = [h["lr_multiplier"][i] for i in taken]
        radii = [h["trust_radius"][i] for i in taken if math.isfinite(h["trust_radius"][i])]
        return {
            "total_steps": len(h["step"]),
            "skipped_steps": len(h["step"]) - len(taken),
            "final_loss": finite_losses[-1] if finite_losses else float("nan"),
            "avg_lr_multiplier": float(np.mean(multipliers)) if multipliers else 1.0,
            "constraint_activation_rate": float(np.mean([h["constraint_active"][i] for i in taken])) if taken else 0.0,
            "trust_radius": radii[-1] if radii else (self.config.initial_trust_radius if self.config.use_trust_region
                                                     else float("inf")),
            "avg_trust_radius": float(np.mean(radii)) if radii else float("nan"),
            "metrics_history": h,
        }


def _index(data: Any, indices: np.ndarray):
    if isinstance(data, torch.Tensor):
        return data[torch.as_tensor(indices, dtype=torch.long, device=data.device)]
    if isinstance(data, np.ndarray):
        return data[indices]
    if hasattr(data, "iloc"):                          # pandas
        return data.iloc[indices]
    return [data[int(i)] for i in indices]
