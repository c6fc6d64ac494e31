"""The medium workload (issue 10): a benchmark that can decide, on the 2-core CPU machine.

Why not the quick workload: 45 k tokens of chat data, a 0.6 M-parameter student and 100 steps — the training loss
fell far below the validation loss and the tuned cosine reference lost to a constant LR. Here:

- Data: real English text obtained offline at install time — the prose of the Python 3.11 documentation from the
  Debian package `python3.11-doc` (`apt-get install python3.11-doc`; PSF licence), read by the pipeline's own
  `--data_source python-docs` loader (hybrid_optimization.distill.data.load_python_docs: one page = one document,
  markup, code and tables removed), so the held-out pages are pages the student never saw. The first `max_tokens`
  tokens (pages in path order) are kept: ≥ 1 M training tokens for `medium`.
- Tokenizer and teacher: the tiny family of the pipeline, trained on this text and cached by content hash
  (hybrid_optimization.distill.tiny): a 1,024-token byte-level BPE and a LLaMA teacher trained once for about one
  epoch, larger than the quick mode's (hidden 256, 4 layers). Its top-k logits are cached once per dataset.
- Student: the pipeline's StudentLM with d_model 256, 3 layers, d_ff 688: 2.37 M parameters in Linear layers
  (ternary QAT quantizes these), embedding and head full precision as in BitNet b1.58.
- Evaluation: a fixed, evenly spaced subset of the held-out windows, the same for every run.

`--full --device cuda` uses the same recipe with all the pages, a 4-layer student and longer windows (Scale).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybrid_optimization.distill.data import build_dataset, documents_fingerprint, load_python_docs
from hybrid_optimization.distill.student import StudentConfig
from hybrid_optimization.distill.teacher import TeacherLogits, load_teacher, teacher_topk_cache
from hybrid_optimization.distill.tiny import tiny_teacher_dir, tiny_tokenizer

from .workload import Prepared


@dataclass(frozen=True)
class Scale:
    name: str
    max_tokens: int | None            # tokens of documentation text kept (pages in path order; None: all)
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    teacher_hidden: int
    teacher_layers: int
    teacher_heads: int
    teacher_steps: int
    top_k: int
    eval_windows: int
    vocab: int = 1024


SCALES = {
    "medium": Scale("medium", 1_350_000, 64, 256, 3, 4, 688, 256, 4, 4, 600, 16, 64),
    "full": Scale("full", None, 128, 256, 4, 4, 688, 384, 6, 6, 2000, 32, 256),
    # Issue 16's python-docs twin of the quick (chat) workload: the tiny preset's shapes (student d 256, 1 block,
    # d_ff 512; teacher hidden 128, 2 layers, 200 steps; top-32 logits; 64-token windows, 64 held-out windows),
    # on the first 400 k tokens of the documentation pages, so that one run costs what a quick run costs.
    "docs-quick": Scale("docs-quick", 400_000, 64, 256, 1, 4, 512, 128, 2, 4, 200, 32, 64),
}


def student_config(scale: Scale, vocab_size: int) -> StudentConfig:
    return StudentConfig(vocab_size=vocab_size, d_model=scale.d_model, n_layers=scale.n_layers,
                         n_heads=scale.n_heads, d_ff=scale.d_ff, max_seq_len=scale.seq_len)


def linear_params(config: StudentConfig) -> int:
    """Parameters in the student's quantizable Linear layers (attention + MLP projections; not embed/head)."""
    per_layer = 4 * config.d_model ** 2 + 3 * config.d_model * config.d_ff
    return config.n_layers * per_layer


def medium_dataset(s: Scale, split_seed: int = 0, log=lambda message: None):
    """(tokenizer, dataset) of a scale: the documentation pages, a BPE trained on them, packed windows."""
    documents = load_python_docs()
    tokenizer = tiny_tokenizer(documents, documents_fingerprint(documents), s.vocab, log=log)
    dataset = build_dataset(documents, tokenizer, s.seq_len, split_seed, source_name="python-docs",
                            max_tokens=s.max_tokens, max_val_windows=s.eval_windows)   # teacher logits: only those
    log(f"medium data: {len(documents)} pages, {dataset.train.n_tokens:,} training tokens in {len(dataset.train)} "
        f"windows, {dataset.val.n_tokens:,} held-out tokens, vocabulary {dataset.vocab_size}")
    return tokenizer, dataset


def placeholder_logits(dataset, k: int) -> TeacherLogits:
    """Random top-k "teacher" logits of the right shapes — for timing probes only (the cost of a student step does
    not depend on what the teacher says); never for a reported comparison."""
    g = torch.Generator().manual_seed(0)

    def part(split):
        n, length = split.tokens.shape[0], split.tokens.shape[1] - 1
        values = torch.randn(n, length, k, generator=g).sort(dim=-1, descending=True).values
        indices = torch.randint(0, dataset.vocab_size, (n, length, k), generator=g, dtype=torch.int32)
        return values, indices

    return TeacherLogits(*part(dataset.train), *part(dataset.val), path=Path("/dev/null"))


def prepare_medium(scale: str = "medium", data_clusters: int = 8, device: str = "cpu", split_seed: int = 0,
                   log=lambda message: None, placeholder_teacher: bool = False) -> Prepared:
    """Documents → tokenizer → dataset → teacher → cached top-k logits → a Prepared workload (built once, cached)."""
    start = time.perf_counter()
    s = SCALES[scale]
    tokenizer, dataset = medium_dataset(s, split_seed, log)
    if placeholder_teacher:
        logits = placeholder_logits(dataset, s.top_k)
    else:
        folder = tiny_teacher_dir(tokenizer, dataset, hidden_size=s.teacher_hidden, layers=s.teacher_layers,
                                  heads=s.teacher_heads, steps=s.teacher_steps, log=log)
        teacher = load_teacher(folder, log=log)
        logits = teacher_topk_cache(teacher, dataset, k=s.top_k, device=device, batch_size=64, log=log)
        teacher.release()
    n_val = len(dataset.val)
    eval_index = torch.from_numpy(np.unique(np.linspace(0, n_val - 1, min(n_val, s.eval_windows))
                                            .round().astype(np.int64)))
    return Prepared(preset=f"medium:{scale}" + (" (placeholder teacher)" if placeholder_teacher else ""), dataset=dataset, logits=logits, eval_index=eval_index,
                    student_config=student_config(s, dataset.vocab_size), data_clusters=data_clusters,
                    prepare_seconds=time.perf_counter() - start)
