"""TrainOptions: everything one distillation run needs, shared by the CLI, the workbench's launcher and Python.

Torch-free on purpose: the CLI parses and validates its flags with it before torch or transformers are imported
(a bad flag answers in well under a second), and the workbench builds one and hands it to the CLI as a JSON file
(`--options FILE`), so nothing a user types is ever read as a flag.

Fields left at None take the preset's value (student size, window length, epoch length) or the
HybridTrainingConfig's (learning rate, batch size, clusters, ...), so "explicit values win" works the same way for
flags, a --config file and Python.

Python-only hooks (not flags): `hybrid_config` (a HybridTrainingConfig, e.g. with use_* switches off for
ablations), `optimizer_factory`, `data_clustering` / `param_clustering` (ablate one kind of clustering),
`eval_every_steps`, `stop_after_steps`, `track`, `callbacks` (extra training-loop callbacks, see loop.py).

Sizes have documented upper bounds (MAX_*), so an absurd value is refused in one line before any work starts;
the batch size is also checked against the memory this machine has available (`check_batch_memory`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError, HybridTrainingConfig, field_error
from ..schema import (CLUSTER_BATCHES, DATA_SOURCES, DEVICES, EMBEDDERS, EXPORT_FORMATS, PRECISIONS, TRUST_REGION_MODES,
                      default_runs_root)
from .presets import PRESETS, STUDENT_SIZES, get_preset

# Upper bounds of the sizes (documented in --help). They are far beyond what a run on this project's hardware
# needs, and low enough that nothing downstream (SQLite integers, tensor shapes, memory) can overflow.
MAX_STEPS = 10_000_000          # optimizer steps in total (--max_steps, or --epochs × steps per epoch)
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 65_536         # windows per step (and at most what fits in the available memory)
MIN_SEQ_LEN = 8                 # tokens per window: fewer leave no context to distil (one bound for CLI and form)
MAX_SEQ_LEN = 8_192             # tokens per window
MAX_CLUSTERS = 4_096
MAX_TOP_K = 4_096
# Flags whose value may change when a run is resumed; every other flag is the stored run's and is refused.
RESUME_OVERRIDABLE = ("epochs", "max_steps", "export", "quiet", "progress", "device", "save_metrics",
                      "checkpoint_every_s")
RESUME_ALWAYS_ALLOWED = ("resume", "runs_root", "argv", "options_file")


class OptionsError(ValueError):
    """A bad option value; the message names the option and what is allowed."""


@dataclass
class TrainOptions:
    # -- the guide's flags --------------------------------------------------------------------------------------
    hybrid: bool = False                 # hybrid optimizer + clustering; False: AdamW at constant LR (baseline)
    ternary: bool = False                # with qat: 1.58-bit ternary weights
    qat: bool = False                    # quantization-aware training (1-bit alone, 1.58-bit with ternary)
    epochs: int = 20
    data_clusters: int | None = None
    param_clusters: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    eval_every: int | None = 1           # epochs between evaluations (None: none; the last is always evaluated)
    save_metrics: bool = False           # also write <run_dir>/metrics.csv
    # -- pipeline options -----------------------------------------------------------------------------------------
    preset: str = "tiny"
    data: str | None = None              # .txt or chat .jsonl; None: chatterbot-corpus
    data_source: str | None = None       # a named source instead of --data (DATA_SOURCES)
    teacher: str | None = None           # local HF causal-LM directory or .gguf file; None: the preset's teacher
    student_size: str | None = None
    seq_len: int | None = None
    steps_per_epoch: int | None = None   # None: the preset's (tiny: 10; smollm2: one pass over the data)
    bits: float | None = None            # explicit bit-width (1, 1.58, 2, 4, 8; 16/32 = full precision)
    device: str = "auto"
    seed: int | None = None              # None: the config's seed (default 0)
    split_seed: int = 0                  # train/validation split (fixed across training seeds)
    max_steps: int | None = None
    precision_budget: float | None = None
    trust_region_mode: str | None = None
    embedder: str = "tfidf"
    cluster_batches: str = "mixed"       # --hybrid batches: balanced across clusters (mixed) or one cluster each
    alpha: float = 0.5
    temperature: float = 2.0
    top_k: int | None = None
    eval_windows: int | None = None
    max_tokens: int | None = None        # use only the first N tokens of the data
    checkpoint_every_s: float | None = None  # seconds between epoch-end checkpoints (None: 30; 0: every epoch)
    export: str | None = None            # None, or one of EXPORT_FORMATS (True is read as "packed")
    quiet: bool = False
    progress: bool = True
    config: str | None = None            # JSON file of HybridTrainingConfig fields
    runs_root: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    run_id: str | None = None            # a record pre-created by a launcher (status queued)
    resume: str | None = None            # run id to continue from its last checkpoint
    # -- Python-only hooks ----------------------------------------------------------------------------------------
    hybrid_config: HybridTrainingConfig | None = None
    optimizer_factory: Callable | None = None    # (model, options) -> optimizer | (optimizer, lr_scheduler)
    data_clustering: bool | None = None  # None: follow hybrid_config.use_clustering
    param_clustering: bool | None = None
    eval_every_steps: int | None = None  # also evaluate every N steps (benchmarks, the workbench's eval_interval)
    stop_after_steps: int | None = None  # behave as if a stop were requested after this many steps
    track: bool = True                   # write a run record to the run store
    callbacks: list = field(default_factory=list)   # extra training-loop callbacks (loop.Callback)
    argv: list[str] | None = None        # the command line, stored with the run
    train_windows: int | None = None     # set by the pipeline when it uses a subset of big data; kept on --resume
    given: tuple[str, ...] | None = None  # the CLI: names of the options set on the command line / options file

    # -- derived values -----------------------------------------------------------------------------------------
    @property
    def preset_obj(self):
        return get_preset(self.preset)

    @property
    def export_format(self) -> str | None:
        if self.export is True:
            return "packed"
        return self.export or None

    def resolved_bits(self) -> float:
        """32 for a full-precision student, else the QAT bit-width."""
        if self.bits is not None:
            return float(self.bits)
        if not self.qat:
            return 32.0
        return 1.58 if self.ternary else 1.0

    def resolved_runs_root(self) -> Path:
        return Path(self.runs_root).expanduser() if self.runs_root else default_runs_root()

    def validate(self) -> None:
        """Raise OptionsError for the first bad value (before anything is started). Torch-free and quick: the
        values one by one (`errors`), then the resume rules, the runs root, the config and the batch's memory."""
        for message in self.errors().values():
            raise OptionsError(message)
        if self.resume is not None and self.given is not None:
            fixed = [name for name in self.given
                     if name not in RESUME_OVERRIDABLE and name not in RESUME_ALWAYS_ALLOWED]
            if fixed:
                raise OptionsError(
                    f"--resume {self.resume}: {', '.join('--' + n for n in fixed)} cannot change when a run is "
                    f"resumed (the run keeps its stored value); allowed with --resume: "
                    f"{', '.join('--' + n for n in RESUME_OVERRIDABLE if n != 'progress')}, --no_progress")
        if self.track:
            check_runs_root(self.resolved_runs_root(), must_exist=self.resume is not None)
        if self.resume is None:
            cfg = self.hybrid_training_config()   # config fields are validated by HybridTrainingConfig itself
            check_batch_memory(cfg.batch_size, self.seq_len or self.preset_obj.seq_len, self.preset_obj,
                               self.student_size)

    def errors(self) -> dict[str, str]:
        """Every bad option value → its one-line message (empty when all are valid); the workbench's form shows
        them next to their fields, the CLI prints the first."""
        found: dict[str, str] = {}

        def bad(name: str, value: Any, allowed: str) -> None:
            found.setdefault(name, f"--{name} {value!r} is invalid: it must be {allowed}")

        def int_in(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
                    (maximum is not None and value > maximum):
                bad(name, value, f"an integer in [{minimum}, {maximum:,}]" if maximum is not None
                    else f"an integer ≥ {minimum}")

        def choice(name: str, value: Any, allowed, optional: bool = False) -> None:
            if not (value in allowed or (optional and value is None)):
                bad(name, value, "one of " + ", ".join(map(str, allowed)))

        choice("preset", self.preset, PRESETS)
        choice("student_size", self.student_size, STUDENT_SIZES, optional=True)
        choice("device", self.device, DEVICES)
        choice("embedder", self.embedder, EMBEDDERS)
        choice("cluster_batches", self.cluster_batches, CLUSTER_BATCHES)
        choice("trust_region_mode", self.trust_region_mode, TRUST_REGION_MODES, optional=True)
        if self.export is True:
            self.export = "packed"
        elif self.export is False:
            self.export = None
        choice("export", self.export, EXPORT_FORMATS, optional=True)
        int_in("max_steps", self.max_steps, 1, MAX_STEPS)
        int_in("epochs", self.epochs, 1, MAX_EPOCHS)
        int_in("steps_per_epoch", self.steps_per_epoch, 1, MAX_STEPS)
        int_in("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        int_in("seq_len", self.seq_len, MIN_SEQ_LEN, MAX_SEQ_LEN)
        int_in("data_clusters", self.data_clusters, 1, MAX_CLUSTERS)
        int_in("param_clusters", self.param_clusters, 1, MAX_CLUSTERS)
        int_in("top_k", self.top_k, 1, MAX_TOP_K)
        for name in ("eval_every", "eval_windows", "eval_every_steps", "stop_after_steps"):   # None: never
            int_in(name, getattr(self, name), 1, MAX_STEPS)
        int_in("train_windows", self.train_windows, 1, 2 ** 62)
        int_in("max_tokens", self.max_tokens, 1, 2 ** 62)
        int_in("seed", self.seed, 0, 2 ** 32 - 1)
        int_in("split_seed", self.split_seed, 0, 2 ** 32 - 1)
        if self.checkpoint_every_s is not None and not (_finite(self.checkpoint_every_s)
                                                        and self.checkpoint_every_s >= 0):
            bad("checkpoint_every_s", self.checkpoint_every_s, "a finite number of seconds ≥ 0")
        if self.lr is not None and not (_finite(self.lr) and self.lr > 0):
            bad("lr", self.lr, "a finite number > 0")
        if self.weight_decay is not None and not (_finite(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", self.weight_decay, "a finite number ≥ 0")
        if not (_finite(self.alpha) and 0 <= self.alpha <= 1):
            bad("alpha", self.alpha, "a number in [0, 1] (weight of the hard-label cross-entropy)")
        if not (_finite(self.temperature) and self.temperature > 0):
            bad("temperature", self.temperature, "a finite number > 0")
        if self.ternary and not self.qat and self.bits is None:
            found["ternary"] = ("--ternary needs --qat: ternary (1.58-bit) weights are trained with quantization-"
                                "aware training; use --ternary --qat")
        if self.bits is not None:
            try:
                self.bits = normalize_bits(self.bits)
            except OptionsError as exc:
                found["bits"] = str(exc)
        if self.precision_budget is not None:   # the config's own range: one rule, no silent drop
            message = field_error("precision_budget", self.precision_budget)
            if message:
                bad("precision_budget", self.precision_budget, "average bits per weight in [1, 8]")
        for name in ("run_name", "notes"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                bad(name, value, "text")
        if not isinstance(self.tags, (list, tuple)) or any(not isinstance(t, str) or not t.strip() or "," in t
                                                           for t in self.tags):
            bad("tags", self.tags, "a list of non-empty tags without commas")
        choice("data_source", self.data_source, DATA_SOURCES, optional=True)
        if self.data_source is not None and self.data is not None:
            found["data_source"] = "--data and --data_source cannot be combined: pass one of them"
        if self.data is not None and not Path(self.data).expanduser().exists():
            found["data"] = f"--data {self.data}: file does not exist"
        if self.config is not None and not Path(self.config).expanduser().is_file():
            found["config"] = f"--config {self.config}: file does not exist"
        if self.run_id is not None and self.resume is not None:
            found["run_id"] = "--run_id and --resume cannot be combined: --resume continues an existing run"
        if self.optimizer_factory is not None and not callable(self.optimizer_factory):
            found["optimizer_factory"] = "optimizer_factory must be callable: (model, options) -> optimizer"
        return found

    def hybrid_training_config(self, total_steps: int | None = None) -> HybridTrainingConfig:
        """The HybridTrainingConfig of this run: --config file (or `hybrid_config`), then explicit options."""
        if self.hybrid_config is not None:
            base = self.hybrid_config.to_dict()
        elif self.config is not None:
            try:
                base = HybridTrainingConfig.from_json(Path(self.config).expanduser().read_text()).to_dict()
            except ConfigError as exc:
                raise ConfigError(f"--config {self.config}: {exc}", field=exc.field) from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"--config {self.config}: cannot be read ({exc})") from None
        else:
            base = HybridTrainingConfig().to_dict()
        explicit = {
            "base_learning_rate": self.lr, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
            "data_clusters": self.data_clusters, "parameter_clusters": self.param_clusters,
            "trust_region_mode": self.trust_region_mode, "max_steps": total_steps,
            "precision_budget": self.precision_budget,
        }
        base.update({k: v for k, v in explicit.items() if v is not None})
        if self.seed is not None:
            base["seed"] = self.seed
        bits = self.resolved_bits()
        base["use_quantization"] = bits < 16
        if bits < 16:
            base["target_bits"] = bits
        return HybridTrainingConfig.from_dict(base)

    # -- persistence (stored with the run so --resume rebuilds the same options; the launcher's options file) ----
    def to_dict(self) -> dict[str, Any]:
        skip = {"hybrid_config", "optimizer_factory", "callbacks", "given"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainOptions":
        known = {f.name for f in fields(cls)} - {"hybrid_config", "optimizer_factory", "callbacks", "given"}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("export"), bool):          # runs stored before export formats
            values["export"] = "packed" if values["export"] else None
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainOptions":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)


def check_runs_root(root: Path, must_exist: bool = False) -> None:
    """The runs root must be (or be creatable as) a writable directory: checked before any data preparation, by
    really creating (and removing) a temporary entry — permission bits say nothing for root or a read-only mount."""
    try:
        resolved = root.resolve(strict=False)
        exists = resolved.exists()
    except (RuntimeError, OSError) as exc:          # a symlink loop, a component that is not a directory, ...
        raise OptionsError(f"--runs_root {root}: cannot be used ({_reason(exc)})") from None
    if exists and not resolved.is_dir():
        raise OptionsError(f"--runs_root {root}: is a file, not a directory; pass a folder for the run store")
    if not exists and must_exist:
        raise OptionsError(f"--runs_root {root}: does not exist (no run store there to resume from)")
    probe_in = resolved
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise OptionsError(f"--runs_root {root}: cannot be created ({probe_in} is not a directory)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=probe_in))
    except OSError as exc:
        where = "the directory" if exists else f"its parent {probe_in}"
        raise OptionsError(f"--runs_root {root}: {where} is not writable ({_reason(exc)}); pass a writable "
                           "folder") from None


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None elsewhere."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def step_memory_bytes(batch_size: int, seq_len: int, preset, student_size: str | None = None) -> int:
    """A lower estimate of one training step's memory: the student's logits over the vocabulary (forward, softmax
    and gradient: 3 float32 copies) plus its activations (~24 floats per hidden unit, layer and token)."""
    d_model, n_layers, _, _ = STUDENT_SIZES[student_size or preset.student_size]
    vocab = preset.tokenizer_vocab if preset.teacher == "tiny" else 4_096     # the smollm2 data uses ~4.6 k tokens
    per_token = 3 * vocab * 4 + 24 * d_model * n_layers * 4
    return batch_size * seq_len * per_token


def check_batch_memory(batch_size: int, seq_len: int, preset, student_size: str | None = None,
                       available: int | None = None) -> None:
    available = available_memory_bytes() if available is None else available
    if available is None:
        return
    need = step_memory_bytes(batch_size, seq_len, preset, student_size)
    if need > available:
        fits = max(1, int(batch_size * available / need))
        raise OptionsError(f"--batch_size {batch_size}: one training step needs about {need / 2 ** 30:.1f} GiB "
                           f"(windows of {seq_len} tokens), but {available / 2 ** 30:.1f} GiB of memory is "
                           f"available; use --batch_size {fits} or less")


def normalize_bits(value: Any) -> float:
    """The canonical bit-width (as the quantizers spell it): 1.58 for 1.575–1.6 (ternary: 1.58, 1.585, log2 3,
    1.6 packed), else an exact member of PRECISIONS."""
    if _finite(value):
        if 1.575 <= float(value) <= 1.6 + 1e-9:
            return 1.58
        for allowed in PRECISIONS:
            if abs(float(value) - allowed) < 1e-9:
                return float(allowed)
    raise OptionsError(f"--bits {value!r} is invalid: it must be one of "
                       + ", ".join(f"{b:g}" for b in PRECISIONS) + " (16 and 32: full precision)")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
