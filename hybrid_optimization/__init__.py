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
import importlib

# Names are imported on first use: `import hybrid_optimization.config` (the workbench's form) then costs no torch or
# scikit-learn import, which keeps the Streamlit process small.
_EXPORTS = {
    "AuxiliaryNeuralNetwork": ".auxiliary_nn", "ClusterBalancedSampler": ".clustering", "KMeansClustering": ".clustering",
    "ConfigError": ".config", "HybridTrainingConfig": ".config", "config_errors": ".config", "field_error": ".config",
    "HybridOptimizationManager": ".manager", "ConstrainedOptimizer": ".optim", "HybridOptimizer": ".optim",
    "StepInfo": ".optim", "PrecisionPlan": ".precision", "build_precision_plan": ".precision",
    "layer_sensitivity": ".precision", "plan_precision": ".precision", "CodeFlipTracker": ".quantization",
    "QuantLinear": ".quantization", "export_quantized": ".quantization", "fake_quantize": ".quantization",
    "load_quantized": ".quantization", "quantize_model": ".quantization", "quantize_weight": ".quantization",
    "TrainingState": ".state",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AuxiliaryNeuralNetwork", "ClusterBalancedSampler", "ConfigError", "ConstrainedOptimizer", "HybridOptimizationManager",
    "HybridOptimizer", "HybridTrainingConfig", "KMeansClustering", "StepInfo", "TrainingState", "config_errors",
    "field_error", "PrecisionPlan", "build_precision_plan", "layer_sensitivity", "plan_precision", "CodeFlipTracker",
    "QuantLinear", "export_quantized", "fake_quantize", "load_quantized", "quantize_model", "quantize_weight",
]
__version__ = "0.1.0"
