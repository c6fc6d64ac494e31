"""Hybrid optimization for low-bit language-model training.

The guide's public API (HYBRID_OPTIMIZATION_GUIDE.md) plus the real parts behind it:

- HybridTrainingConfig    the guide's configuration, validated (config.py)
- TrainingState           the six features the auxiliary network sees (state.py)
- AuxiliaryNeuralNetwork  meta-learner for the LR multiplier and trust radius, trained online (auxiliary_nn.py)
- HybridOptimizer         a torch.optim.Optimizer: AdamW × learned multiplier inside a trust region (optim.py)
- ConstrainedOptimizer    the guide's functional trust-region step over the same code (optim.py)
- KMeansClustering, ClusterBalancedSampler   scikit-learn K-means and capped balanced batches (clustering.py)
- HybridOptimizationManager   the guide's orchestration API (manager.py)
- quantization            1 / 1.58 / 2 / 4 / 8-bit quantizers, QAT layers, packing and export (quantization/)
- precision               parameter clustering → per-layer precision plan (precision.py)
"""
from .auxiliary_nn import AuxiliaryNeuralNetwork
from .clustering import ClusterBalancedSampler, KMeansClustering
from .config import ConfigError, HybridTrainingConfig, config_errors, field_error
from .manager import HybridOptimizationManager
from .optim import ConstrainedOptimizer, HybridOptimizer, StepInfo
from .precision import PrecisionPlan, build_precision_plan, layer_sensitivity, plan_precision
from .quantization import (CodeFlipTracker, QuantLinear, export_quantized, fake_quantize, load_quantized,
                           quantize_model, quantize_weight)
from .state import TrainingState

__all__ = [
    "AuxiliaryNeuralNetwork", "ClusterBalancedSampler", "ConfigError", "ConstrainedOptimizer", "HybridOptimizationManager",
    "HybridOptimizer", "HybridTrainingConfig", "KMeansClustering", "StepInfo", "TrainingState", "config_errors",
    "field_error", "PrecisionPlan", "build_precision_plan", "layer_sensitivity", "plan_precision", "CodeFlipTracker",
    "QuantLinear", "export_quantized", "fake_quantize", "load_quantized", "quantize_model", "quantize_weight",
]
__version__ = "0.1.0"
