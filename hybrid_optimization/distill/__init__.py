"""Distillation of a chat teacher into a low-bit student: data, teacher, student, loss, training loop, CLI.

Python API (notebooks, benchmarks):

    from hybrid_optimization.distill import TrainOptions, train
    result = train(TrainOptions(hybrid=True, ternary=True, qat=True, epochs=20))
    result.summary["val_loss"], result.history[-1], result.evals

The house, one concept per module:

    options.py    TrainOptions: every option (the CLI flags plus Python-only hooks such as `optimizer_factory`)
    plan.py       plan_run(options) -> RunPlan: every decision that needs no data (torch-free, unit-tested)
    setup.py      read_data / prepare_data / build_state: the one place that seeds and builds what trains
    session.py    RunSession: the run record, its writer, signals, failure marking
    loop.py       TrainState and fit(state, steps, callbacks); callbacks.py: Callback, Recorder, the pipeline's list
    summary.py    summarize(state, plan) -> RunSummary, metrics CSV, export
    train.py      train(options): plan -> session -> read -> prepare -> build -> fit -> summarize, top to bottom
    cli.py        the command line (`python distillation.py --help`)
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
