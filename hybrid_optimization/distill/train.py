"""The distillation run, top to bottom: `train(options)` is the API.

    plan        plan_run(options): every decision that needs no data, checked (plan.py; torch-free, quick)
    session     RunSession: signals, the launcher's record, later the run record and its writer (session.py)
    read        read_data: documents, tokenizer, windows — bad input raises here and creates no run record
    open        session.open: the run record (new, the launcher's or the resumed one), status running
    prepare     prepare_data: teacher logits (cached per dataset), evaluation subset, data clusters (setup.py)
    build       build_state: seed → student → quantization → sampler → optimizer → TrainState (setup.py)
    fit         loop.fit with pipeline_callbacks (callbacks.py)
    summarize   RunSummary, metrics CSV, export (summary.py); status finished, stopped or diverged

With --hybrid the precision plan (parameter clustering) is made after a warm-up of 10 % of the steps, when the
weights carry some signal; until then every Linear layer trains at the target bits. Its default average-bits
budget is the target bit-width, so a mixed plan costs no more bits than the uniform one it replaces.

Under torchrun every rank runs this same code: gradients are averaged by DDP, the loss given to the optimizer is
all-reduced, stop decisions are OR-ed across ranks, and only rank 0 talks to the run store and the terminal.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..schema import render_summary
from .callbacks import divergence, pipeline_callbacks
from .loop import TrainState, fit, set_optimizer_mode
from .options import TrainOptions
from .plan import RunPlan, RunResumeError, plan_run
from .session import BAD_INPUT_ERRORS, RunSession, SetupStopped
from .setup import (Prepared, build_state, load_resume_checkpoint, prepare_data, read_data, resolve_device,
                    sample_rows)
from .summary import export_trained, reset_peak_rss, summarize, write_metrics_csv

__all__ = ["BAD_INPUT_ERRORS", "RunResumeError", "TrainResult", "train"]


@dataclass
class TrainResult:
    """What `train` returns: enough for notebooks and benchmarks without reading the store."""
    status: str                               # finished | stopped | diverged
    run_id: str | None = None
    run_dir: Path | None = None
    steps: int = 0                            # optimizer steps completed in total
    total_steps: int | None = None
    summary: dict | None = None
    history: list[dict] | None = None         # one dict per step (this process's steps and resumed ones)
    evals: list[dict] | None = None           # {"step": s, **metrics}
    final_eval: dict | None = None
    model: torch.nn.Module | None = None      # None when stopped before training began
    dataset: Any = None
    plan: Any = None                          # PrecisionPlan of a hybrid run
    export: Any = None                        # ExportReport when exported
    wall_time_s: float = 0.0                  # training loop time (setup excluded)
    setup_time_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_rss_mb: float = 0.0                  # whole process
    train_peak_rss_mb: float | None = None    # during the training loop only (Linux)
    cuda_peak_mb: float | None = None
    stop_signal: int | None = None
    diverged: str | None = None               # why, naming the step (status diverged)

    @property
    def exit_code(self) -> int:
        if self.status == "finished":
            return 0
        if self.status == "diverged":
            return 3
        return 130 if self.stop_signal == signal.SIGINT else 143


def train(options: TrainOptions | RunPlan) -> TrainResult:
    """Run one distillation job (see the module docstring). Raises a BAD_INPUT_ERRORS error for bad input.
    The CLI passes the RunPlan it already made (before importing torch), a Python caller its TrainOptions."""
    started = time.perf_counter()
    plan = options if isinstance(options, RunPlan) else plan_run(options)
    try:
        with RunSession(plan, resolve_device(plan.options.device)) as session:
            inputs = read_data(plan, session.ctx, session.say, session.show_bars, session.stage)
            plan = plan.for_data(len(inputs.dataset.train), inputs.dataset.train.n_available)
            checkpoint = load_resume_checkpoint(plan, inputs) if plan.options.resume is not None else None
            timings = {"prepare_seconds": time.perf_counter() - started}
            session.open(plan)
            prepared = prepare_data(plan, inputs, device=session.device, ctx=session.ctx, checkpoint=checkpoint,
                                    say=session.say, stage=session.stage)
            del inputs
            if session.writer is not None:               # the student's reference line, known before step 1
                session.writer.set_teacher_val_loss(prepared.teacher_val_loss)
            if session.writer is not None and prepared.samples is not None:
                session.writer.set_samples(sample_rows(prepared, plan.seq_len))
            session.stage("student")
            state = build_state(plan, prepared, device=session.device, ctx=session.ctx, checkpoint=checkpoint,
                                run_id=session.run_id)
            session.stage("student", ended=True)
            announce(plan, prepared, state, session)
            timings["setup_seconds"] = time.perf_counter() - started
            session.training = True                  # from here a signal stops after the step, with a checkpoint
            reset_peak_rss()
            if session.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(session.device)
            fit(state, plan.total_steps, pipeline_callbacks(plan, prepared, session, state))
            return finish(plan, prepared, state, session, timings)
    except SetupStopped as exc:
        return TrainResult(status="stopped", stop_signal=exc.signum, setup_time_s=time.perf_counter() - started)


def announce(plan: RunPlan, prepared: Prepared, state: TrainState, session: RunSession) -> None:
    opts, cfg, ds, say = plan.options, plan.config, prepared.dataset, session.say
    bits = "full precision" if plan.bits >= 16 else f"{plan.bits:g}-bit QAT"
    say(f"Data: {plan.source_name}: {len(ds.train)} training / {len(ds.val)} validation windows of {plan.seq_len} "
        f"tokens from {ds.n_documents or ds.train.n_documents + ds.val.n_documents} distinct documents"
        + (f" ({ds.n_duplicates} exact duplicates dropped)" if ds.n_duplicates else "")
        + f"; student vocabulary {ds.vocab_size} tokens")
    say(f"Student: {plan.student_size} ({state.model.n_params() / 1e6:.2f} M parameters, {bits}); teacher: "
        f"{prepared.teacher_description}")
    if prepared.teacher_val_loss is not None:
        say(f"Teacher held-out loss: {prepared.teacher_val_loss:.4f} (perplexity "
            f"{math.exp(min(prepared.teacher_val_loss, 50.0)):.2f}) on the {len(prepared.eval_index)} validation "
            "windows every evaluation uses: the student's reference")
    say(f"Schedule: {plan.total_steps} steps = {plan.n_epochs} epochs × {plan.steps_per_epoch} steps, batch "
        f"{plan.batch_size} × {plan.seq_len} tokens" + (f", {session.ctx.world_size} processes"
                                                          if session.ctx.enabled else ""))
    if opts.hybrid:
        aux = "auxiliary NN guidance" if cfg.use_auxiliary_nn else "no auxiliary NN"
        menu = (f" (base {opts.optimizer or cfg.base_optimizer}, --schedule {plan.schedule}, --warmup_steps "
                f"{plan.warmup_steps})" if opts.optimizer or plan.schedule != "constant" or plan.warmup_steps else "")
        say(f"Initialized hybrid optimization with {prepared.n_clusters if plan.data_clustering else 0} data "
            f"clusters and {aux}{menu}")
    elif plan.optimizer == "custom":
        say(f"Initialized custom optimizer {type(state.optimizer).__name__}")
    elif plan.optimizer != "adamw" or plan.schedule != "constant" or plan.warmup_steps:
        say(f"Initialized {type(state.optimizer).__name__} (--optimizer {plan.optimizer}, --schedule {plan.schedule}"
            f", --warmup_steps {plan.warmup_steps}) at LR {state.optimizer.param_groups[0]['lr']:g}")
    else:
        say(f"Initialized baseline AdamW at constant LR {cfg.base_learning_rate:g}")
    if state.step >= plan.total_steps:
        say(f"Run {opts.resume} already completed {state.step} steps: exporting it without training")
    elif state.step:
        say(f"Resuming at step {state.step} of {plan.total_steps}")


def finish(plan: RunPlan, prepared: Prepared, state: TrainState, session: RunSession, timings: dict) -> TrainResult:
    """The summary (printed as the guide's block), metrics CSV, export; the run's final status."""
    opts, main, say = plan.options, session.is_main, session.say
    stopped = state.stop_reason == "stop requested"
    if not stopped:     # Schedule-Free: its averaged weights are the trained student (result, export); no-op otherwise
        set_optimizer_mode(state.optimizer, "eval")
    if stopped:
        say(f"Stop requested: checkpoint saved at step {state.step} of {plan.total_steps}")
    final_eval = state.evals[-1] if state.evals else {}
    diverged = None if stopped else (state.diverged or divergence(state))
    summary = summarize(state, plan, {
        "clustering_seconds": prepared.clustering_seconds, "setup_seconds": timings["setup_seconds"],
        "prepare_seconds": timings["prepare_seconds"], "teacher_cache_seconds": prepared.logits.built_seconds,
        "teacher_tokens": (len(prepared.dataset.train) + len(prepared.dataset.val)) * plan.seq_len}, final_eval,
        teacher_val_loss=prepared.teacher_val_loss)
    if diverged:
        summary.extra["diverged"] = diverged
    if main and not stopped:
        for line in render_summary(summary).splitlines():
            say(line)
    if main and opts.save_metrics and session.run_dir is not None:
        path = write_metrics_csv(state, session.run_dir / "metrics.csv")
        session.recorder.set_artifact("metrics_csv", path)
        say(f"Metrics written to {path}")
    report = None
    if main and opts.export and not stopped and not diverged:
        report = export_trained(state, plan, prepared, session.run_id, session.run_dir, session.recorder, say)
        summary.extra.update(compression_vs_fp32_linear=report.compression_vs_fp32_linear,
                             compression_vs_fp32_file=report.compression_vs_fp32_file,
                             linear_bits_per_weight=report.linear_bits_per_weight,
                             file_bits_per_weight=report.file_bits_per_weight, export_bytes=report.file_bytes)
    status = "stopped" if stopped else ("diverged" if diverged else "finished")
    flat = summary.to_dict()
    if getattr(session, "reporter", None) is not None:     # --report_to: the summary, then the back-ends close
        session.reporter.on_summary(flat, status, render_summary(summary), state.step)
    session.end(status, flat, state.step, diverged)
    return TrainResult(
        status=status, run_id=session.run_id, run_dir=session.run_dir, steps=state.step,
        total_steps=plan.total_steps, summary=flat, history=[h.as_dict() for h in state.history],
        evals=state.evals, final_eval=final_eval, model=state.model, dataset=prepared.dataset, plan=state.plan,
        export=report, wall_time_s=state.train_seconds, setup_time_s=timings["setup_seconds"],
        tokens_per_s=flat["tokens_per_s"], peak_rss_mb=flat["peak_rss_mb"],
        train_peak_rss_mb=flat.get("train_peak_rss_mb"), cuda_peak_mb=flat.get("cuda_peak_mb"),
        stop_signal=session.stop_signal, diverged=diverged)
