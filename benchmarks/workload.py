"""A benchmark workload: the data, teacher logits and clusters that every run of a comparison shares, built once.

`train(options)` of the pipeline rebuilds all of this for every run (tokenizer, packed windows, the teacher's
cached top-k logits, TF-IDF + K-means clustering and its 2-D projection): seconds per run, which a 100-run
benchmark on 2 CPU cores cannot pay. So the benchmark prepares it once, with the pipeline's own public functions
and its caches, and `bench_hybrid.run` trains each job on it (the pipeline's `fit`). `tests/test_benchmarks_smoke.py` checks that this
reproduces `train(options)` exactly (same validation loss), so the shortcut measures the pipeline itself.

The data clustering (featurise + K-means, seeded by the run's seed as in the pipeline) is computed once per seed
and timed; its time is charged to every run that samples by cluster.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from hybrid_optimization.clustering import KMeansClustering
from hybrid_optimization.distill.data import Dataset, build_dataset, documents_fingerprint, load_documents
from hybrid_optimization.distill.presets import get_preset
from hybrid_optimization.distill.student import StudentConfig
from hybrid_optimization.distill.teacher import (TeacherLogits, load_teacher, smollm2_gguf_path,
                                                 teacher_topk_cache)
from hybrid_optimization.distill.tiny import tiny_teacher_dir, tiny_tokenizer
from hybrid_optimization.featurize import make_featurizer


@dataclass
class Prepared:
    preset: str
    dataset: Dataset
    logits: TeacherLogits
    eval_index: torch.Tensor          # the validation windows used by every evaluation (fixed, evenly spaced)
    student_config: StudentConfig
    data_clusters: int
    prepare_seconds: float            # everything here, including teacher training / logits when the cache was cold
    _clusters: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.dataset.seq_len

    def clusters(self, seed: int) -> Clusters:
        """The data clusters of a run with this seed (the pipeline seeds the featuriser and K-means with the run's
        seed), computed once per seed and timed."""
        if seed not in self._clusters:
            started, started_cpu = time.perf_counter(), time.process_time()
            featurizer = make_featurizer("tfidf", seed=seed, device="cpu")
            train_features = featurizer.fit_transform(self.dataset.train.texts)
            val_features = featurizer.transform(self.dataset.val.texts)
            kmeans = KMeansClustering(n_clusters=min(self.data_clusters, len(self.dataset.train)), random_state=seed)
            kmeans.fit(train_features)
            train = np.asarray(kmeans.labels_, dtype=np.int64)
            val = torch.from_numpy(np.asarray(kmeans.predict(val_features), dtype=np.int64))
            self._clusters[seed] = Clusters(train, val, int(train.max()) + 1, time.perf_counter() - started,
                                            time.process_time() - started_cpu)
        return self._clusters[seed]


@dataclass
class Clusters:
    train: np.ndarray                 # data cluster of each training window
    val: torch.Tensor                 # ... and of each validation window (clusters defined on training)
    n_clusters: int
    seconds: float                    # featurisation + K-means wall time (charged to runs that sample by cluster)
    cpu_seconds: float                # ... and its process CPU time


def prepare(preset: str = "tiny", data_clusters: int = 8, eval_windows: int | None = None,
            split_seed: int = 0, device: str = "cpu", student_size: str | None = None,
            log=lambda message: None) -> Prepared:
    """Build (or load from the pipeline's caches) everything the runs of one comparison share."""
    start = time.perf_counter()
    spec = get_preset(preset)
    documents = load_documents(None)                          # chatterbot-corpus, as the pipeline's default
    if spec.teacher == "smollm2":
        teacher = load_teacher(smollm2_gguf_path(), log=log)
        tokenizer = teacher.tokenizer
    else:
        tokenizer = tiny_tokenizer(documents, documents_fingerprint(documents), spec.tokenizer_vocab, log=log)
        teacher = None
    dataset = build_dataset(documents, tokenizer, spec.seq_len, split_seed, source_name="chatterbot-corpus")
    if teacher is None:
        folder = tiny_teacher_dir(tokenizer, dataset, hidden_size=spec.teacher_hidden, layers=spec.teacher_layers,
                                  steps=spec.teacher_steps, log=log)
        teacher = load_teacher(folder, log=log)
    logits = teacher_topk_cache(teacher, dataset, k=spec.top_k, device=device, batch_size=spec.teacher_batch_size,
                                log=log)
    teacher.release()
    n_val = len(dataset.val)
    cap = min(n_val, eval_windows or spec.eval_windows)
    eval_index = torch.from_numpy(np.unique(np.linspace(0, n_val - 1, cap).round().astype(np.int64)))

    config = StudentConfig.from_size(student_size or spec.student_size, dataset.vocab_size, spec.seq_len)
    return Prepared(preset=preset, dataset=dataset, logits=logits, eval_index=eval_index, student_config=config,
                    data_clusters=data_clusters, prepare_seconds=time.perf_counter() - start)
