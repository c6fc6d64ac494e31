"""From a RunPlan to a TrainState: read the data, prepare it, build what trains. The ONE place that seeds and builds
the student, its quantization, the sampler and the optimizer — the pipeline (train.py) and the benchmark harness
(benchmarks/bench_hybrid.py) both call `build_state`.

    read_data(plan)              documents → tokenizer (and a user's / smollm2 teacher) → the windows; everything
                                 a user's input can break, before a run record exists
    prepare_data(plan, inputs)   the teacher's top-k logits (cached per dataset; the tiny teacher is trained here
                                 once), the evaluation subset, the data clusters
    build_state(plan, prepared)  seed → student → quantization → (DDP) → sampler → optimizer → TrainState, restored
                                 from a checkpoint when resuming

Each stage reports through `stage(name, done=None, total=None, ended=False)` (the run store's setup stages, drawn on
the Live page) and `say(line)`; both default to nothing / print, so a notebook can call these functions directly.
"""
from __future__ import annotations

import gc
import hashlib
import math
import os
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .. import distributed as dist_utils
from ..tracking.files import remove_stale_temps, temp_path
from ..clustering import ClusterBalancedSampler, KMeansClustering
from ..featurize import make_featurizer, project_2d
from ..precision import build_precision_plan
from ..quantization import CodeFlipTracker
from .checkpoint import FILENAME as CHECKPOINT_NAME
from .checkpoint import CheckpointError, load_checkpoint
from .data import Dataset, build_dataset, documents_fingerprint, load_documents, make_progress, preparation_estimate
from .evaluate import evaluate
from .loop import TrainData, TrainState, quantize_student, set_optimizer_mode
from .losses import distillation_loss
from .options import OptionsError
from .plan import RunPlan, RunResumeError
from .samplers import ShuffleBatchSampler
from .student import StudentConfig, StudentLM
from .teacher import EXPECTED_TOKENS_PER_S, cache_dir, load_teacher, smollm2_gguf_path, teacher_topk_cache
from .tiny import tiny_teacher_dir, tiny_tokenizer

Say = Callable[[str], None]

SAMPLE_ROWS_MAX = 5000          # samples stored for the cluster plot


def _no_stage(name: str, done: float | None = None, total: float | None = None, ended: bool = False) -> None:
    pass


@dataclass
class Inputs:
    """What `read_data` read and checked: the windows, their tokenizer, and the teacher when it is given (None:
    the tiny preset's, trained in prepare_data)."""
    dataset: Dataset
    tokenizer: Any
    teacher: Any = None

    def student_config(self, plan: RunPlan) -> StudentConfig:
        return StudentConfig.from_size(plan.student_size, self.dataset.vocab_size, plan.seq_len)

    def fingerprint(self, plan: RunPlan) -> dict:
        """What a checkpoint must match to be resumed into this run (plus its run id and options hash)."""
        return {"dataset": self.dataset.fingerprint, "student": self.student_config(plan).to_dict(),
                "hybrid": bool(plan.options.hybrid), "bits": float(plan.bits), "batch_size": int(plan.batch_size),
                "seed": int(plan.config.seed)}


@dataclass
class Prepared:
    """The data a TrainState is built from (the benchmark harness fills one from its own cached preparation)."""
    dataset: Dataset
    logits: Any                         # TeacherLogits: train/val top-k values and indices
    eval_index: torch.Tensor            # the validation windows each evaluation uses
    train_clusters: np.ndarray          # data-cluster label of every training window
    val_clusters: torch.Tensor
    student_config: StudentConfig
    teacher_description: str = ""
    teacher_directory: Any = None
    clustering_seconds: float = 0.0
    samples: dict | None = None         # 2-D projections and features of the clustered texts (for the store)
    fingerprint: dict = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return int(self.train_clusters.max()) + 1

    @property
    def teacher_val_loss(self) -> float | None:
        """The teacher's own held-out cross-entropy on exactly the windows every evaluation of the student uses
        (`eval_index`): the reference line under the student's val_loss. None when the logits carry no val_ce."""
        val_loss = getattr(self.logits, "val_loss", None)
        return val_loss(self.eval_index) if val_loss is not None else None


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


# -- read ---------------------------------------------------------------------------------------------------------
def read_data(plan: RunPlan, ctx: dist_utils.DistContext | None = None, say: Say = print, show_bars: bool = False,
              stage: Callable = _no_stage) -> Inputs:
    """The documents, the tokenizer (a user's / smollm2 teacher is opened here), the train/validation windows."""
    opts, preset, ctx = plan.options, plan.preset, ctx or dist_utils.DistContext()
    if ctx.enabled and plan.batch_size % ctx.world_size:
        raise OptionsError(f"--batch_size {plan.batch_size} must be divisible by the number of processes "
                           f"({ctx.world_size}): every rank takes an equal share of each batch")
    stage("data")
    documents = load_documents(opts.data, source=opts.data_source)
    n_chars = sum(doc.n_chars() for doc in documents)
    seconds, line = preparation_estimate(n_chars, plan.seq_len, plan.train_windows, plan.eval_windows,
                                         EXPECTED_TOKENS_PER_S[plan.teacher_kind], opts.max_tokens)
    if n_chars > 1e6 or seconds > 60:
        say(f"Preparing {n_chars / 1e6:.1f} M characters of {plan.source_name}, estimated {line}"
            + ("; --max_tokens N or a smaller --max_steps prepares less" if seconds > 300 else ""))
    teacher = None
    with NodeFirst(ctx):
        if plan.teacher_kind == "tiny":                  # the teacher is trained in prepare_data
            tokenizer = tiny_tokenizer(documents, documents_fingerprint(documents), preset.tokenizer_vocab, log=say)
        else:
            stage("teacher")
            teacher = load_teacher(opts.teacher if opts.teacher is not None else smollm2_gguf_path(), log=say)
            tokenizer = teacher.tokenizer
    # Big data: only the windows this run draws get packed, decoded, clustered and a teacher forward pass.
    from .plan import SUBSET_MIN_WINDOWS
    dataset = build_dataset(
        documents, tokenizer, plan.seq_len, opts.split_seed, source_name=plan.source_name, max_tokens=opts.max_tokens,
        max_train_windows=plan.train_windows, max_val_windows=plan.eval_windows, keep_all_below=SUBSET_MIN_WINDOWS,
        progress=make_progress("tokenising", say, show_bars, "M characters", 1e6))
    stage("data", ended=True)
    say("Data: " + dataset.describe(plan.source_name))
    return Inputs(dataset, tokenizer, teacher)


def load_resume_checkpoint(plan: RunPlan, inputs: Inputs) -> dict:
    """The resumed run's checkpoint, refused when it belongs to another run, another configuration or another
    data set (CheckpointError naming what differs), or when the run has nothing left to do."""
    path = plan.resume_dir / CHECKPOINT_NAME
    payload = load_checkpoint(path, inputs.fingerprint(plan))
    stored = payload.get("fingerprint") or {}
    owner = stored.get("run_id")
    if owner is not None and owner != plan.options.resume:
        raise CheckpointError(f"checkpoint {path} belongs to run {owner}, not to run {plan.options.resume}: resume "
                              "refused (nothing was changed)")
    if stored.get("options_hash") is not None and stored["options_hash"] != plan.options_hash():
        theirs, ours = _flat(stored.get("options") or {}), _flat(plan.hashed_options())
        named = [f"{k} {theirs.get(k)!r} vs the run's {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
                 if theirs.get(k) != ours.get(k)] or ["its options hash"]
        raise CheckpointError(f"checkpoint {path} was written with other options ({'; '.join(named)[:400]}): "
                              "resume refused (nothing was changed)")
    done = int(payload["step"])
    if done >= plan.total_steps and not plan.options.export:
        raise RunResumeError(f"run {plan.options.resume} already completed {done} of {plan.total_steps} steps; "
                             "pass a larger --max_steps or --epochs to train it further")
    return payload


def _flat(values: dict, prefix: str = "") -> dict:
    """{"config": {"seed": 0}} -> {"config.seed": 0}: a differing option is named by its own name."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- prepare ------------------------------------------------------------------------------------------------------
def prepare_data(plan: RunPlan, inputs: Inputs, *, device: torch.device, ctx: dist_utils.DistContext | None = None,
                 checkpoint: dict | None = None, say: Say = print, stage: Callable = _no_stage) -> Prepared:
    """Teacher logits, evaluation subset and data clusters (a checkpoint's clusters when resuming)."""
    ctx, dataset, preset = ctx or dist_utils.DistContext(), inputs.dataset, plan.preset
    with NodeFirst(ctx):
        teacher = inputs.teacher
        if teacher is None:
            stage("teacher")
            folder = tiny_teacher_dir(inputs.tokenizer, dataset, hidden_size=preset.teacher_hidden,
                                      layers=preset.teacher_layers, steps=preset.teacher_steps, log=say,
                                      progress=lambda done, total: stage("teacher", done, total))
            teacher = load_teacher(folder, log=say, tokenizer=inputs.tokenizer)
        stage("teacher", ended=True)
        stage("teacher_logits")
        logits = teacher_topk_cache(teacher, dataset, k=plan.top_k, device=str(device),
                                    batch_size=preset.teacher_batch_size, log=say,
                                    progress=lambda done, total: stage("teacher_logits", done, total))
        stage("teacher_logits", ended=True)
    if teacher.release():            # the weights were loaded (the logits were computed, not read): return them
        return_freed_memory()        # to the OS; on a cache hit there is nothing to collect (a full gc costs 0.1-0.2 s)
    if logits.built_seconds == 0:
        say(f"teacher logits loaded from the cache ({logits.path.name})")
    # Evaluation subset: evenly spaced validation windows (the split is already random by document).
    n_val = len(dataset.val)
    cap = min(n_val, plan.eval_windows)
    eval_index = torch.from_numpy(np.unique(np.linspace(0, n_val - 1, cap).round().astype(np.int64)))
    # Data clustering (always computed: the hybrid samples by it; every run reports per-cluster losses).
    stage("clustering")
    started = time.perf_counter()
    if checkpoint is not None:
        clustering = {"train": checkpoint["clusters"]["train"].numpy(), "val": checkpoint["clusters"]["val"].numpy()}
    else:
        clustering = cluster_samples(dataset, plan) if ctx.is_main else None
        clustering = dist_utils.broadcast_object(clustering, ctx)
    stage("clustering", ended=True)
    return Prepared(
        dataset=dataset, logits=logits, eval_index=eval_index,
        train_clusters=np.asarray(clustering["train"], dtype=np.int64),
        val_clusters=torch.from_numpy(np.asarray(clustering["val"], dtype=np.int64)),
        student_config=inputs.student_config(plan), teacher_description=teacher.description,
        teacher_directory=teacher.directory, clustering_seconds=time.perf_counter() - started,
        samples=clustering if clustering.get("xy_train") is not None else None, fingerprint=inputs.fingerprint(plan))


CLUSTER_KEYS = ("train", "val", "xy_train", "xy_val", "features_train", "features_val")
CLUSTER_CACHE_VERSION = 1      # bump when the featurizer, K-means or the projection changes what they return


def cluster_samples(dataset: Dataset, plan: RunPlan) -> dict:
    """K-means labels of the training texts (and of the validation texts, by the same model), their 2-D
    projection and features (for the workbench's cluster plot). Cached by content (the texts, the embedder, the
    seed, the number of clusters), like the teacher's logits: every step of it is seeded, so a second run on the
    same data reads the arrays the first computed instead of refitting the featurizer and K-means (~3 CPU-s for a
    tiny run; far more with MiniLM embeddings)."""
    path = cache_dir() / "clusters" / f"{_clusters_key(dataset, plan)}.npz"
    try:
        with np.load(path, allow_pickle=False) as cached:
            return {key: cached[key] for key in CLUSTER_KEYS}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):   # absent, torn or foreign: computed again
        pass
    result = _fit_clusters(dataset, plan)
    partial = temp_path(path)                        # <key>.npz.tmp<pid>, renamed whole (as the run store's files)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent, depth=0)     # what writers killed before their rename left
        with open(partial, "wb") as sink:
            np.savez(sink, **result)
        os.replace(partial, path)                    # readers see the whole file or none (as the logits cache)
    except OSError:                                  # a read-only or full cache costs the next run the time, no more
        partial.unlink(missing_ok=True)              # (and leaves no half-written file behind)
    return result


def _clusters_key(dataset: Dataset, plan: RunPlan) -> str:
    digest = hashlib.sha256(repr((CLUSTER_CACHE_VERSION, plan.options.embedder, plan.config.seed,
                                  plan.config.data_clusters)).encode())
    for split in (dataset.train.texts, dataset.val.texts):
        digest.update(f"\x00{len(split)}".encode())
        for text in split:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\x1e")
    return digest.hexdigest()[:24]


def _fit_clusters(dataset: Dataset, plan: RunPlan) -> dict:
    cfg = plan.config
    featurizer = make_featurizer(plan.options.embedder, seed=cfg.seed, device="cpu")
    train_features = featurizer.fit_transform(dataset.train.texts)
    val_features = featurizer.transform(dataset.val.texts)
    kmeans = KMeansClustering(n_clusters=min(cfg.data_clusters, len(dataset.train.texts)),
                              random_state=cfg.seed).fit(train_features)
    return {"train": kmeans.labels_, "val": kmeans.predict(val_features),
            "xy_train": project_2d(train_features, seed=cfg.seed),
            "xy_val": project_2d(val_features, seed=cfg.seed, fit_on=train_features),
            "features_train": train_features, "features_val": val_features}


def sample_rows(prepared: Prepared, seq_len: int, max_rows: int = SAMPLE_ROWS_MAX) -> list[dict]:
    """The clustered texts for the store (at most `max_rows` per split): label, 2-D position, text, and features
    (the workbench computes a t-SNE projection from them on demand)."""
    rows, samples = [], prepared.samples
    for split, texts in (("train", prepared.dataset.train.texts), ("val", prepared.dataset.val.texts)):
        labels, xy, features = (samples[key] for key in (split, f"xy_{split}", f"features_{split}"))
        step = max(1, math.ceil(len(texts) / max_rows))
        for i in range(0, len(texts), step):
            rows.append({"idx": i, "split": split, "cluster": int(labels[i]), "x": float(xy[i, 0]),
                         "y": float(xy[i, 1]), "text": texts[i][:600], "n_tokens": seq_len, "features": features[i]})
    return rows


# -- build --------------------------------------------------------------------------------------------------------
def build_state(plan: RunPlan, prepared: Prepared, *, device: torch.device | str = "cpu",
                ctx: dist_utils.DistContext | None = None, checkpoint: dict | None = None,
                run_id: str | None = None) -> TrainState:
    """Seed, then the student (quantized uniformly at the target bits; the precision plan may change them later),
    the sampler (cluster-balanced for the hybrid, shuffled otherwise), the optimizer, and the TrainState."""
    ctx, device, cfg, opts = ctx or dist_utils.DistContext(), torch.device(device), plan.config, plan.options
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    student = StudentLM(prepared.student_config).to(device)
    if plan.bits < 16:
        quantize_student(student, plan.bits, cfg.quantizer_scale)
    forward = None
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel
        forward = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if plan.data_clustering:
        sampler = ClusterBalancedSampler(prepared.train_clusters, plan.batch_size, max_repeats=cfg.max_sample_repeats,
                                         seed=cfg.seed, mixed=opts.cluster_batches == "mixed")
    else:
        sampler = ShuffleBatchSampler(len(prepared.dataset.train), plan.batch_size, seed=cfg.seed)
    optimizer, scheduler = make_optimizer(plan, student, prepared.n_clusters)
    set_optimizer_mode(optimizer, "train")
    fingerprint = {**prepared.fingerprint, "run_id": run_id, "options_hash": plan.options_hash(),
                   "options": plan.hashed_options()} if run_id is not None else dict(prepared.fingerprint)
    logits = prepared.logits
    state = TrainState(
        model=student, optimizer=optimizer, sampler=sampler, scheduler=scheduler, forward=forward,
        data=TrainData(prepared.dataset.train.tokens, logits.train_values, logits.train_indices),
        total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch, alpha=opts.alpha,
        temperature=opts.temperature, device=device, ctx=ctx,
        batch_clusters=plan.data_clustering and opts.cluster_batches == "single",
        quantizer_scale=cfg.quantizer_scale, fingerprint=fingerprint,
        flip_tracker=CodeFlipTracker() if plan.bits < 16 else None,
        clusters={"train": torch.from_numpy(prepared.train_clusters), "val": prepared.val_clusters.clone()})
    if checkpoint is not None:
        try:
            state.load_state_dict(checkpoint)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint of run {opts.resume} does not fit this run: "
                                  f"{str(exc).splitlines()[0][:300]}") from None
    return state


def make_optimizer(plan: RunPlan, model: torch.nn.Module, n_clusters: int):
    """(optimizer, lr_scheduler or None): an `optimizer_factory`'s, else the menu's (optimizers.build_optimizer:
    --optimizer, --schedule, --warmup_steps, --hybrid over the adamw / sgd / muon base)."""
    from ..optimizers import PRODIGY_DEFAULT_LR, build_optimizer
    opts, cfg = plan.options, plan.config
    if opts.optimizer_factory is not None:
        made = opts.optimizer_factory(model, opts)
        return made if isinstance(made, tuple) else (made, None)
    name = opts.optimizer or (cfg.base_optimizer if opts.hybrid else "adamw")
    lr = cfg.base_learning_rate
    if name == "prodigy" and opts.lr is None:      # LR-free: its own estimate × 1.0 unless --lr says otherwise
        lr = PRODIGY_DEFAULT_LR
    return build_optimizer(model, optimizer=name, schedule=plan.schedule, lr=lr, warmup_steps=plan.warmup_steps,
                           total_steps=plan.total_steps, weight_decay=cfg.weight_decay,
                           hybrid=cfg if opts.hybrid else None,
                           n_clusters=n_clusters if opts.hybrid and plan.data_clustering else None)


def make_precision_plan(plan: RunPlan, state: TrainState):
    """Parameter clustering → a PrecisionPlan for the student (the pipeline's and the benchmark's one recipe).
    Sensitivities come from one fixed batch of ≤ 8 training windows: enough to rank layers, and the Hutchinson
    trace's double backward is costly."""
    cfg, data, device = plan.config, state.data, state.device
    rows = np.random.default_rng(cfg.seed + 1).permutation(len(data.tokens))[:min(8, plan.batch_size)]
    batches = [torch.from_numpy(np.sort(rows))]

    def loss_fn(model, index):
        batch = data.tokens[index].to(device)
        return distillation_loss(model(batch[:, :-1]), batch[:, 1:], data.values[index].to(device),
                                 data.indices[index].to(device), state.alpha, state.temperature)[0]

    budget = cfg.precision_budget if cfg.precision_budget is not None else plan.bits
    return build_precision_plan(state.model, loss_fn, batches, n_clusters=cfg.parameter_clusters, budget=budget,
                                precisions=plan.precision_ladder, hutchinson_samples=4, seed=cfg.seed)


def validation(prepared: Prepared, device: torch.device | str = "cpu") -> Callable[[TrainState], dict]:
    """The evaluation function of the Evaluation callback: the fixed validation subset, per-cluster losses."""
    index, logits = prepared.eval_index, prepared.logits

    def run(state: TrainState) -> dict:
        return evaluate(state.model, prepared.dataset.val.tokens[index], logits.val_values[index],
                        logits.val_indices[index], prepared.val_clusters[index], device=device)
    return run


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


def return_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, so the 1.2 GiB of a
    released SmolLM2 teacher would still count in the process's memory during training)."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):     # not glibc (macOS, musl): nothing to do
        pass
