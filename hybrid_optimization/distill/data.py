"""Training data for distillation: read documents, render them with the teacher's chat template, split, pack.

Sources
- default: the PyPI package `chatterbot-corpus` (English YAML files of short conversations); each conversation
  alternates user / assistant turns.
- `.jsonl`: one chat per line, `{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}`.
- `.txt`: plain text; paragraphs (separated by blank lines) are the documents.
- named sources (`--data_source NAME`, `DATA_SOURCES`): `chatterbot` (the default above) and `python-docs`, the
  prose of the Python documentation from the Debian package python3.11-doc (PSF licence; ~ 7 MB of English text,
  ≥ 2 M tokens: real text at a scale the chat corpus does not have, installed with
  `apt-get install python3.11-doc`, nothing downloaded at run time).

Pipeline (every step deterministic):
1. `load_documents(path)` -> list of Document (chat messages or plain text). Bad files raise `DataError` with one
   clear message (file, line, what is allowed); the file rules are data_files.py's (torch-free: the CLI checks a
   --data file with them before torch is imported).
2. `build_dataset(documents, tokenizer, seq_len, split_seed)`:
   - drop exact duplicate documents (the chatterbot corpus holds 2,025 conversations but only 898 distinct ones —
     one is repeated 121 times — and repeats would dominate whole batches and data clusters); messages say how many
     were dropped;
   - render chats with the tokenizer's chat template and tokenise in chunks of about 1 MB of text (a long document
     is cut into pieces just before a space, where a byte-level BPE tokenizer splits anyway), keeping only flat
     int32 token arrays, so a 50 MB file needs ~ 100 MB for its tokens; `max_tokens` keeps the first N tokens;
   - split into train / validation: by a seeded shuffle of the documents' *distinct contents* (identical documents
     always land in the same split, so duplicated chats cannot leak into validation). When that cannot work — one
     long document, or a few where validation would take more than 3 × its share — validation is the held-out
     *tail* of the token stream instead;
   - pack each split's token stream into fixed windows of seq_len + 1 tokens (inputs = window[:-1], targets =
     window[1:]; consecutive windows share one token so every token is a target exactly once). When the data hold
     more windows than a run will use (`max_train_windows` = steps × batch size, `max_val_windows` = the windows
     evaluated), only an evenly spaced subset is kept: the teacher then runs for exactly the windows the run uses.
3. The student uses a reduced vocabulary: only the token ids the kept windows use (plus the tokenizer's special
   tokens). `Dataset.vocab` maps student ids -> teacher/tokenizer ids; the teacher's logits are restricted to it.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from typing import Callable, Iterator

import numpy as np
import torch

from .data_files import ROLES, DataError, read_data_file  # noqa: F401 (re-exported: ROLES, DataError)

DEFAULT_VAL_FRACTION = 0.1
ENCODE_CHUNK_CHARS = 1 << 20      # text handed to the tokenizer per call: bounds the tokenizer's own memory
PIECE_CHARS = 1 << 16             # longer documents are tokenised in pieces of about this size
MAX_VAL_SHARE_FACTOR = 3.0        # document split only while validation holds ≤ 3 × val_fraction of the tokens
# Measured on the 2-core machine (loaded): the fast tokenizers encode ~1.3 M characters/s; English text gives ~3
# characters per token with the tiny preset's 1,024-token BPE and ~4 with SmolLM2's 49 k vocabulary.
ENCODE_CHARS_PER_S = 1.3e6
CHARS_PER_TOKEN = 3.0


@dataclass
class Document:
    """One training document: a chat (list of {role, content}) or plain text."""
    messages: list[dict] | None = None
    text: str | None = None
    source: str = ""
    _key: str | None = field(default=None, repr=False, compare=False)

    def key(self) -> str:
        """Content hash (computed once: dedupe, split and fingerprints all ask for it)."""
        if self._key is None:
            payload = json.dumps(self.messages, sort_keys=True) if self.messages is not None else self.text
            self._key = hashlib.sha256(payload.encode("utf-8")).hexdigest()
        return self._key

    def n_chars(self) -> int:
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        return len(self.text or "")


# -- reading ----------------------------------------------------------------------------------------------------
def chatterbot_corpus_dir(language: str = "english") -> Path:
    spec = find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default training data needs the PyPI package chatterbot-corpus "
                        "(pip install chatterbot-corpus==1.3.3), or pass --data PATH (.txt or chat .jsonl)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    if not folder.is_dir():
        raise DataError(f"chatterbot-corpus has no '{language}' folder at {folder}")
    return folder


def load_chatterbot(language: str = "english") -> list[Document]:
    """All conversations of the chatterbot corpus in one language, in file order. Turns alternate user/assistant.
    Entries that are not lists of strings (one stray string in trivia.yml) are skipped."""
    import yaml

    # libyaml's safe loader when PyYAML was built with it: the same documents, ~15x less CPU than the pure-Python
    # one (0.03 s instead of 0.45 s per load here; every tiny-preset run loads the corpus).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    documents = []
    for path in sorted(chatterbot_corpus_dir(language).glob("*.yml")):
        with open(path, encoding="utf-8") as handle:
            content = yaml.load(handle, Loader=loader) or {}
        for conversation in content.get("conversations") or []:
            if not isinstance(conversation, list) or len(conversation) < 1:
                continue
            turns = [str(turn).strip() for turn in conversation if isinstance(turn, (str, int, float))]
            if not turns or not all(turns):
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            documents.append(Document(messages=messages, source=path.name))
    return documents


PYTHON_DOCS_GLOB = "/usr/share/doc/python3*/html/_sources"
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)*:`!?~?([^`<]*?)\s*(?:<[^`>]*>)?`")      # :func:`len` -> len
_LITERAL = re.compile(r"``([^`]+)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_+")                                   # `text <url>`_ -> text


def python_docs_dir() -> Path:
    """The reST sources of the Python documentation shipped by Debian's python3.X-doc (the newest installed)."""
    folders = sorted(Path("/").glob(PYTHON_DOCS_GLOB.lstrip("/")))
    if not folders:
        raise DataError("--data_source python-docs needs the Debian package python3.11-doc "
                        "(apt-get install python3.11-doc); nothing is downloaded at run time")
    return folders[-1]


def _rst_prose(text: str) -> list[str]:
    """The prose paragraphs of a reST page, markup removed: no directives, comments, code blocks, tables or
    headings (the prose indented under a directive, e.g. a function's description, is kept); roles, literals and
    links reduced to their text; each paragraph on one line."""
    paragraphs = []
    code_indent = None              # inside a literal block (after "::" or a code directive) indented beyond this
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        if code_indent is not None:
            if indent > code_indent:
                continue
            code_indent = None
        first = lines[0].strip()
        if block.rstrip().endswith("::") or re.match(r"\.\. (code-block|doctest|testcode|testoutput|productionlist|"
                                                     r"sourcecode|highlight|literalinclude)", first):
            code_indent = indent
        if first.startswith(("..", "|", "+", "=", "*", "-", ">>>", ":")) or \
                any(len(line) - len(line.lstrip()) != indent for line in lines):
            continue                                                   # directives, lists, tables, options
        if len(lines) >= 2 and re.fullmatch(r"([=\-~^\"'`#*+])\1{2,}", lines[1].strip()):
            continue                                                   # a heading
        prose = " ".join(line.strip() for line in lines)
        prose = _LINK.sub(r"\1", _ROLE.sub(r"\1", prose))
        prose = _LITERAL.sub(r"\1", prose).replace("::", ":")
        if len(prose) >= 40 and prose[0].isalpha():
            paragraphs.append(prose)
    return paragraphs


def load_python_docs() -> list[Document]:
    """One document per page of the Python documentation (its prose paragraphs), in path order."""
    folder = python_docs_dir()
    documents = []
    for path in sorted(folder.rglob("*.rst.txt")):
        paragraphs = _rst_prose(path.read_text(encoding="utf-8", errors="replace"))
        if paragraphs:
            documents.append(Document(text="\n\n".join(paragraphs), source=str(path.relative_to(folder))))
    return documents


# Keyed by schema.DATA_SOURCES (the CLI's choices); tests/test_schema.py checks the two agree.
DATA_SOURCES = {"chatterbot": load_chatterbot, "python-docs": load_python_docs}


def load_documents(path: str | Path | None = None, source: str | None = None) -> list[Document]:
    """Documents from `path` (.txt or .jsonl), a named source (DATA_SOURCES), or else the chatterbot corpus."""
    if source is not None:
        if source not in DATA_SOURCES:
            raise DataError(f"data source {source!r} is unknown; choose one of {', '.join(DATA_SOURCES)}")
        documents = DATA_SOURCES[source]()
        path = source
    elif path is None:
        documents = load_chatterbot()
    else:
        path, read = read_data_file(path)          # the file's rules: data_files.py (torch-free, also the CLI's)
        documents = [Document(text=doc, source=path.name) if isinstance(doc, str) else
                     Document(messages=doc[1], source=f"{path.name}:{doc[0]}") for doc in read]
    if not documents:
        raise DataError(f"no documents found in {path or 'chatterbot-corpus'}")
    return documents


def documents_fingerprint(documents: list[Document]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.key().encode())
    return digest.hexdigest()


# -- rendering, splitting and packing ---------------------------------------------------------------------------
def render(document: Document, tokenizer) -> str:
    """A chat rendered with the tokenizer's chat template; plain text followed by the end-of-sequence token."""
    if document.messages is not None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(document.messages, tokenize=False)
        # No template (a base model): a neutral "role: content" rendering.
        return "".join(f"{m['role']}: {m['content']}\n" for m in document.messages) + (tokenizer.eos_token or "")
    return document.text + (tokenizer.eos_token or "\n")


@dataclass
class Split:
    """Packed windows of one split: `tokens` [n, seq_len + 1] in student ids, plus per-window text for display
    and clustering."""
    tokens: torch.Tensor
    texts: list[str]
    n_documents: int
    n_available: int = 0             # windows the split holds before a subset was taken (0: not recorded)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.tokens[:, 1:].numel())


@dataclass
class Dataset:
    train: Split
    val: Split
    vocab: torch.Tensor              # student id -> tokenizer id (int64, sorted)
    seq_len: int
    fingerprint: str                 # content hash of the packed token windows and the vocabulary
    special_ids: list[int] = field(default_factory=list)
    n_duplicates: int = 0            # exact duplicate documents dropped before the split
    n_documents_given: int = 0       # documents read, duplicates included
    n_documents: int = 0             # distinct documents used (after dedupe and max_tokens)
    n_tokens_total: int = 0          # tokens after dedupe (and max_tokens), before the split
    split_mode: str = "documents"    # "documents" (seeded shuffle of distinct documents) or "tail"
    truncated: bool = False          # max_tokens cut the data

    @property
    def vocab_size(self) -> int:
        return int(self.vocab.numel())

    def describe(self, source_name: str) -> str:
        """One line for the user: what was kept, what was dropped, how it was split."""
        parts = [f"{source_name}: {self.n_tokens_total:,} tokens from {self.n_documents:,} distinct "
                 f"document{'s' if self.n_documents != 1 else ''}"]
        if self.n_duplicates:
            parts.append(f"{self.n_duplicates:,} of {self.n_documents_given:,} documents were exact duplicates and "
                         "were dropped")
        if self.truncated:
            parts.append("cut at --max_tokens")
        split = "validation = the held-out last part of the text" if self.split_mode == "tail" else \
            "split by document"
        windows = []
        for name, part in (("training", self.train), ("validation", self.val)):
            used = f"{len(part):,}"
            if part.n_available > len(part):
                used += f" of {part.n_available:,} (the ones this run uses)"
            windows.append(f"{used} {name}")
        parts.append(f"{split}: {' / '.join(windows)} windows of {self.seq_len} tokens")
        return "; ".join(parts)


def split_documents(documents: list[Document], token_counts: list[int], seq_len: int, split_seed: int,
                    val_fraction: float = DEFAULT_VAL_FRACTION) -> list[bool]:
    """Which documents go to validation. Distinct contents are shuffled with `split_seed`; validation takes them
    until it holds `val_fraction` of the documents and at least one full window, while training keeps ≥ 1 window."""
    keys = [doc.key() for doc in documents]
    distinct = sorted(set(keys))
    random.Random(split_seed).shuffle(distinct)
    count_of = {}
    tokens_of = {}
    for key, n in zip(keys, token_counts):
        count_of[key] = count_of.get(key, 0) + 1
        tokens_of[key] = tokens_of.get(key, 0) + n
    total_tokens = sum(token_counts)
    target_docs = max(1, round(val_fraction * len(documents)))
    val_keys, val_docs, val_tokens = set(), 0, 0
    for key in distinct:
        if val_docs >= target_docs and val_tokens >= seq_len + 1:
            break
        if total_tokens - val_tokens - tokens_of[key] < seq_len + 1:
            continue                     # training must keep at least one window
        val_keys.add(key)
        val_docs += count_of[key]
        val_tokens += tokens_of[key]
    return [key in val_keys for key in keys]


def pack(streams: list[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate token lists and cut windows of seq_len + 1 tokens with stride seq_len (the tail is dropped)."""
    flat = np.fromiter((t for s in streams for t in s), dtype=np.int64)
    return torch.from_numpy(windows_of(flat, seq_len))


def n_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens (stride seq_len) that `n_tokens` tokens fill."""
    return max(0, (n_tokens - 1) // seq_len)


def evenly_spaced(n: int, m: int | None) -> np.ndarray:
    """≤ `m` distinct indices spread evenly over range(n) (all of them when m is None or ≥ n); the same rule as the
    trainer's evaluation subset, so a validation split cut to the evaluated windows evaluates the same windows."""
    if m is None or m >= n:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, m).round().astype(np.int64))


def windows_of(flat: np.ndarray, seq_len: int, index: np.ndarray | None = None) -> np.ndarray:
    """Windows number `index` (default: all) of a flat token array, as int64 [len(index), seq_len + 1]. Only the
    chosen windows are materialised, so a subset of a 15 M-token stream costs what the subset costs."""
    if index is None:
        index = np.arange(n_windows(len(flat), seq_len), dtype=np.int64)
    if len(index) == 0:
        return np.empty((0, seq_len + 1), dtype=np.int64)
    positions = index[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return flat[positions].astype(np.int64)


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most ~`size` characters, each cut just before a single space between two non-space
    characters: a byte-level BPE pre-tokenizer starts a new word there anyway, so the token ids of the pieces are
    those of the whole text (a piece is cut hard only when no such space exists)."""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind(" ", start + size // 2, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1:cut + 2].isspace()):
            cut = text.rfind(" ", start + size // 2, cut)
        if cut <= start:
            cut = end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """texts -> token ids without added special tokens. Fast tokenizers go straight to the Rust backend without
    offsets (~1.5× faster than `tokenizer(texts)`); the shortcut is checked against the tokenizer on first use."""
    def slow(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if encode is None:
        return slow
    checked = []

    def fast(texts: list[str]) -> list[list[int]]:
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
        if not checked:
            checked.append(True)
            probe = texts[:4]
            if slow(probe) != ids[:len(probe)]:
                checked.append(False)
        if len(checked) > 1:            # the backend disagrees with the tokenizer: always use the tokenizer
            return slow(texts)
        return ids

    return fast


def encode_documents(documents: list[Document], tokenizer, max_tokens: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Render and tokenise `documents` in chunks of ~ENCODE_CHUNK_CHARS characters.

    Returns (flat int32 token ids of all documents in order, int64 token count per document, whether max_tokens
    cut the data). With `max_tokens` only the first max_tokens tokens are kept (documents after them count 0)
    and tokenising stops there.
    `progress(characters done, characters in all)` is called after every chunk."""
    encode = _encoder(tokenizer)
    total_chars = sum(doc.n_chars() for doc in documents)
    counts = np.zeros(len(documents), dtype=np.int64)
    arrays: list[np.ndarray] = []
    batch: list[str] = []
    owners: list[int] = []
    state = {"chars": 0, "tokens": 0, "done_chars": 0}

    def flush() -> None:
        for owner, ids in zip(owners, encode(batch)):
            counts[owner] += len(ids)
            state["tokens"] += len(ids)
            arrays.append(np.asarray(ids, dtype=np.int32))
        batch.clear()
        owners.clear()
        state["done_chars"] += state["chars"]
        state["chars"] = 0
        if progress is not None:
            progress(min(state["done_chars"], total_chars), total_chars)

    stopped_early = False
    for i, doc in enumerate(documents):
        for piece in text_pieces(render(doc, tokenizer)):
            batch.append(piece)
            owners.append(i)
            state["chars"] += len(piece)
            if state["chars"] >= ENCODE_CHUNK_CHARS:
                flush()
        if max_tokens is not None and state["tokens"] >= max_tokens and i < len(documents) - 1:
            stopped_early = True
            break
    if batch:
        flush()
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int32)
    truncated = stopped_early
    if max_tokens is not None and len(flat) > max_tokens:
        truncated = True
        flat = flat[:max_tokens]
        ends = np.cumsum(counts)
        counts = np.clip(max_tokens - (ends - counts), 0, counts)
    return flat, counts, truncated


def preparation_estimate(n_chars: int, seq_len: int, train_windows: int | None, val_windows: int,
                         teacher_tokens_per_s: float, max_tokens: int | None = None,
                         chars_per_token: float = CHARS_PER_TOKEN) -> tuple[float, str]:
    """(seconds, one line) a data preparation is expected to take: tokenising the text, then the teacher's logits
    for the windows the run uses (`train_windows`, None = every window). Rough (±50 %) but stated up front."""
    tokens = n_chars / chars_per_token
    if max_tokens is not None:
        tokens = min(tokens, max_tokens)
    encode_s = min(n_chars, tokens * chars_per_token) / ENCODE_CHARS_PER_S
    available = max(1, int(tokens * (1 - DEFAULT_VAL_FRACTION)) // seq_len)
    used = available if train_windows is None else min(train_windows, available)
    teacher_tokens = (used + val_windows) * seq_len
    teacher_s = teacher_tokens / teacher_tokens_per_s
    seconds = encode_s + teacher_s
    line = (f"~{_duration(seconds)}: tokenising ≈ {tokens / 1e6:.1f} M tokens (~{_duration(encode_s)}), teacher "
            f"logits for {used + val_windows:,} windows = {teacher_tokens / 1e6:.2f} M tokens at ~"
            f"{teacher_tokens_per_s:,.0f} tokens/s (~{_duration(teacher_s)})")
    return seconds, line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _duplicates_note(n_duplicates: int, n_given: int) -> str:
    if not n_duplicates:
        return ""
    return (f" ({n_duplicates:,} of its {n_given:,} documents were exact duplicates of another and were dropped; "
            "only distinct documents are used)")


def build_dataset(documents: list[Document], tokenizer, seq_len: int, split_seed: int = 0,
                  val_fraction: float = DEFAULT_VAL_FRACTION, source_name: str = "data",
                  dedupe: bool = True, max_tokens: int | None = None, max_train_windows: int | None = None,
                  max_val_windows: int | None = None, keep_all_below: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> Dataset:
    """Documents -> packed, split windows (see the module docstring). `max_tokens`: keep the first N tokens;
    `max_train_windows` / `max_val_windows`: keep an evenly spaced subset of that many windows of a split that
    holds more than max(that, keep_all_below) windows."""
    if seq_len < 2:
        raise DataError(f"seq_len must be ≥ 2, got {seq_len}")
    n_given = len(documents)
    if dedupe:
        seen: set[str] = set()
        documents = [doc for doc in documents if not (doc.key() in seen or seen.add(doc.key()))]   # first copies
    n_duplicates = n_given - len(documents)
    flat, counts, truncated = encode_documents(documents, tokenizer, max_tokens=max_tokens, progress=progress)
    if truncated:                                   # the documents after the cut are not used
        kept = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 0
        documents, counts = documents[:kept], counts[:kept]
    total = int(counts.sum())
    need = 2 * seq_len + 2
    if total < need:
        raise DataError(f"{source_name} has only {total} tokens after rendering"
                        f"{_duplicates_note(n_duplicates, n_given)}; at least {need} are needed (one training and "
                        f"one validation window of seq_len + 1 = {seq_len + 1} tokens). Provide more text or lower "
                        "--seq_len" + (" or raise --max_tokens" if max_tokens is not None else ""))

    # Split by document when that gives both splits a window and validation a fair share; else hold out the tail.
    is_val = np.asarray(split_documents(documents, counts.tolist(), seq_len, split_seed, val_fraction), dtype=bool)
    val_tokens = int(counts[is_val].sum())
    if n_windows(total - val_tokens, seq_len) >= 1 and n_windows(val_tokens, seq_len) >= 1 and \
            val_tokens <= MAX_VAL_SHARE_FACTOR * val_fraction * total:
        split_mode = "documents"
        token_is_val = np.repeat(is_val, counts)
        train_flat, val_flat = flat[~token_is_val], flat[token_is_val]
        n_val_docs = int(is_val.sum())
        n_train_docs = len(documents) - n_val_docs
    else:
        split_mode = "tail"
        cut = total - max(seq_len + 1, int(round(val_fraction * total)))
        train_flat, val_flat = flat[:cut], flat[cut:]
        ends = np.cumsum(counts)
        n_val_docs = int(np.count_nonzero(ends > cut))
        n_train_docs = int(np.count_nonzero(ends - counts < cut))
    del flat
    n_train_available, n_val_available = n_windows(len(train_flat), seq_len), n_windows(len(val_flat), seq_len)
    def subset(n: int, cap: int | None) -> np.ndarray:
        return evenly_spaced(n, None if cap is None or n <= max(cap, keep_all_below) else cap)

    train_windows = torch.from_numpy(windows_of(train_flat, seq_len, subset(n_train_available, max_train_windows)))
    val_windows = torch.from_numpy(windows_of(val_flat, seq_len, subset(n_val_available, max_val_windows)))
    del train_flat, val_flat

    special_ids = sorted({i for i in tokenizer.all_special_ids if i is not None})
    used = torch.unique(torch.cat([train_windows.reshape(-1), val_windows.reshape(-1),
                                   torch.tensor(special_ids, dtype=torch.int64)]))
    to_student = torch.full((int(used.max()) + 1,), -1, dtype=torch.int64)
    to_student[used] = torch.arange(len(used))

    def make_split(windows: torch.Tensor, n_docs: int, n_available: int) -> Split:
        texts = tokenizer.batch_decode(windows.tolist(), skip_special_tokens=True)
        return Split(tokens=to_student[windows], texts=[t.strip() for t in texts], n_documents=n_docs,
                     n_available=n_available)

    train = make_split(train_windows, n_train_docs, n_train_available)
    val = make_split(val_windows, n_val_docs, n_val_available)
    digest = hashlib.sha256()
    for tensor in (train_windows, val_windows, used):
        digest.update(tensor.numpy().tobytes())
    digest.update(str(seq_len).encode())
    return Dataset(train=train, val=val, vocab=used, seq_len=seq_len, fingerprint=digest.hexdigest(),
                   special_ids=special_ids, n_duplicates=n_duplicates, n_documents_given=n_given,
                   n_documents=len(documents), n_tokens_total=total, split_mode=split_mode, truncated=truncated)


def make_progress(description: str, say: Callable[[str], None], bar: bool, unit: str = "",
                  scale: float = 1.0) -> Callable[[int, int], None]:
    """A progress callback (done, total): a tqdm bar on stderr when `bar`, otherwise a line at every quarter.
    `scale` divides the counts for display (e.g. 1e6 for characters shown as M)."""
    state: dict = {"bar": None, "next": 0.25}

    def update(done: int, total: int) -> None:
        if bar:
            if state["bar"] is None:
                from tqdm.auto import tqdm
                state["bar"] = tqdm(total=round(total / scale, 1), desc=description, unit=unit, leave=False,
                                    dynamic_ncols=True, file=sys.stderr)
            state["bar"].n = round(done / scale, 1)
            state["bar"].refresh()
            if done >= total:
                state["bar"].close()
        elif total and (done / total >= state["next"] or done >= total):
            while state["next"] <= done / total:
                state["next"] += 0.25
            say(f"  {description}: {done / scale:,.{1 if scale > 1 else 0}f}/{total / scale:,.{1 if scale > 1 else 0}f}"
                f"{(' ' + unit) if unit else ''}")

    return update
