"""TrainOptions: everything one distillation run needs, shared by the CLI and the Python API.

The CLI (cli.py) parses flags into a TrainOptions; notebooks and benchmarks build one directly and call
`train(options)`. Fields left at None take the preset's value (student size, window length, epoch length) or the
HybridTrainingConfig's (learning rate, batch size, clusters, ...), so "explicit values win" works the same way for
flags, a --config file and Python.

Python-only hooks (not flags): `hybrid_config` (a HybridTrainingConfig, e.g. with use_* switches off for
ablations), `optimizer_factory`, `data_clustering` / `param_clustering` (ablate one kind of clustering),
`eval_every_steps`, `stop_after_steps`, `track`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError, HybridTrainingConfig
from ..featurize import EMBEDDERS
from .presets import PRESETS, get_preset
from .student import STUDENT_SIZES

DEVICES = ("auto", "cpu", "cuda", "mps")
CLUSTER_BATCHES = ("mixed", "single")
DATA_SOURCES = ("chatterbot", "python-docs")     # named data sources (distill/data.py DATA_SOURCES)
# Flags whose value may change when a run is resumed; everything else is taken from the stored run.
RESUME_OVERRIDABLE = ("epochs", "max_steps", "quiet", "device", "export", "save_metrics", "progress",
                      "checkpoint_every_s")


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
    eval_every: int = 1                  # epochs between evaluations (the last epoch is always evaluated)
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
    export: bool = False
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
    eval_every_steps: int | None = None  # also evaluate every N steps (benchmarks' fixed-interval validation)
    stop_after_steps: int | None = None  # behave as if a stop were requested after this many steps
    track: bool = True                   # write a run record to the run store
    argv: list[str] | None = None        # the command line, stored with the run
    train_windows: int | None = None     # set by the pipeline when it uses a subset of big data; kept on --resume

    # -- derived values -----------------------------------------------------------------------------------------
    @property
    def preset_obj(self):
        return get_preset(self.preset)

    def resolved_bits(self) -> float:
        """32 for a full-precision student, else the QAT bit-width."""
        if self.bits is not None:
            return float(self.bits)
        if not self.qat:
            return 32.0
        return 1.58 if self.ternary else 1.0

    def validate(self) -> None:
        """Raise OptionsError for the first bad value (before anything is started)."""
        def bad(name: str, value: Any, allowed: str) -> None:
            raise OptionsError(f"--{name} {value!r} is invalid: it must be {allowed}")

        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                bad(name, value, f"an integer ≥ {minimum}")

        if self.preset not in PRESETS:
            bad("preset", self.preset, "one of " + ", ".join(PRESETS))
        if self.student_size is not None and self.student_size not in STUDENT_SIZES:
            bad("student_size", self.student_size, "one of " + ", ".join(STUDENT_SIZES))
        if self.device not in DEVICES:
            bad("device", self.device, "one of " + ", ".join(DEVICES))
        if self.embedder not in EMBEDDERS:
            bad("embedder", self.embedder, "one of " + ", ".join(EMBEDDERS))
        if self.cluster_batches not in CLUSTER_BATCHES:
            bad("cluster_batches", self.cluster_batches, "one of " + ", ".join(CLUSTER_BATCHES))
        for name in ("epochs", "eval_every", "data_clusters", "param_clusters", "batch_size", "steps_per_epoch",
                     "max_steps", "top_k", "eval_windows", "eval_every_steps", "stop_after_steps", "train_windows"):
            positive_int(name, getattr(self, name))
        positive_int("seq_len", self.seq_len, 2)
        positive_int("max_tokens", self.max_tokens)
        positive_int("seed", self.seed, 0)
        positive_int("split_seed", self.split_seed, 0)
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
            raise OptionsError("--ternary needs --qat: ternary (1.58-bit) weights are trained with quantization-"
                               "aware training; use --ternary --qat")
        if self.bits is not None:
            from ..quantization import normalize_bits
            try:
                self.bits = normalize_bits(self.bits)
            except ValueError as exc:
                raise OptionsError(f"--bits: {exc}") from None
        if self.precision_budget is not None and not (_finite(self.precision_budget) and
                                                      1 <= self.precision_budget <= 32):
            bad("precision_budget", self.precision_budget, "average bits per weight in [1, 32]")
        if self.trust_region_mode is not None and self.trust_region_mode not in ("absolute", "relative"):
            bad("trust_region_mode", self.trust_region_mode, "absolute or relative")
        if self.data_source is not None and self.data_source not in DATA_SOURCES:
            bad("data_source", self.data_source, "one of " + ", ".join(DATA_SOURCES))
        if self.data_source is not None and self.data is not None:
            raise OptionsError("--data and --data_source cannot be combined: pass one of them")
        if self.data is not None and not Path(self.data).expanduser().exists():
            raise OptionsError(f"--data {self.data}: file does not exist")
        if self.config is not None and not Path(self.config).expanduser().is_file():
            raise OptionsError(f"--config {self.config}: file does not exist")
        if self.run_id is not None and self.resume is not None:
            raise OptionsError("--run_id and --resume cannot be combined: --resume continues an existing run")
        if self.optimizer_factory is not None and not callable(self.optimizer_factory):
            raise OptionsError("optimizer_factory must be callable: (model, options) -> optimizer")
        self.hybrid_training_config()      # config fields are validated by HybridTrainingConfig itself

    def hybrid_training_config(self, total_steps: int | None = None) -> HybridTrainingConfig:
        """The HybridTrainingConfig of this run: --config file (or `hybrid_config`), then explicit options."""
        if self.hybrid_config is not None:
            base = self.hybrid_config.to_dict()
        elif self.config is not None:
            try:
                base = HybridTrainingConfig.from_json(Path(self.config).expanduser().read_text()).to_dict()
            except ConfigError as exc:
                raise ConfigError(f"--config {self.config}: {exc}", field=exc.field) from None
        else:
            base = HybridTrainingConfig().to_dict()
        explicit = {
            "base_learning_rate": self.lr, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
            "data_clusters": self.data_clusters, "parameter_clusters": self.param_clusters,
            "trust_region_mode": self.trust_region_mode, "max_steps": total_steps,
        }
        if self.precision_budget is not None:
            explicit["precision_budget"] = self.precision_budget
        base.update({k: v for k, v in explicit.items() if v is not None})
        if self.seed is not None:
            base["seed"] = self.seed
        bits = self.resolved_bits()
        base["use_quantization"] = bits < 16
        if bits < 16:
            base["target_bits"] = bits
        if base.get("precision_budget") is not None and base["precision_budget"] > 8:
            base["precision_budget"] = None      # a budget above 8 bits never binds
        return HybridTrainingConfig.from_dict(base)

    # -- persistence (stored with the run so --resume rebuilds the same options) ------------------------------
    def to_dict(self) -> dict[str, Any]:
        skip = {"hybrid_config", "optimizer_factory"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "TrainOptions":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
