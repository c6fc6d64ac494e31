"""The distillation run: prepare → open the run record → set up → fit → finish. `train(options)` is the API.

    prepare   read and check everything a user can get wrong (flags, data, teacher path, a resumed checkpoint)
              before anything starts: bad input raises a clear error and creates no run record.
    open      create the run record in the run store (or take the launcher's / the resumed one), status running.
    setup     teacher logits (cached per dataset), data clustering, the student, the sampler, the optimizer:
              together the TrainState (loop.py), restored from the checkpoint when resuming.
    fit       loop.fit with the pipeline's callbacks (callbacks.py): precision-plan switch, quantization
              diagnostics, store logging, console, evaluation, divergence guard, stop requests, checkpoints.
    finish    the RunSummary (schema.py; the guide's summary block), metrics CSV, export; status finished,
              stopped or diverged.

With --hybrid the precision plan (parameter clustering) is made after a warm-up of 10 % of the steps, when the
weights carry some signal; until then every Linear layer trains at the target bits. Its default average-bits
budget is the target bit-width, so a mixed plan costs no more bits than the uniform one it replaces.

Under torchrun every rank runs this same code: gradients are averaged by DDP, the loss given to the optimizer is
all-reduced, stop decisions are OR-ed across ranks, and only rank 0 talks to the run store and the terminal.
"""
from __future__ import annotations

import csv
import gc
import math
import os
import resource
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed as dist_utils
from ..clustering import ClusterBalancedSampler, KMeansClustering
from ..config import ConfigError, HybridTrainingConfig
from ..featurize import make_featurizer, project_2d
from ..optim import HybridOptimizer
from ..precision import build_precision_plan
from ..quantization import SUPPORTED_BITS, CodeFlipTracker, QuantizedExportError
from ..schema import RunSummary, metrics_csv_header, render_summary
from ..tracking import RunNotFound, RunStore, StoreError, pid_alive
from .callbacks import (Checkpointing, Console, DivergenceGuard, Evaluation, PrecisionPlanSwitch, SystemMetrics,
                        QuantizationDiagnostics, StopRequests, StoreLogging, divergence)
from .checkpoint import FILENAME as CHECKPOINT_NAME
from .checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint
from .data import (SUBSET_MIN_WINDOWS, DataError, Dataset, build_dataset, documents_fingerprint, load_documents,
                   make_progress, preparation_estimate, train_windows_budget)
from .evaluate import evaluate
from .losses import distillation_loss
from .loop import TrainData, TrainState, fit, quantize_student, set_optimizer_mode
from .options import MAX_STEPS, RESUME_ALWAYS_ALLOWED, RESUME_OVERRIDABLE, OptionsError, TrainOptions
from .samplers import ShuffleBatchSampler
from .student import StudentConfig, StudentLM
from .teacher import EXPECTED_TOKENS_PER_S, TeacherError, load_teacher, smollm2_gguf_path, teacher_topk_cache
from .tiny import tiny_teacher_dir, tiny_tokenizer

# Errors that mean "the input is wrong": the CLI prints them in one line and exits with code 2.
BAD_INPUT_ERRORS = (OptionsError, ConfigError, DataError, TeacherError, CheckpointError, RunNotFound,
                    QuantizedExportError, StoreError)
PLAN_WARMUP_FRACTION = 0.1
CHECKPOINT_EVERY_S = 30.0
DIVERGENCE_PATIENCE = 20        # consecutive non-finite losses that end a run as diverged
SAMPLE_ROWS_MAX = 5000          # samples stored for the cluster plot


class RunResumeError(OptionsError):
    """--resume names a run that cannot be resumed (running, or finished with nothing left to do)."""


@dataclass
class TrainResult:
    """What `train` returns: enough for notebooks and benchmarks without reading the store."""
    status: str                               # finished | stopped | diverged
    run_id: str | None
    run_dir: Path | None
    steps: int                                # optimizer steps completed in total
    total_steps: int
    summary: dict
    history: list[dict]                       # one dict per step (this process's steps and resumed ones)
    evals: list[dict]                         # {"step": s, **metrics}
    final_eval: dict
    model: torch.nn.Module
    dataset: Dataset
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


def train(options: TrainOptions) -> TrainResult:
    """Run one distillation job (see the module docstring). Raises a BAD_INPUT_ERRORS error for bad input."""
    return Trainer(options).run()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionsError("--device cuda: no CUDA device is available (use --device auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise OptionsError("--device mps: MPS is not available on this machine (use --device auto or cpu)")
    return torch.device(name)


# Python-side hooks of a resume call: they are not stored with the run, so the caller's always apply.
RESUME_HOOKS = ("optimizer_factory", "stop_after_steps", "track", "runs_root", "callbacks")


def merge_for_resume(stored: TrainOptions, given: TrainOptions) -> TrainOptions:
    """The stored run's options, with the overridable values the resume call set explicitly (non-default).

    The CLI refuses a fixed flag on --resume (TrainOptions.validate, from `given`). A Python caller has no `given`,
    so a fixed option set to something other than its default and the stored value (say `lr=0.01` on a run that
    trained at 0.001) is refused here, by name — it would otherwise be dropped without a word."""
    defaults = TrainOptions()
    if given.given is None:
        ignored = {"given", "run_id", "train_windows", "hybrid_config", *RESUME_OVERRIDABLE, *RESUME_ALWAYS_ALLOWED,
                   *RESUME_HOOKS}
        fixed = [f"{name}={getattr(given, name)!r} (the run's: {getattr(stored, name)!r})"
                 for name in TrainOptions.__dataclass_fields__ if name not in ignored
                 and getattr(given, name) != getattr(defaults, name) and getattr(given, name) != getattr(stored, name)]
        if fixed:
            raise OptionsError(f"resume {given.resume}: {'; '.join(fixed)} cannot change when a run is resumed; "
                               f"only {', '.join(n for n in RESUME_OVERRIDABLE)} may")
    changes = {name: getattr(given, name) for name in RESUME_OVERRIDABLE
               if getattr(given, name) != getattr(defaults, name)}
    hooks = {name: getattr(given, name) for name in RESUME_HOOKS}
    return stored.replace(**changes, **hooks, resume=given.resume, run_id=None)


def precision_ladder_for(target_bits: float, n_groups: int) -> tuple[float, ...]:
    """Bits per sensitivity rank around the target: one level up, the target, one level down. For a 1.58-bit
    target and 4 groups this is the guide's (2, 1.58, 1.58, 1)."""
    levels = sorted(float(b) for b in SUPPORTED_BITS)
    i = levels.index(float(target_bits))
    up, down = levels[min(i + 1, len(levels) - 1)], levels[max(i - 1, 0)]
    if n_groups == 1:
        return (float(target_bits),)
    if n_groups == 2:
        return (up, down)
    return (up, *([float(target_bits)] * (n_groups - 2)), down)


def make_precision_plan(student, tokens, values, indices, cfg, bits: float, batch_size: int, alpha: float,
                        temperature: float, device):
    """Parameter clustering → a PrecisionPlan for `student` (the pipeline's and the benchmark's one recipe).
    Sensitivities come from one fixed batch of ≤ 8 training windows: enough to rank layers, and the Hutchinson
    trace's double backward is costly."""
    rows = np.random.default_rng(cfg.seed + 1).permutation(len(tokens))[:min(8, batch_size)]
    batches = [torch.from_numpy(np.sort(rows))]

    def loss_fn(model, index):
        batch = tokens[index].to(device)
        return distillation_loss(model(batch[:, :-1]), batch[:, 1:], values[index].to(device),
                                 indices[index].to(device), alpha, temperature)[0]

    budget = cfg.precision_budget if cfg.precision_budget is not None else bits
    return build_precision_plan(student, loss_fn, batches, n_clusters=cfg.parameter_clusters, budget=budget,
                                precisions=precision_ladder_for(bits, cfg.parameter_clusters),
                                hutchinson_samples=4, seed=cfg.seed)


class Trainer:
    def __init__(self, options: TrainOptions):
        self.options = options
        self.ctx = dist_utils.DistContext()
        self.store: RunStore | None = None
        self.writer = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self.checkpoint: dict | None = None
        self.stop_signal: int | None = None
        self.console: Console | None = None
        self.export_only = False
        self.state: TrainState | None = None
        self._old_handlers: dict = {}

    # ================================================================================================ run ======
    def run(self) -> TrainResult:
        start = time.perf_counter()
        self.device = resolve_device(self.options.device)
        self.ctx = dist_utils.init_distributed(self.device.type)
        if self.ctx.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.ctx.local_rank)
        self.is_main = self.ctx.is_main
        try:
            self._attach_launcher_record()
            try:
                self.prepare()
                self.prepare_seconds = time.perf_counter() - start
            except BAD_INPUT_ERRORS as exc:
                self._mark_launcher_record_failed(str(exc))
                raise
            self.open_run()
            self._install_signal_handlers()
            try:
                self.setup()
                self.setup_time = time.perf_counter() - start
                self.fit()
                return self.finish()
            except BaseException as exc:
                self._record_failure(exc)
                raise
        finally:
            self._restore_signal_handlers()
            if self.console is not None:
                self.console.on_fit_end(self.state)
            if self.writer is not None:
                self.writer.close()
            dist_utils.cleanup(self.ctx)

    # ============================================================================================ prepare ======
    def prepare(self) -> None:
        """Everything that can fail because of the user's input, before a run record exists."""
        opts = self.options
        if opts.resume is not None:
            opts = self.options = self._resumed_options(opts)
        opts.validate()
        self.preset = opts.preset_obj
        if self.ctx.enabled and self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.ctx.world_size))
        documents = load_documents(opts.data, source=opts.data_source)
        self.source_name = opts.data or opts.data_source or "chatterbot-corpus (English)"
        self.seq_len = opts.seq_len or self.preset.seq_len
        self.batch_size = opts.hybrid_training_config().batch_size
        self._state_preparation_estimate(documents)
        with NodeFirst(self.ctx):
            if opts.teacher is not None:
                self.teacher = load_teacher(opts.teacher, log=self.say)
                tokenizer = self.teacher.tokenizer
            elif self.preset.teacher == "smollm2":
                self.teacher = load_teacher(smollm2_gguf_path(), log=self.say)
                tokenizer = self.teacher.tokenizer
            else:                                            # tiny: the teacher is trained in setup()
                self.teacher = None
                tokenizer = tiny_tokenizer(documents, documents_fingerprint(documents), self.preset.tokenizer_vocab,
                                           log=self.say)
        self.tokenizer = tokenizer
        # Big data: only the windows this run draws get packed, decoded, clustered and a teacher forward pass.
        self.dataset = build_dataset(
            documents, tokenizer, self.seq_len, opts.split_seed, source_name=str(self.source_name),
            max_tokens=opts.max_tokens, max_train_windows=self._train_windows_budget(),
            max_val_windows=opts.eval_windows or self.preset.eval_windows, keep_all_below=SUBSET_MIN_WINDOWS,
            progress=make_progress("tokenising", self.say, self._show_bars(), "M characters", 1e6))
        del documents
        if len(self.dataset.train) < self.dataset.train.n_available:
            opts.train_windows = len(self.dataset.train)   # stored with the run: --resume uses the same windows
        self.say("Data: " + self.dataset.describe(str(self.source_name)))
        # The schedule.
        if self.batch_size % self.ctx.world_size:
            raise OptionsError(f"--batch_size {self.batch_size} must be divisible by the number of processes "
                               f"({self.ctx.world_size}): every rank takes an equal share of each batch")
        n_train = len(self.dataset.train)
        self.steps_per_epoch = opts.steps_per_epoch or self.preset.steps_per_epoch or math.ceil(n_train /
                                                                                                 self.batch_size)
        self.total_steps = opts.max_steps if opts.max_steps else opts.epochs * self.steps_per_epoch
        if self.total_steps > MAX_STEPS:
            raise OptionsError(f"--epochs {opts.epochs} × {self.steps_per_epoch} steps per epoch = "
                               f"{self.total_steps:,} steps, more than the limit of {MAX_STEPS:,}")
        self.n_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.cfg = opts.hybrid_training_config(total_steps=self.total_steps)
        self.bits = opts.resolved_bits()
        self.student_config = StudentConfig.from_size(opts.student_size or self.preset.student_size,
                                                      self.dataset.vocab_size, self.seq_len)
        self.data_clustering = opts.hybrid and (opts.data_clustering if opts.data_clustering is not None
                                                else self.cfg.use_clustering)
        self.param_clustering = opts.hybrid and self.bits < 16 and (
            opts.param_clustering if opts.param_clustering is not None else self.cfg.use_clustering)
        if opts.export and not opts.track:
            raise OptionsError("export needs a run folder: use track=True (the default)")
        if opts.resume is not None:
            self.checkpoint = load_checkpoint(self._resume_dir / CHECKPOINT_NAME, self._fingerprint())
            done = int(self.checkpoint["step"])
            self.export_only = done >= self.total_steps and bool(opts.export)
            if done >= self.total_steps and not self.export_only:
                raise RunResumeError(f"run {opts.resume} already completed {done} of {self.total_steps} steps; "
                                     "pass a larger --max_steps or --epochs to train it further")

    def _train_windows_budget(self) -> int | None:
        opts = self.options
        return train_windows_budget(self.batch_size, opts.max_steps, opts.epochs,
                                    opts.steps_per_epoch or self.preset.steps_per_epoch, stored=opts.train_windows)

    def _teacher_kind(self) -> str:
        return "user" if self.options.teacher is not None else self.preset.teacher

    def _show_bars(self) -> bool:
        return self.is_main and self.options.progress and not self.options.quiet

    def _state_preparation_estimate(self, documents) -> None:
        """Before tokenising: how long the preparation should take (said for data over 1 MB, or when > 1 min)."""
        n_chars = sum(doc.n_chars() for doc in documents)
        val_windows = self.options.eval_windows or self.preset.eval_windows
        seconds, line = preparation_estimate(n_chars, self.seq_len, self._train_windows_budget(), val_windows,
                                             EXPECTED_TOKENS_PER_S[self._teacher_kind()], self.options.max_tokens)
        if n_chars > 1e6 or seconds > 60:
            self.say(f"Preparing {n_chars / 1e6:.1f} M characters of {self.source_name}, estimated {line}"
                     + ("; --max_tokens N or a smaller --max_steps prepares less" if seconds > 300 else ""))

    def _resumed_options(self, given: TrainOptions) -> TrainOptions:
        try:
            run = RunStore(given.runs_root, create=False).get_run(given.resume)
        except RunNotFound:          # a StoreError too, but its message is already the one to show
            raise
        except StoreError as exc:
            raise RunResumeError(f"--resume {given.resume}: {exc}") from None
        if run["status"] in ("running", "queued") and run.get("pid") and pid_alive(run["pid"]) \
                and run["pid"] != os.getpid():
            raise RunResumeError(f"run {given.resume} is {run['status']} (pid {run['pid']}); stop it before "
                                 "resuming it")
        stored_args = run.get("args") or {}
        if not isinstance(stored_args, dict) or "options" not in stored_args:
            raise RunResumeError(f"run {given.resume} was not started by this pipeline (no stored options)")
        stored = TrainOptions.from_dict(stored_args["options"])
        config = {k: v for k, v in (run.get("config") or {}).items()
                  if k in HybridTrainingConfig.__dataclass_fields__}
        stored.hybrid_config = HybridTrainingConfig.from_dict(config) if config else None
        self._resume_dir = Path(run["run_dir"])
        return merge_for_resume(stored, given)

    def _fingerprint(self) -> dict:
        return {"dataset": self.dataset.fingerprint, "student": self.student_config.to_dict(),
                "hybrid": bool(self.options.hybrid), "bits": float(self.bits), "batch_size": int(self.batch_size),
                "seed": int(self.cfg.seed)}

    # =============================================================================================== open ======
    def open_run(self) -> None:
        opts = self.options
        run_id = None
        if self.is_main and opts.track:
            self.store = RunStore(opts.runs_root)
            config = self._config_record()
            args = {"argv": opts.argv, "options": opts.to_dict()}
            if opts.resume is not None:
                run_id = opts.resume
                self.store.update_run(run_id, total_steps=self.total_steps, config=config)
            elif opts.run_id is not None:
                run_id = opts.run_id
                self.store.update_run(run_id, total_steps=self.total_steps, config=config, args=args,
                                      preset=opts.preset)
            else:
                run_id = self.store.create_run(config=config, args=args, preset=opts.preset, name=opts.run_name,
                                               tags=list(opts.tags), notes=opts.notes, status="queued",
                                               total_steps=self.total_steps)
            self.run_dir = self.store.run_dir(run_id)
            self.writer = self.writer or self.store.writer(run_id)
            self.writer.set_pid(os.getpid())
            self.writer.set_device(self._device_label())
            self.writer.set_status("running")
        self.run_id = dist_utils.broadcast_object(run_id, self.ctx)
        run_dir = dist_utils.broadcast_object(str(self.run_dir) if self.run_dir else None, self.ctx)
        self.run_dir = Path(run_dir) if run_dir else None
        if self.is_main and opts.quiet and self.run_id is not None:
            print(f"run_id={self.run_id}", flush=True)
        if self.run_id is not None and self.is_main:
            self.say(f"Run {self.run_id} ({'resumed' if opts.resume else 'new'}) — store {self.store.root}, "
                     f"folder {self.run_dir}")

    def _config_record(self) -> dict:
        opts = self.options
        return {**self.cfg.to_dict(), "hybrid": opts.hybrid, "preset": opts.preset, "bits": self.bits,
                "student_size": opts.student_size or self.preset.student_size, "seq_len": self.seq_len,
                "epochs": self.n_epochs, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "alpha": opts.alpha, "temperature": opts.temperature, "embedder": opts.embedder,
                "data": self.source_name, "teacher": opts.teacher or self.preset.teacher,
                "world_size": self.ctx.world_size, "split_seed": opts.split_seed,
                "data_clustering": self.data_clustering, "param_clustering": self.param_clustering,
                "cluster_batches": opts.cluster_batches if self.data_clustering else None,
                "optimizer": "custom" if opts.optimizer_factory else ("hybrid" if opts.hybrid else "adamw")}

    def _device_label(self) -> str:
        label = str(self.device)
        if self.device.type == "cuda":
            label += f" ({torch.cuda.get_device_name(self.device)})"
        if self.ctx.enabled:
            label += f" × {self.ctx.world_size} ranks ({self.ctx.backend})"
        return label

    # ============================================================================================== setup ======
    def setup(self) -> None:
        opts, cfg = self.options, self.cfg
        # 1. The teacher's top-k logits (the teacher runs once per dataset; afterwards only its cache is read).
        with NodeFirst(self.ctx):
            if self.teacher is None:
                folder = tiny_teacher_dir(self.tokenizer, self.dataset, hidden_size=self.preset.teacher_hidden,
                                          layers=self.preset.teacher_layers, steps=self.preset.teacher_steps,
                                          log=self.say)
                self.teacher = load_teacher(folder, log=self.say)
            k = opts.top_k or self.preset.top_k
            self.logits = teacher_topk_cache(self.teacher, self.dataset, k=k, device=str(self.device),
                                             batch_size=self.preset.teacher_batch_size, log=self.say,
                                             progress=self._teacher_progress)
        self.teacher.release()
        _return_freed_memory()
        if self.logits.built_seconds == 0:
            self.say(f"teacher logits loaded from the cache ({self.logits.path.name})")
        # 2. Evaluation subset: evenly spaced validation windows (the split is already random by document).
        n_val = len(self.dataset.val)
        cap = min(n_val, opts.eval_windows or self.preset.eval_windows)
        self.eval_index = torch.from_numpy(np.unique(np.linspace(0, n_val - 1, cap).round().astype(np.int64)))
        # 3. Data clustering (always computed: the hybrid samples by it; every run reports per-cluster losses).
        started = time.perf_counter()
        if self.checkpoint is not None:
            clustering = {"train": self.checkpoint["clusters"]["train"].numpy(),
                          "val": self.checkpoint["clusters"]["val"].numpy(), "xy_train": None, "xy_val": None}
        else:
            clustering = self._cluster_samples() if self.is_main else None
            clustering = dist_utils.broadcast_object(clustering, self.ctx)
        self.train_clusters = np.asarray(clustering["train"], dtype=np.int64)
        self.val_clusters = torch.from_numpy(np.asarray(clustering["val"], dtype=np.int64))
        self.n_clusters = int(self.train_clusters.max()) + 1
        self.clustering_seconds = time.perf_counter() - started
        if self.writer is not None and clustering.get("xy_train") is not None:
            self._store_samples(clustering)
        # 4. The student, quantized uniformly at the target bits (the plan may change the bits later).
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.student = StudentLM(self.student_config).to(self.device)
        if self.bits < 16:
            quantize_student(self.student, self.bits, cfg.quantizer_scale)
        forward = None
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel
            forward = DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # 5. Batches: cluster-balanced for the hybrid, uniformly shuffled otherwise.
        if self.data_clustering:
            sampler = ClusterBalancedSampler(self.train_clusters, self.batch_size, max_repeats=cfg.max_sample_repeats,
                                             seed=cfg.seed, mixed=opts.cluster_batches == "mixed")
        else:
            sampler = ShuffleBatchSampler(len(self.dataset.train), self.batch_size, seed=cfg.seed)
        # 6. The optimizer.
        scheduler = None
        if opts.optimizer_factory is not None:
            made = opts.optimizer_factory(self.student, opts)
            optimizer, scheduler = made if isinstance(made, tuple) else (made, None)
        elif opts.hybrid:
            optimizer = HybridOptimizer.from_config(self.student.parameters(), cfg, quantization_bits=None,
                                                    n_clusters=self.n_clusters if self.data_clustering else None)
        else:
            optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.base_learning_rate, betas=(0.9, 0.999),
                                          weight_decay=cfg.weight_decay)
        set_optimizer_mode(optimizer, "train")
        # 7. The TrainState: what the loop changes and the checkpoint saves.
        self.state = TrainState(
            model=self.student, optimizer=optimizer, sampler=sampler, scheduler=scheduler, forward=forward,
            data=TrainData(self.dataset.train.tokens, self.logits.train_values, self.logits.train_indices),
            total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch, alpha=opts.alpha,
            temperature=opts.temperature, device=self.device, ctx=self.ctx,
            batch_clusters=self.data_clustering and opts.cluster_batches == "single",
            quantizer_scale=cfg.quantizer_scale, fingerprint=self._fingerprint(),
            flip_tracker=CodeFlipTracker() if self.bits < 16 else None,
            clusters={"train": torch.from_numpy(self.train_clusters), "val": self.val_clusters.clone()})
        if self.checkpoint is not None:
            try:
                self.state.load_state_dict(self.checkpoint)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"checkpoint of run {self.options.resume} does not fit this run: "
                                      f"{str(exc).splitlines()[0][:300]}") from None
        self._announce()

    def _cluster_samples(self) -> dict:
        opts, cfg = self.options, self.cfg
        texts_train, texts_val = self.dataset.train.texts, self.dataset.val.texts
        featurizer = make_featurizer(opts.embedder, seed=cfg.seed, device="cpu")
        train_features = featurizer.fit_transform(texts_train)
        val_features = featurizer.transform(texts_val)
        k = min(cfg.data_clusters, len(texts_train))
        kmeans = KMeansClustering(n_clusters=k, random_state=cfg.seed).fit(train_features)
        labels_train, labels_val = kmeans.labels_, kmeans.predict(val_features)
        xy_train = project_2d(train_features, seed=cfg.seed)
        xy_val = project_2d(val_features, seed=cfg.seed, fit_on=train_features)
        return {"train": labels_train, "val": labels_val, "xy_train": xy_train, "xy_val": xy_val,
                "features_train": train_features, "features_val": val_features}

    def _store_samples(self, clustering: dict) -> None:
        rows = []
        for split, texts in (("train", self.dataset.train.texts), ("val", self.dataset.val.texts)):
            labels, xy, features = (clustering[key] for key in (split, f"xy_{split}", f"features_{split}"))
            step = max(1, math.ceil(len(texts) / SAMPLE_ROWS_MAX))
            for i in range(0, len(texts), step):
                # The features let the workbench compute a t-SNE projection on demand.
                rows.append({"idx": i, "split": split, "cluster": int(labels[i]), "x": float(xy[i, 0]),
                             "y": float(xy[i, 1]), "text": texts[i][:600], "n_tokens": self.seq_len,
                             "features": features[i]})
        self.writer.set_samples(rows)

    def _announce(self) -> None:
        opts, cfg = self.options, self.cfg
        ds = self.dataset
        bits = "full precision" if self.bits >= 16 else f"{self.bits:g}-bit QAT"
        self.say(f"Data: {self.source_name}: {len(ds.train)} training / {len(ds.val)} validation windows of "
                 f"{self.seq_len} tokens from {ds.n_documents or ds.train.n_documents + ds.val.n_documents} distinct documents"
                 + (f" ({ds.n_duplicates} exact duplicates dropped)" if ds.n_duplicates else "")
                 + f"; student vocabulary {ds.vocab_size} tokens")
        self.say(f"Student: {opts.student_size or self.preset.student_size} ({self.student.n_params() / 1e6:.2f} M "
                 f"parameters, {bits}); teacher: {self.teacher.description}")
        self.say(f"Schedule: {self.total_steps} steps = {self.n_epochs} epochs × {self.steps_per_epoch} steps, "
                 f"batch {self.batch_size} × {self.seq_len} tokens"
                 + (f", {self.ctx.world_size} processes" if self.ctx.enabled else ""))
        if opts.hybrid:
            aux = "auxiliary NN guidance" if cfg.use_auxiliary_nn else "no auxiliary NN"
            clusters = self.n_clusters if self.data_clustering else 0
            self.say(f"Initialized hybrid optimization with {clusters} data clusters and {aux}")
        elif opts.optimizer_factory is not None:
            self.say(f"Initialized custom optimizer {type(self.state.optimizer).__name__}")
        else:
            self.say(f"Initialized baseline AdamW at constant LR {cfg.base_learning_rate:g}")
        if self.export_only:
            self.say(f"Run {opts.resume} already completed {self.state.step} steps: exporting it without training")
        elif self.state.step:
            self.say(f"Resuming at step {self.state.step} of {self.total_steps}")

    # ================================================================================================ fit ======
    def fit(self) -> None:
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        fit(self.state, self.total_steps, self.callbacks())
        self.stopped = self.state.stop_reason == "stop requested"
        if self.stopped:
            self.say(f"Stop requested: checkpoint saved at step {self.state.step} of {self.total_steps}")

    def callbacks(self) -> list:
        """The pipeline's callbacks, in the order they run after each step (see callbacks.py)."""
        opts, writer, main = self.options, self.writer, self.is_main
        found = []
        if self.param_clustering:
            found.append(PrecisionPlanSwitch(max(1, round(PLAN_WARMUP_FRACTION * self.total_steps)),
                                             self._build_plan, is_main=main, on_plan=self._report_plan))
        if self.bits < 16:
            found.append(QuantizationDiagnostics(self.cfg.log_interval, writer.log_layers if writer else None))
        if writer is not None:
            found.append(StoreLogging(writer))
        if main and self.run_dir is not None:
            found.append(SystemMetrics(self.run_dir))
        if main:
            self.console = Console(self.say, show_bar=opts.progress and not opts.quiet)
            found.append(self.console)
        found.append(Evaluation(self._evaluate, every_steps=opts.eval_every_steps, every_epochs=opts.eval_every,
                                is_main=main, on_result=self._report_eval))
        found.append(DivergenceGuard(DIVERGENCE_PATIENCE))
        found.append(StopRequests(lambda: self.stop_signal is not None, writer, opts.stop_after_steps))
        found.extend(opts.callbacks)
        if self.run_dir is not None:
            every_s = CHECKPOINT_EVERY_S if opts.checkpoint_every_s is None else opts.checkpoint_every_s
            found.append(Checkpointing(self.run_dir / CHECKPOINT_NAME, every_s, is_main=main,
                                       on_saved=self._report_checkpoint))
        return found

    def _build_plan(self, state: TrainState):
        return make_precision_plan(state.model, state.data.tokens, state.data.values, state.data.indices, self.cfg,
                                   self.bits, self.batch_size, self.options.alpha, self.options.temperature,
                                   self.device)

    def _report_plan(self, plan, seconds: float) -> None:
        bit_map = plan.bit_map()
        self.say(f"Precision plan: {len(bit_map)} layers in {len(set(plan.cluster_bits))} parameter clusters → "
                 f"average {plan.avg_bits:.3f} bits (budget {plan.budget:g}) in {seconds:.1f} s")
        if self.writer is not None:
            self.writer.set_plan([{"layer": name, "module_type": name.rsplit(".", 1)[-1], "bits": info["bits"],
                                   "cluster": info["cluster"], "n_params": info.get("n_params"),
                                   "features": {k: v for k, v in info.items()
                                                if k not in ("bits", "cluster", "n_params")}}
                                  for name, info in plan.layers.items()])

    def _evaluate(self, state: TrainState) -> dict:
        index = self.eval_index
        return evaluate(state.model, self.dataset.val.tokens[index], self.logits.val_values[index],
                        self.logits.val_indices[index], self.val_clusters[index], device=self.device)

    def _report_eval(self, step: int, metrics: dict) -> None:
        if self.writer is not None:
            self.writer.log_eval(step, **metrics)
        self.say(f"  eval @ step {step}: val_loss {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.2f}), "
                 f"KL to teacher {metrics['kl_teacher']:.4f}, top-1 agreement {metrics['top1_agreement']:.1%}, "
                 f"quantization diff max {metrics['qdiff_max']:.4f} / mean {metrics['qdiff_mean']:.4f}")

    def _report_checkpoint(self, path: Path) -> None:
        if self.writer is not None:
            self.writer.set_artifact("checkpoint", path)

    # ============================================================================================== finish ======
    def finish(self) -> TrainResult:
        opts, state = self.options, self.state
        done = state.step
        final_eval = state.evals[-1] if state.evals else {}
        diverged = None if self.stopped else (state.diverged or divergence(state))
        summary = self._summary(final_eval)
        if diverged:
            summary.extra["diverged"] = diverged
        if self.is_main and not self.stopped:
            for line in render_summary(summary).splitlines():
                self.say(line)
        metrics_csv = None
        if self.is_main and opts.save_metrics and self.run_dir is not None:
            metrics_csv = self._write_metrics_csv(self.run_dir / "metrics.csv")
            self.say(f"Metrics written to {metrics_csv}")
        export_report = None
        if self.is_main and opts.export and not self.stopped and not diverged:
            export_report = self._export()
            summary.extra.update(compression_vs_fp32_linear=export_report.compression_vs_fp32_linear,
                                 compression_vs_fp32_file=export_report.compression_vs_fp32_file,
                                 linear_bits_per_weight=export_report.linear_bits_per_weight,
                                 file_bits_per_weight=export_report.file_bits_per_weight,
                                 export_bytes=export_report.file_bytes)
        status = "stopped" if self.stopped else ("diverged" if diverged else "finished")
        flat = summary.to_dict()
        if self.writer is not None:
            self.writer.set_summary(flat)
            if metrics_csv is not None:
                self.writer.set_artifact("metrics_csv", metrics_csv)
            self.writer.log(f"run {status} after {done} steps" + (f": {diverged}" if diverged else ""),
                            level="error" if diverged else "info")
            self.writer.set_status(status, error=f"diverged: {diverged}" if diverged else None)
        dist_utils.barrier(self.ctx)
        return TrainResult(
            status=status, run_id=self.run_id, run_dir=self.run_dir, steps=done, total_steps=self.total_steps,
            summary=flat, history=[h.as_dict() for h in state.history], evals=state.evals, final_eval=final_eval,
            model=self.student, dataset=self.dataset, plan=state.plan, export=export_report,
            wall_time_s=state.train_seconds, setup_time_s=self.setup_time, tokens_per_s=flat["tokens_per_s"],
            peak_rss_mb=flat["peak_rss_mb"], train_peak_rss_mb=flat.get("train_peak_rss_mb"),
            cuda_peak_mb=flat.get("cuda_peak_mb"), stop_signal=self.stop_signal, diverged=diverged)

    def _summary(self, final_eval: dict) -> RunSummary:
        state, opts = self.state, self.options
        rows = state.history
        finite = [h.loss for h in rows if math.isfinite(h.loss)]
        last_epoch = [h.loss for h in rows if rows and h.epoch == rows[-1].epoch and math.isfinite(h.loss)]
        taken = [h for h in rows if not h.skipped]
        multipliers = [h.lr_multiplier for h in taken if h.lr_multiplier is not None]
        active = [h.constraint_active for h in taken if h.constraint_active is not None]
        radius = next((h.trust_radius for h in reversed(rows) if h.trust_radius is not None), None)
        train_tokens = state.step * self.batch_size * self.seq_len
        tokens_per_s = train_tokens / state.train_seconds if state.train_seconds > 0 else 0.0
        extra = {
            "clustering_seconds": self.clustering_seconds, "setup_seconds": self.setup_time,
            "prepare_seconds": self.prepare_seconds, "teacher_cache_seconds": self.logits.built_seconds,
            "teacher_tokens": (len(self.dataset.train) + len(self.dataset.val)) * self.seq_len,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_peak_rss_mb": peak_rss_mb(),
            "avg_bits": state.plan.avg_bits if state.plan is not None else (self.bits if self.bits < 16 else 32.0),
        }
        if self.device.type == "cuda":
            extra["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        named = {k: v for k, v in final_eval.items() if k in ("val_loss", "val_ppl", "top1_agreement")}
        extra.update({k: v for k, v in final_eval.items() if k not in named and k != "step"})
        optimizer = "custom" if opts.optimizer_factory else ("hybrid" if opts.hybrid else "adamw")
        return RunSummary(
            total_steps=state.step, final_loss=finite[-1] if finite else None,
            avg_lr_multiplier=sum(multipliers) / len(multipliers) if multipliers else None,
            constraint_activation_rate=sum(active) / len(active) if active else None,
            final_trust_radius=radius, optimizer=optimizer,
            final_epoch_loss=sum(last_epoch) / len(last_epoch) if last_epoch else None,
            final_step_loss=rows[-1].loss if rows else None, skipped_steps=sum(1 for h in rows if h.skipped),
            tokens_per_s=tokens_per_s, train_seconds=state.train_seconds, **named, extra=extra)

    def _write_metrics_csv(self, path: Path) -> Path:
        evals_at = {e["step"]: e for e in self.state.evals}
        columns = metrics_csv_header([k for e in self.state.evals for k in e])
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for h in self.state.history:
                row = {**evals_at.get(h.step, {}), **h.as_dict()}
                writer.writerow([_csv(row.get(c)) for c in columns])
        return path

    def _export(self):
        from .export import export_student, load_exported_student
        path = self.run_dir / "student.safetensors"
        report, manifest = export_student(
            self.student, path, self.dataset.vocab,
            extra={"preset": self.options.preset, "run_id": self.run_id, "teacher": self.teacher.description,
                   "tokenizer_dir": str(self.teacher.directory), "seq_len": self.seq_len})
        # Check the claim "loading the export reproduces the quantized student's logits exactly".
        loaded, _ = load_exported_student(path)
        probe = self.dataset.val.tokens[:4, :-1]
        self.student.eval()
        with torch.no_grad():
            same = torch.equal(loaded(probe), self.student.cpu()(probe))
        self.student.to(self.device).train()
        self.say(f"Exported the student to {path} ({report.file_bytes / 1024:.1f} KiB; manifest {manifest.name}): "
                 f"linear layers {report.linear_bits_per_weight:.2f} bits/weight = "
                 f"{report.compression_vs_fp32_linear:.1f}× smaller than FP32; whole file "
                 f"{report.file_bits_per_weight:.2f} bits/weight = {report.compression_vs_fp32_file:.1f}× smaller; "
                 f"reloaded logits identical: {same}")
        if self.writer is not None:
            self.writer.set_artifact("export", path)
            self.writer.set_artifact("export_manifest", manifest)
        if not same:
            raise RuntimeError(f"the exported student {path} does not reproduce the trained student's logits")
        fmt = self.options.export_format
        if fmt != "packed":                   # gguf / hf are made from the packed student (run_export.py)
            from .run_export import export_packed_student
            result = export_packed_student(path, fmt)
            self.say(result.line)
            if self.writer is not None:
                self.writer.set_artifact(f"export_{fmt}", result.path)
        return report

    # ============================================================================================ helpers ======
    def say(self, message: str) -> None:
        """A progress line: to stdout (rank 0, not quiet) and to the run's log in the store."""
        if not getattr(self, "is_main", True):
            return
        if not self.options.quiet:
            if self.console is None or not self.console.write(message):
                print(message, flush=True)
        if self.writer is not None:
            self.writer.log(message)

    def _teacher_progress(self, done: int, total: int) -> None:
        if self.writer is not None:
            self.writer.heartbeat()
        if done == total or done % max(1, total // 10) < self.preset.teacher_batch_size:
            line = f"  teacher logits: {done}/{total} windows"
            if self._show_bars() and self.writer is not None:
                self.writer.log(line)          # the bar shows it on the terminal
            else:
                self.say(line)
        if self._show_bars():
            if getattr(self, "_teacher_bar", None) is None:
                self._teacher_bar = make_progress("teacher logits", self.say, True, "windows")
            self._teacher_bar(done, total)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt        # a second Ctrl-C: stop now
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def _record_failure(self, exc: BaseException) -> None:
        if self.writer is None:
            return
        if isinstance(exc, KeyboardInterrupt):
            self.writer.set_status("stopped", error="interrupted (KeyboardInterrupt)")
            return
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if isinstance(exc, (CheckpointWriteError, StoreError)):
            text = str(exc)                     # one line says it all (e.g. "disk full" and where)
        try:
            self.writer.log(f"failed: {type(exc).__name__}: {exc}", level="error")
            self.writer.set_status("failed", error=text)
        except Exception:
            pass

    def _attach_launcher_record(self) -> None:
        """A launcher pre-created the record (status queued): check it and keep its heartbeat alive from now on,
        so a long preparation (e.g. converting the GGUF teacher) is not mistaken for a dead process."""
        opts = self.options
        if not (self.is_main and opts.track and opts.run_id):
            return
        self.store = RunStore(opts.runs_root)
        run = self.store.get_run(opts.run_id)
        if run["status"] != "queued":
            raise OptionsError(f"--run_id {opts.run_id}: the run is {run['status']}, not queued; use --resume to "
                               "continue a stopped run")
        self.writer = self.store.writer(opts.run_id)
        self.writer.set_pid(os.getpid())

    def _mark_launcher_record_failed(self, message: str) -> None:
        """Bad input for a launcher's record: it must not stay queued forever."""
        if self.writer is not None:
            self.writer.log(f"error: {message}", level="error")
            self.writer.set_status("failed", error=message)


class NodeFirst:
    """The first process of each node fills a cache (teacher, tokenizer, logits); the node's other processes wait,
    then read what it wrote. Per node, so multi-node jobs need no shared cache folder (cache writes are atomic, so
    a shared one works too)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.first = ctx.local_rank == 0

    def __enter__(self):
        if not self.first:
            dist_utils.barrier(self.ctx)

    def __exit__(self, *exc):
        if self.first and exc[0] is None:
            dist_utils.barrier(self.ctx)
        return False


def reset_peak_rss() -> None:
    """Linux: writing "5" to clear_refs resets the peak RSS (VmHWM), so a training loop's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """The process's peak RSS (VmHWM) since start or the last reset_peak_rss(); None off Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _return_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, so the 1.2 GiB of a
    released SmolLM2 teacher would still count in the process's memory during training)."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):     # not glibc (macOS, musl): nothing to do
        pass


def _csv(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    return value
