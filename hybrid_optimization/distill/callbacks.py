"""The training loop's callbacks: everything around the ML step (see loop.py for the hooks and their order).

    PrecisionPlanSwitch     at a given step, make the per-layer precision plan and re-quantize the student
    QuantizationDiagnostics flip rate of the quantized codes every step, per-layer errors every log interval
    StoreLogging            each step's metrics and a heartbeat to the run store
    Console                 the tqdm bar and the guide's per-epoch line
    Evaluation              validation every N steps and/or every N epochs, and always after the last step
    DivergenceGuard         N consecutive non-finite losses end the run as diverged
    StopRequests            SIGTERM / SIGINT, the store's stop flag, `stop_after_steps` (OR-ed across ranks)
    Checkpointing           the TrainState at epoch ends (at most one per interval), at the end and on a stop

A callback is a `Callback` (no-op hooks, an `order`, an optional `state_dict`) or any object with some of the
hooks. `fit` runs them by `order` (ties in list order), which matters where one fills a metric another one logs:
diagnostics before logging; evaluation before the stop check, so a stopped run is evaluated at the same steps as
an uninterrupted one; checkpoints last. Callbacks record through a `Recorder` (the run store's RunWriter, or
`Recorder()` itself, which records nothing), never through closures over the trainer.

`pipeline_callbacks(plan, prepared, session)` is the pipeline's list: the one place to add a callback to every run.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .. import distributed as dist_utils
from ..schema import StepMetrics
from .checkpoint import save_checkpoint
from .loop import DEFAULT_ORDER, TrainState, quantize_student, set_optimizer_mode


class Recorder:
    """Where callbacks record a run (the interface of tracking.RunWriter). This base records nothing: a run
    without a store record (track=False, a benchmark, another rank than 0) uses it as it is."""

    def log(self, message: str, level: str = "info") -> None: ...
    def log_step(self, step: int, **values: Any) -> None: ...
    def log_eval(self, step: int, **metrics: Any) -> None: ...
    def log_layers(self, step: int, rows: list[dict]) -> None: ...
    def set_plan(self, rows: list[dict]) -> None: ...
    def set_artifact(self, kind: str, path: Any) -> None: ...
    def stage(self, name: str, done: float | None = None, total: float | None = None, detail: str | None = None,
              ended: bool = False) -> None: ...
    def heartbeat(self) -> None: ...

    def stop_requested(self) -> bool:
        return False


NO_RECORDER = Recorder()


class Callback:
    """A training-loop callback: override the hooks you need (loop.py says when each runs). `order`: lower runs
    first; the default puts a callback after the pipeline's own and before the checkpoint. `state_dict` /
    `load_state_dict`: state a callback wants kept across a resume (none by default)."""
    order: int = DEFAULT_ORDER

    def on_fit_start(self, state: TrainState) -> None:
        pass

    def on_step_start(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState, metrics: StepMetrics) -> None:
        pass

    def on_fit_end(self, state: TrainState) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


DIVERGENCE_PATIENCE = 20        # consecutive non-finite losses that end a run as diverged


def end_of_epoch(state: TrainState) -> bool:
    """The step just taken closes an epoch (or the run)."""
    return state.step % state.steps_per_epoch == 0 or state.step == state.total_steps


class PrecisionPlanSwitch(Callback):
    """Parameter clustering → per-layer bits, once, before step `at_step` (when the weights carry some signal).
    `build(state)` returns a PrecisionPlan (called on rank 0; every rank applies the same bit map); the plan is
    recorded (`recorder.set_plan`) and said in one line (`say`)."""
    order = 10

    def __init__(self, at_step: int, build: Callable[[TrainState], Any], is_main: bool = True,
                 recorder: Recorder = NO_RECORDER, say: Callable[[str], None] | None = None):
        self.at_step, self.build, self.is_main, self.recorder, self.say = at_step, build, is_main, recorder, say
        self.seconds = self.cpu_seconds = 0.0

    def on_step_start(self, state: TrainState) -> None:
        if state.step != self.at_step or state.bit_map is not None:
            return
        started, started_cpu = time.perf_counter(), time.process_time()
        bit_map = None
        if self.is_main:
            state.plan = self.build(state)
            bit_map = state.plan.bit_map()
        bit_map = dist_utils.broadcast_object(bit_map, state.ctx)
        quantize_student(state.model, bit_map, state.quantizer_scale)
        state.bit_map = bit_map
        if state.flip_tracker is not None:          # codes of another bit-width are not comparable
            state.flip_tracker = type(state.flip_tracker)()
        self.seconds, self.cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
        if self.is_main:
            self.report(state.plan)

    def report(self, plan) -> None:
        if self.say is not None:
            self.say(f"Precision plan: {len(plan.bit_map())} layers in {len(set(plan.cluster_bits))} parameter "
                     f"clusters → average {plan.avg_bits:.3f} bits (budget {plan.budget:g}) in {self.seconds:.1f} s")
        self.recorder.set_plan([{"layer": name, "module_type": name.rsplit(".", 1)[-1], "bits": info["bits"],
                                 "cluster": info["cluster"], "n_params": info.get("n_params"),
                                 "features": {k: v for k, v in info.items()
                                              if k not in ("bits", "cluster", "n_params")}}
                                for name, info in plan.layers.items()])


class QuantizationDiagnostics(Callback):
    """The fraction of quantized codes that flipped this step (every step), and the per-layer quantization error
    and code distribution every `log_interval` steps and at the last (to `recorder.log_layers(step, rows)`)."""
    order = 20

    def __init__(self, log_interval: int, recorder: Recorder = NO_RECORDER):
        self.log_interval, self.recorder = log_interval, recorder

    def on_step_end(self, state: TrainState, metrics: StepMetrics) -> None:
        from ..quantization import layer_quantization_report
        flips = state.flip_tracker.update(state.model) if state.flip_tracker is not None else {}
        if flips:
            sizes = {name: m.weight.numel() for name, m in state.model.named_modules() if name in flips}
            metrics.flip_rate = sum(flips[k] * sizes[k] for k in flips) / sum(sizes.values())
        if state.step % self.log_interval and state.step != state.total_steps:
            return
        report = layer_quantization_report(state.model)
        if not report:
            return
        total = sum(r["n_params"] for r in report)
        metrics.quantization_error = sum(r["rel_error"] * r["n_params"] for r in report) / total
        rows = []
        for r in report:
            dist = r.get("code_distribution") or {}
            rows.append({"layer": r["name"], "module_type": r["name"].rsplit(".", 1)[-1], "bits": r["bits"],
                         "n_params": r["n_params"], "rel_error": r["rel_error"], "frac_neg": dist.get("neg"),
                         "frac_zero": dist.get("zero"), "frac_pos": dist.get("pos"),
                         "flip_rate": flips.get(r["name"]), "scale": r["scale"]})
        self.recorder.log_layers(state.step, rows)


class StoreLogging(Callback):
    """Each step's metrics and a heartbeat to the recorder."""
    order = 30

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def on_step_end(self, state: TrainState, metrics: StepMetrics) -> None:
        self.recorder.log_step(metrics.step, **metrics.store_values())
        self.recorder.heartbeat()


class SystemMetrics(Callback):
    """CPU %, RSS and (on CUDA) GPU memory/utilisation of this process every few seconds while it trains, into
    <run folder>/system_metrics.csv (hybrid_optimization/system_metrics.py); the workbench's Live page draws them."""
    order = 35

    def __init__(self, run_dir: Path, every_s: float = 2.0):
        from ..system_metrics import SYSTEM_METRICS_FILE, SystemSampler
        self.sampler = SystemSampler(Path(run_dir) / SYSTEM_METRICS_FILE, every_s=every_s)

    def on_fit_start(self, state: TrainState) -> None:
        self.sampler.start()

    def on_fit_end(self, state: TrainState) -> None:
        self.sampler.stop()


class Console(Callback):
    """The progress bar (stderr) and the guide's line per epoch: "Epoch N, Loss: …, LR: …[, Trust Radius: …]"."""
    order = 40

    def __init__(self, say: Callable[[str], None], show_bar: bool = True):
        self.say, self.show_bar = say, show_bar
        self.bar = None
        self.tokens_ema = None

    def write(self, message: str) -> bool:
        """Print above the bar; False when no bar is shown."""
        if self.bar is None:
            return False
        self.bar.write(message, file=sys.stdout)
        return True

    def on_fit_start(self, state: TrainState) -> None:
        if self.show_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=state.total_steps, initial=state.step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, leave=False)

    def on_step_end(self, state: TrainState, metrics: StepMetrics) -> None:
        if self.bar is not None:
            rate = metrics.tokens_per_s
            self.tokens_ema = rate if self.tokens_ema is None else 0.9 * self.tokens_ema + 0.1 * rate
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics.loss:.4f}", tok_s=f"{self.tokens_ema:,.0f}", refresh=False)
        if end_of_epoch(state):
            rows = [h for h in state.history if h.epoch == metrics.epoch]
            self.say(epoch_line(metrics.epoch, rows))

    def on_fit_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def epoch_line(epoch: int, rows: list[StepMetrics]) -> str:
    mean = (lambda xs: sum(xs) / len(xs) if xs else math.nan)
    line = (f"Epoch {epoch}, Loss: {mean([h.loss for h in rows]):.6f}, "
            f"LR: {mean([h.learning_rate for h in rows if h.learning_rate is not None]):.6f}")
    radius = rows[-1].trust_radius if rows else None
    if radius is not None:
        line += f", Trust Radius: {radius:.6f}"
    return line


class Evaluation(Callback):
    """Validation every `every_steps` steps and/or every `every_epochs` epochs, and always after the last step.
    `evaluate(state)` runs on rank 0 and returns a metrics dict; it is recorded (`recorder.log_eval`) and said in
    one line (`say`; with the gap to `teacher_val_loss`, the teacher's loss on the same windows, when known).
    `annotate()` adds values to the state's copy only (the benchmark's training time so far)."""
    order = 50

    def __init__(self, evaluate: Callable[[TrainState], dict], every_steps: int | None = None,
                 every_epochs: int | None = None, is_main: bool = True, recorder: Recorder = NO_RECORDER,
                 say: Callable[[str], None] | None = None, annotate: Callable[[], dict] | None = None,
                 teacher_val_loss: float | None = None):
        self.evaluate, self.every_steps, self.every_epochs = evaluate, every_steps, every_epochs
        self.is_main, self.recorder, self.say, self.annotate = is_main, recorder, say, annotate
        self.teacher_val_loss = teacher_val_loss

    def due(self, state: TrainState) -> bool:
        if state.step == state.total_steps:
            return True
        if self.every_steps and state.step % self.every_steps == 0:
            return True
        return bool(self.every_epochs and state.step % state.steps_per_epoch == 0
                    and (state.step // state.steps_per_epoch) % self.every_epochs == 0)

    def on_step_end(self, state: TrainState, metrics: StepMetrics) -> None:
        if state.diverged or not self.due(state):
            return
        set_optimizer_mode(state.optimizer, "eval")     # Schedule-Free evaluates at its averaged weights
        if self.is_main:
            result = self.evaluate(state)
            state.evals.append({"step": state.step, **result, **(self.annotate() if self.annotate else {})})
            self.recorder.log_eval(state.step, **result)
            if self.say is not None:
                self.say(eval_line(state.step, result, self.teacher_val_loss))
        set_optimizer_mode(state.optimizer, "train")
        dist_utils.barrier(state.ctx)


def eval_line(step: int, m: dict, teacher_val_loss: float | None = None) -> str:
    gap = f" [teacher {teacher_val_loss:.4f}, gap {m['val_loss'] - teacher_val_loss:+.4f}]" \
        if teacher_val_loss is not None else ""
    return (f"  eval @ step {step}: val_loss {m['val_loss']:.4f} (ppl {m['val_ppl']:.2f}){gap}, KL to teacher "
            f"{m['kl_teacher']:.4f}, top-1 agreement {m['top1_agreement']:.1%}, quantization diff max "
            f"{m['qdiff_max']:.4f} / mean {m['qdiff_mean']:.4f}")


class DivergenceGuard(Callback):
    """`patience` consecutive non-finite losses: the run has diverged (a plain optimizer's weights are NaN after
    the first; the hybrid skips such steps, so it gets `patience` chances to recover)."""
    order = 60

    def __init__(self, patience: int = 20):
        self.patience = patience
        self.streak = 0

    def on_step_end(self, state: TrainState, metrics: StepMetrics) -> None:
        self.streak = 0 if math.isfinite(metrics.loss) else self.streak + 1
        if self.streak >= self.patience:
            first = state.step - self.streak + 1
            state.diverged = (f"the training loss is {metrics.loss} at step {first}"
                              + (f" and stayed non-finite for {self.streak} steps" if self.streak > 1 else ""))
            state.stop_reason = "diverged"


class StopRequests(Callback):
    """Ends the loop after this step when a signal arrived, the store's stop flag is set, or `stop_after_steps`
    steps are done — decided together by all ranks."""
    order = 70

    def __init__(self, signal_received: Callable[[], bool], recorder: Recorder = NO_RECORDER,
                 stop_after_steps: int | None = None):
        self.signal_received, self.recorder, self.stop_after_steps = signal_received, recorder, stop_after_steps

    def on_step_end(self, state: TrainState, metrics: StepMetrics) -> None:
        flag = self.signal_received() or self.recorder.stop_requested()
        if self.stop_after_steps is not None and state.step >= self.stop_after_steps:
            flag = True
        if dist_utils.any_rank(flag, state.ctx, state.device) and state.step < state.total_steps \
                and state.stop_reason is None:
            state.stop_reason = "stop requested"


class Checkpointing(Callback):
    """Saves `state.state_dict()` at epoch ends (at most one per `every_s` seconds: a crash loses less than that),
    after the last step and on a stop. Never after a divergence: the last good checkpoint stays."""
    order = 90

    def __init__(self, path: Path, every_s: float = 30.0, is_main: bool = True, recorder: Recorder = NO_RECORDER):
        self.path, self.every_s, self.is_main, self.recorder = Path(path), every_s, is_main, recorder
        self.last_saved = time.monotonic()

    def on_fit_start(self, state: TrainState) -> None:
        self.last_saved = time.monotonic()

    def on_step_end(self, state: TrainState, metrics: StepMetrics) -> None:
        if state.diverged:
            return
        due = state.stop_reason is not None or state.step == state.total_steps or (
            end_of_epoch(state) and time.monotonic() - self.last_saved >= self.every_s)
        if due and self.is_main:
            path = save_checkpoint(self.path, state.state_dict())
            self.last_saved = time.monotonic()
            self.recorder.set_artifact("checkpoint", path)


def divergence(state: TrainState) -> str | None:
    """Why a run that reached its end has diverged (its last loss or last validation loss is not finite), naming
    the step where it went non-finite; None when it has not."""
    rows = state.history
    if rows and not math.isfinite(rows[-1].loss):
        first = len(rows)
        while first > 1 and not math.isfinite(rows[first - 2].loss):
            first -= 1
        return f"the training loss is {rows[-1].loss} from step {rows[first - 1].step} to the last step"
    if state.evals:
        last = state.evals[-1]
        value = last.get("val_loss")
        if value is not None and not math.isfinite(value):
            return f"the validation loss is {value} at step {last['step']}"
    return None


def pipeline_callbacks(plan, prepared, session, state: TrainState) -> list:
    """The distillation pipeline's callbacks for one run (train.py): THE place to add one to every run. `session`
    (session.py) gives the recorder, `say`, the rank and the run folder; `plan` the switches and intervals."""
    from .checkpoint import FILENAME as CHECKPOINT_NAME
    from .setup import make_precision_plan, validation
    opts, recorder, main = plan.options, session.recorder, session.is_main
    found: list = []
    if plan.param_clustering:
        found.append(PrecisionPlanSwitch(plan.plan_at_step, lambda s: make_precision_plan(plan, s), is_main=main,
                                         recorder=recorder, say=session.say))
    if plan.bits < 16:
        found.append(QuantizationDiagnostics(plan.config.log_interval, recorder))
    found.append(StoreLogging(recorder))
    if main and session.run_dir is not None:
        found.append(SystemMetrics(session.run_dir))
    if main:
        session.console = Console(session.say, show_bar=opts.progress and not opts.quiet)
        found.append(session.console)
    found.append(Evaluation(validation(prepared, state.device), every_steps=opts.eval_every_steps,
                            every_epochs=opts.eval_every, is_main=main, recorder=recorder, say=session.say,
                            teacher_val_loss=prepared.teacher_val_loss))
    found.append(DivergenceGuard(DIVERGENCE_PATIENCE))
    found.append(StopRequests(lambda: session.stop_signal is not None, recorder, opts.stop_after_steps))
    found.extend(opts.callbacks)
    if main and session.run_dir is not None and opts.report_to:       # --report_to tensorboard,mlflow
        from .reporting import reporter_for_run
        session.reporter = reporter_for_run(opts.report_to, session.run_dir, session.store.root,
                                            run_id=session.run_id, run_name=opts.run_name,
                                            config=plan.config.to_dict(), options=opts.to_dict(),
                                            resumed=opts.resume is not None)
        if session.reporter is not None:
            found.append(session.reporter)
    if session.run_dir is not None:
        found.append(Checkpointing(session.run_dir / CHECKPOINT_NAME, plan.checkpoint_every_s, is_main=main,
                                   recorder=recorder))
    return found
