"""Distillation of a chat teacher into a low-bit student: data, teacher, student, loss, training loop, CLI.

Python API (notebooks, benchmarks):

    from hybrid_optimization.distill import TrainOptions, train
    result = train(TrainOptions(hybrid=True, ternary=True, qat=True, epochs=20))
    result.summary["val_loss"], result.history[-1], result.evals

See options.py for every option (the CLI flags plus Python-only hooks such as `optimizer_factory`) and train.py for
what a run does. The CLI is `python distillation.py --help`.
"""
from .options import OptionsError, TrainOptions
from .train import BAD_INPUT_ERRORS, TrainResult, train

__all__ = ["BAD_INPUT_ERRORS", "OptionsError", "TrainOptions", "TrainResult", "train"]
