"""Distillation of a chat teacher into a low-bit student: data, teacher, student, loss, training loop, CLI.

Python API (notebooks, benchmarks):

    from hybrid_optimization.distill import TrainOptions, train
    result = train(TrainOptions(hybrid=True, ternary=True, qat=True, epochs=20))
    result.summary["val_loss"], result.history[-1], result.evals

See options.py for every option (the CLI flags plus Python-only hooks such as `optimizer_factory`), train.py for
what a run does and loop.py for the training loop itself. The CLI is `python distillation.py --help`.
"""
import importlib
import sys
import types

# Imported on first use: `options`, `presets` and the CLI's parser are torch-free, so the CLI can answer --help and
# reject a bad flag without loading torch.
_EXPORTS = {"OptionsError": ".options", "TrainOptions": ".options", "BAD_INPUT_ERRORS": ".train",
            "TrainResult": ".train", "train": ".train"}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """`train` is the function (train.train), not the submodule train.py: importing a submodule sets it as an
    attribute of its package, which would otherwise hide the function from `from hybrid_optimization.distill import
    train` once anything imported hybrid_optimization.distill.train first."""

    def __setattr__(self, name, value):
        if name == "train" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
__all__ = ["BAD_INPUT_ERRORS", "OptionsError", "TrainOptions", "TrainResult", "train"]
