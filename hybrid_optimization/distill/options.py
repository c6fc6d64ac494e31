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

import argparse
import dataclasses
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ..config import (FIELD_RULES, MAX_BATCH_SIZE, MAX_CLUSTERS, MAX_SEED, MAX_STEPS,  # noqa: F401 (re-exported)
                      ConfigError, HybridTrainingConfig, field_error)
from ..schema import (CLUSTER_BATCHES, DATA_SOURCES, DATA_SUFFIXES, DEVICES, EMBEDDERS, EXPORT_FORMATS, RUN_ID_PATTERN,
                      RunsRootError, check_runs_root, default_runs_root, normalize_bits, notes_problem,
                      run_name_problem, tags_problem)
from .presets import PRESETS, STUDENT_SIZES, get_preset
from .report_to import parse_report_to, report_to_error

# Upper bounds of the sizes (documented in --help). They are far beyond what a run on this project's hardware
# needs, and low enough that nothing downstream (SQLite integers, tensor shapes, memory) can overflow.
# MAX_STEPS (optimizer steps in total: --max_steps, or --epochs × steps per epoch), MAX_BATCH_SIZE (windows per step,
# and at most what fits in the available memory), MAX_CLUSTERS and MAX_SEED are the config's own bounds (config.py):
# one bound per quantity for the CLI, the form, the sweep and the optimizer.
MAX_EPOCHS = 100_000
MIN_SEQ_LEN = 8                 # tokens per window: fewer leave no context to distil (one bound for CLI and form)
MAX_SEQ_LEN = 8_192             # tokens per window
MAX_TOP_K = 4_096
MAX_OPTIONS_FILE_BYTES = 1 << 20   # --options / --config JSON files: at most 1 MB (they hold a few dozen values)
BINARY_SAMPLE_BYTES = 1 << 16      # a data file's head sampled for NUL bytes (text has none; binary has many)
# Flags whose value may change when a run is resumed; every other flag is the stored run's and is refused.
RESUME_OVERRIDABLE = ("epochs", "max_steps", "export", "quiet", "progress", "device", "save_metrics",
                      "checkpoint_every_s", "report_to")
RESUME_ALWAYS_ALLOWED = ("resume", "runs_root", "argv", "options_file")


_RUN_ID = re.compile(RUN_ID_PATTERN)
# Python-only hooks: not part of the options document (to_dict / options.json / the store).
PYTHON_ONLY = frozenset({"optimizer_factory", "callbacks", "given"})


class OptionsError(ValueError):
    """A bad option value; the message names the option and what is allowed."""


@dataclass(frozen=True)
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
    optimizer: str | None = None         # schema.BASE_OPTIMIZERS (None: adamw; with --hybrid: the config's base)
    schedule: str | None = None          # schema.SCHEDULES after warmup_steps of warmup (None: resolved_schedule)
    warmup_steps: int | None = None      # None: schema.default_warmup_steps (5 % of the steps with a schedule)
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
    report_to: list[str] = field(default_factory=list)   # also report to: tensorboard, mlflow (reporting.py)
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

    def __post_init__(self) -> None:
        # Normalised once, here (so that `errors()` is a pure query and the object never changes afterwards): a
        # bare export flag is "packed", the bit-width the canonical one, tags a list, and a config given as a JSON
        # object (an options file, a stored run) a HybridTrainingConfig. Values of the wrong type stay as they are,
        # for `errors()` to name.
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.export is True:
            set_("export", "packed")
        elif self.export is False:
            set_("export", None)
        if _finite(self.bits):
            try:
                set_("bits", normalize_bits(self.bits))
            except ValueError:
                pass
        if isinstance(self.tags, tuple):
            set_("tags", list(self.tags))
        if isinstance(self.report_to, (str, tuple)):          # "tensorboard,mlflow" from Python
            set_("report_to", list(parse_report_to(self.report_to)))
        if isinstance(self.hybrid_config, dict):
            set_("hybrid_config", HybridTrainingConfig.from_dict(self.hybrid_config))

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
        # --resume: a fixed option repeated with the stored value is fine, a different one is refused by name, with
        # both values (plan.merge_for_resume, which reads the stored options).
        if self.track:
            try:
                check_runs_root(self.resolved_runs_root(), must_exist=self.resume is not None)
            except RunsRootError as exc:
                raise OptionsError(str(exc)) from None
        if self.resume is None:
            cfg = self.hybrid_training_config()   # config fields are validated by HybridTrainingConfig itself
            check_batch_memory(cfg.batch_size, self.seq_len or self.preset_obj.seq_len, self.preset_obj,
                               self.student_size)

    def errors(self) -> dict[str, str]:
        """Every bad option value → its one-line message (empty when all are valid); the workbench's form shows
        them next to their fields, the CLI prints the first."""
        found = type_errors(self)     # JSON types first ("false" is not a bool, null is not a seed)
        if found:
            return found

        def bad(name: str, value: Any, allowed: str) -> None:
            found.setdefault(name, f"--{name} {_short(value)} is invalid: it must be {allowed}")

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

        def config_rule(name: str, config_field: str, value: Any) -> None:
            """A value that becomes a config field: the config's own rule (one bound per quantity)."""
            if value is not None and field_error(config_field, value):
                bad(name, value, FIELD_RULES[config_field][1])

        choice("preset", self.preset, PRESETS)
        choice("student_size", self.student_size, STUDENT_SIZES, optional=True)
        choice("device", self.device, DEVICES)
        choice("embedder", self.embedder, EMBEDDERS)
        choice("cluster_batches", self.cluster_batches, CLUSTER_BATCHES)
        config_rule("trust_region_mode", "trust_region_mode", self.trust_region_mode)   # the config's one rule
        from ..schema import optimizer_combination_error, resolved_schedule   # the menu's one rule for what combines
        menu = optimizer_combination_error(self.optimizer or "adamw", resolved_schedule(self.schedule, self.hybrid),
                                           self.hybrid, self.warmup_steps,
                                           self.max_steps if isinstance(self.max_steps, int) else None)
        if menu:
            found.setdefault(menu.split()[0].lstrip("-"), menu)
        choice("export", self.export, EXPORT_FORMATS, optional=True)
        config_rule("max_steps", "max_steps", self.max_steps)
        int_in("epochs", self.epochs, 1, MAX_EPOCHS)
        int_in("steps_per_epoch", self.steps_per_epoch, 1, MAX_STEPS)
        per_epoch = self.steps_per_epoch or (PRESETS[self.preset].steps_per_epoch if self.preset in PRESETS else None)
        if self.max_steps is None and not found.keys() & {"epochs", "steps_per_epoch"} and per_epoch \
                and self.epochs * per_epoch > MAX_STEPS:       # the length, known before any data is read
            found["epochs"] = (f"--epochs {self.epochs} × {per_epoch} steps per epoch = {self.epochs * per_epoch:,} "
                               f"steps is invalid: at most {MAX_STEPS:,} steps; use --max_steps or fewer --epochs")
        config_rule("batch_size", "batch_size", self.batch_size)
        int_in("seq_len", self.seq_len, MIN_SEQ_LEN, MAX_SEQ_LEN)
        config_rule("data_clusters", "data_clusters", self.data_clusters)
        config_rule("param_clusters", "parameter_clusters", self.param_clusters)
        int_in("top_k", self.top_k, 1, MAX_TOP_K)
        for name in ("eval_every", "eval_windows", "eval_every_steps", "stop_after_steps"):   # None: never
            int_in(name, getattr(self, name), 1, MAX_STEPS)
        int_in("train_windows", self.train_windows, 1, 2 ** 62)
        int_in("max_tokens", self.max_tokens, 1, 2 ** 62)
        config_rule("seed", "seed", self.seed)
        int_in("split_seed", self.split_seed, 0, MAX_SEED)
        if self.checkpoint_every_s is not None and not (_finite(self.checkpoint_every_s)
                                                        and self.checkpoint_every_s >= 0):
            bad("checkpoint_every_s", self.checkpoint_every_s, "a finite number of seconds ≥ 0")
        config_rule("lr", "base_learning_rate", self.lr)
        config_rule("weight_decay", "weight_decay", self.weight_decay)
        if not (_finite(self.alpha) and 0 <= self.alpha <= 1):
            bad("alpha", self.alpha, "a number in [0, 1] (weight of the hard-label cross-entropy)")
        if not (_finite(self.temperature) and self.temperature > 0):
            bad("temperature", self.temperature, "a finite number > 0")
        if self.ternary and not self.qat and self.bits is None:
            found["ternary"] = ("--ternary needs --qat: ternary (1.58-bit) weights are trained with quantization-"
                                "aware training; use --ternary --qat")
        if self.bits is not None:
            try:
                normalize_bits(self.bits)
            except ValueError as exc:
                found["bits"] = f"--{exc}"
        config_rule("precision_budget", "precision_budget", self.precision_budget)
        for name, problem in (("run_name", self.run_name is not None and run_name_problem(self.run_name)),
                              ("notes", notes_problem(self.notes)), ("tags", tags_problem(self.tags))):
            if problem:                  # the labels' bounds are schema's: the store and the app use them too
                found[name] = f"--{name} {problem}"
        choice("data_source", self.data_source, DATA_SOURCES, optional=True)
        if self.data_source is not None and self.data is not None:
            found["data_source"] = "--data and --data_source cannot be combined: pass one of them"
        if self.data is not None:
            problem = data_file_problem(self.data)
            if problem:
                found["data"] = f"--data {_short_path(self.data)}: {problem}"
        if self.config is not None and self.hybrid_config is None:    # embedded: the file is no longer needed
            problem = regular_file_problem(self.config, MAX_OPTIONS_FILE_BYTES)
            if problem:
                found["config"] = f"--config {_short_path(self.config)}: {problem}"
        if self.teacher is not None:
            problem = teacher_path_problem(self.teacher)
            if problem:
                found["teacher"] = f"--teacher {_short_path(self.teacher)}: {problem}"
        for name in ("run_id", "resume"):
            value = getattr(self, name)
            if value is not None and not _RUN_ID.fullmatch(value):
                bad(name, value, "a run id (letters, digits, '-', '_' and '.', at most 64)")
        if self.run_id is not None and self.resume is not None:
            found["run_id"] = "--run_id and --resume cannot be combined: --resume continues an existing run"
        if self.optimizer_factory is not None and not callable(self.optimizer_factory):
            found["optimizer_factory"] = "optimizer_factory must be callable: (model, options) -> optimizer"
        problem = report_to_error(self.report_to)      # an unknown back-end, or its extra not installed
        if problem:
            found["report_to"] = problem
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
        """THE options document: what `options.json` holds and what every door stores in runs.args["options"]
        (plain JSON values; the config embedded as its fields; Python-only hooks left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PYTHON_ONLY}
        out["tags"] = list(self.tags) if isinstance(self.tags, (list, tuple)) else self.tags
        if isinstance(self.hybrid_config, HybridTrainingConfig):
            out["hybrid_config"] = self.hybrid_config.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainOptions":
        """Options from `to_dict()` output (an options file, a stored run). Unknown keys are ignored here (stored
        runs of older versions); the CLI refuses them in an options file."""
        known = {f.name for f in fields(cls)} - PYTHON_ONLY
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "TrainOptions":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)


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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- checks at the edge (torch-free, quick, bounded: nothing here reads more than a file's head) --------------------
_TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text",
               "list[str]": "a list of text"}


def _type_ok(annotation: str, value: Any) -> bool | None:
    """Whether `value` has the field's declared type; None for a hook whose type is checked by its own rule."""
    optional = annotation.endswith(" | None")
    base = annotation[:-len(" | None")] if optional else annotation
    if base not in _TYPE_WORDS:
        return None
    if value is None:
        return optional
    if base == "bool":
        return isinstance(value, bool)
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base == "str":
        return isinstance(value, str)
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def type_errors(options: "TrainOptions") -> dict[str, str]:
    """Each field whose value has the wrong JSON type → its message: "false" is not a bool, null is not a seed."""
    found = {}
    for f in fields(options):
        value = getattr(options, f.name)
        if _type_ok(str(f.type), value) is False:
            optional = str(f.type).endswith(" | None")
            what = _TYPE_WORDS[str(f.type).removesuffix(" | None")] + (" or null" if optional else "")
            found[f.name] = f"--{f.name} {_short_json(value)} is invalid: it must be {what}, not {_json_type(value)}"
    if options.hybrid_config is not None and not isinstance(options.hybrid_config, HybridTrainingConfig):
        found["hybrid_config"] = "hybrid_config must be a HybridTrainingConfig (or a JSON object of its fields)"
    return found


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return {"list": "a list", "tuple": "a list", "dict": "an object"}.get(type(value).__name__, type(value).__name__)


def _short_json(value: Any, limit: int = 60) -> str:
    """The value as JSON spells it (null, true, "text"), cut to one short line."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def _short(value: Any, limit: int = 60) -> str:
    """repr(value), cut so that a 1 MB value still gives a one-line, readable message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def _short_path(path: Any) -> str:
    text = str(path)
    return text if len(text) <= 200 else text[:200] + "…"


def regular_file_problem(path: str | os.PathLike, max_bytes: int | None = None) -> str | None:
    """Why `path` cannot be read as an input file (None when it can): it must exist and be a regular file — a FIFO
    would block the reader, /dev/zero would never end — of at most `max_bytes`. Only stat(), nothing is read."""
    try:
        info = os.stat(Path(path).expanduser())
    except FileNotFoundError:
        return "file does not exist"
    except (OSError, ValueError) as exc:
        return f"cannot be used ({_reason(exc)})"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory; pass a file"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file (a FIFO, a device or a socket cannot be read as input)"
    if max_bytes is not None and info.st_size > max_bytes:
        return f"is {info.st_size:,} bytes; at most {max_bytes:,} are allowed"
    if not os.access(Path(path).expanduser(), os.R_OK):
        return "is not readable (permission denied)"
    return None


def binary_problem(path: str | os.PathLike) -> str | None:
    """A data file whose head holds NUL bytes is binary (text never has them): refused after reading 64 kB,
    instead of decoding a gigabyte of zeros."""
    try:
        with open(Path(path).expanduser(), "rb") as handle:
            head = handle.read(BINARY_SAMPLE_BYTES)
    except OSError as exc:
        return f"cannot be read ({_reason(exc)})"
    nuls = head.count(0)
    if head and nuls * 100 >= len(head):        # ≥ 1 % NUL bytes: not UTF-8 text
        return (f"looks binary ({nuls * 100 // len(head)} % NUL bytes in its first {len(head):,}); "
                "use UTF-8 text (.txt) or chat .jsonl")
    return None


def data_file_problem(path: str | os.PathLike) -> str | None:
    """Why a --data file cannot be used (None when it can): a regular .txt / .jsonl file that is not binary."""
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        return (f"has extension {suffix or '(none)'!r}; use .txt (plain text) or .jsonl (one chat per line)")
    return regular_file_problem(path) or binary_problem(path)


def teacher_path_problem(path: str | os.PathLike) -> str | None:
    """The --teacher rule, checked before any data preparation: a Hugging Face model folder with config.json and
    weights, or a regular .gguf file."""
    target = Path(path).expanduser()
    try:
        is_dir = target.is_dir()
    except OSError as exc:
        return f"cannot be used ({_reason(exc)})"
    if not is_dir:
        if not target.exists():
            return "does not exist; pass a local Hugging Face model directory or a .gguf file"
        if target.suffix.lower() != ".gguf":
            return "is not a .gguf file; pass a .gguf file or a Hugging Face model directory"
        return regular_file_problem(target)
    if not (target / "config.json").is_file():
        return "has no config.json; it must be a Hugging Face causal-LM directory (save_pretrained output)"
    if not any(target.glob("*.safetensors")) and not any(target.glob("*.bin")):
        return "has no weights (*.safetensors or *.bin)"
    return None


def read_json_file(path: str | os.PathLike, flag: str) -> Any:
    """A small JSON file (--options, --config), read only after the regular-file and size checks."""
    problem = regular_file_problem(path, MAX_OPTIONS_FILE_BYTES)
    if problem:
        raise OptionsError(f"{flag} {_short_path(path)}: {problem}")
    try:
        with open(Path(path).expanduser(), "rb") as handle:
            raw = handle.read(MAX_OPTIONS_FILE_BYTES + 1)
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise OptionsError(f"{flag} {_short_path(path)}: cannot be read as JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OptionsError(f"{flag} {_short_path(path)}: cannot be read as JSON ({reason[:200]})") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse for every entry point (distillation.py, export, chat): a bad flag is one clear line and exit 2,
    not the usage block. Here, torch-free and below them all, so no entry point imports another to get it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
