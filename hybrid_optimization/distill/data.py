"""Training data for distillation: read documents, render them with the teacher's chat template, split, pack.

Sources
- default: the PyPI package `chatterbot-corpus` (English YAML files of short conversations); each conversation
  alternates user / assistant turns.
- `.jsonl`: one chat per line, `{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}`.
- `.txt`: plain text; paragraphs (separated by blank lines) are the documents.

Pipeline (every step deterministic):
1. `load_documents(path)` -> list of Document (chat messages or plain text). Bad files raise `DataError` with one
   clear message (file, line, what is allowed).
2. `build_dataset(documents, tokenizer, seq_len, split_seed)`: drop exact duplicate documents (the chatterbot
   corpus holds 2,025 conversations but only 898 distinct ones — one is repeated 121 times — and repeats would
   dominate whole batches and data clusters), render chats with the tokenizer's chat template, tokenise, split documents into train / validation by a seeded shuffle of their *distinct contents* (identical
   documents always land in the same split, so duplicated chats cannot leak into validation), and pack each split's
   token stream into fixed windows of seq_len + 1 tokens (inputs = window[:-1], targets = window[1:]; consecutive
   windows share one token so every token is a target exactly once).
3. The student uses a reduced vocabulary: only the token ids the data uses (plus the tokenizer's special tokens).
   `Dataset.vocab` maps student ids -> teacher/tokenizer ids; the teacher's logits are restricted to it.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

ROLES = ("system", "user", "assistant")
DEFAULT_VAL_FRACTION = 0.1


class DataError(ValueError):
    """The training data cannot be used; the message names the file, the place and what is allowed."""


@dataclass
class Document:
    """One training document: a chat (list of {role, content}) or plain text."""
    messages: list[dict] | None = None
    text: str | None = None
    source: str = ""

    def key(self) -> str:
        payload = json.dumps(self.messages, sort_keys=True) if self.messages is not None else self.text
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


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

    documents = []
    for path in sorted(chatterbot_corpus_dir(language).glob("*.yml")):
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle) or {}
        for conversation in content.get("conversations") or []:
            if not isinstance(conversation, list) or len(conversation) < 1:
                continue
            turns = [str(turn).strip() for turn in conversation if isinstance(turn, (str, int, float))]
            if not turns or not all(turns):
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            documents.append(Document(messages=messages, source=path.name))
    return documents


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"data path {path} is a directory; pass a .txt or .jsonl file") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror}") from None
    if not raw.strip():
        raise DataError(f"data file {path} is empty; it needs text (.txt) or one chat per line (.jsonl)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"data file {path} is not valid UTF-8: undecodable byte 0x{raw[exc.start]:02x} at line "
                        f"{line} (byte offset {exc.start}); save it as UTF-8") from None


def load_txt(path: Path) -> list[Document]:
    text = _read_text(path).replace("\r\n", "\n")
    paragraphs = [p.strip() for p in text.split("\n\n")]
    return [Document(text=p, source=path.name) for p in paragraphs if p]


def load_jsonl(path: Path) -> list[Document]:
    documents = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); each line must be "
                            '{"messages": [{"role": ..., "content": ...}, ...]}') from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{where}: expected an object with a non-empty "messages" list, e.g. '
                            '{"messages": [{"role": "user", "content": "Hi"}]}')
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(f'{where}: message {i} must be an object with "role" and "content"')
            if message["role"] not in ROLES:
                raise DataError(f"{where}: message {i} has role {message['role']!r}; allowed roles: "
                                f"{', '.join(ROLES)}")
            if not isinstance(message["content"], str):
                raise DataError(f'{where}: message {i} "content" must be a string')
            clean.append({"role": message["role"], "content": message["content"]})
        documents.append(Document(messages=clean, source=f"{path.name}:{number}"))
    if not documents:
        raise DataError(f"data file {path} has no chats (only blank lines)")
    return documents


def load_documents(path: str | Path | None = None) -> list[Document]:
    """Documents from `path` (.txt or .jsonl) or, when None, the chatterbot corpus (English)."""
    if path is None:
        documents = load_chatterbot()
    else:
        path = Path(path).expanduser()
        suffix = path.suffix.lower()
        if suffix == ".txt":
            documents = load_txt(path)
        elif suffix == ".jsonl":
            documents = load_jsonl(path)
        else:
            raise DataError(f"data file {path} has extension {suffix or '(none)'!r}; use .txt (plain text) or "
                            ".jsonl (one chat per line)")
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

    @property
    def vocab_size(self) -> int:
        return int(self.vocab.numel())

    def to_teacher_ids(self, student_ids: torch.Tensor) -> torch.Tensor:
        return self.vocab[student_ids]


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
    n = (len(flat) - 1) // seq_len
    if n <= 0:
        return torch.empty(0, seq_len + 1, dtype=torch.int64)
    index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(flat[index])


def build_dataset(documents: list[Document], tokenizer, seq_len: int, split_seed: int = 0,
                  val_fraction: float = DEFAULT_VAL_FRACTION, source_name: str = "data",
                  dedupe: bool = True) -> Dataset:
    if seq_len < 2:
        raise DataError(f"seq_len must be ≥ 2, got {seq_len}")
    n_given = len(documents)
    if dedupe:
        seen: set[str] = set()
        documents = [doc for doc in documents if not (doc.key() in seen or seen.add(doc.key()))]   # first copies
    rendered = [render(doc, tokenizer) for doc in documents]
    encoded = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    counts = [len(ids) for ids in encoded]
    total = sum(counts)
    need = 2 * seq_len + 2
    if total < need:
        raise DataError(f"{source_name} has only {total} tokens after rendering; at least {need} are needed (one "
                        f"training and one validation window of seq_len + 1 = {seq_len + 1} tokens). Provide more "
                        "text or lower --seq_len")
    is_val = split_documents(documents, counts, seq_len, split_seed, val_fraction)
    train_ids = [ids for ids, v in zip(encoded, is_val) if not v]
    val_ids = [ids for ids, v in zip(encoded, is_val) if v]
    train_windows, val_windows = pack(train_ids, seq_len), pack(val_ids, seq_len)
    if len(train_windows) == 0 or len(val_windows) == 0:
        raise DataError(f"{source_name} has {total} tokens, too few to fill one training and one validation window "
                        f"of {seq_len + 1} tokens after splitting by document; provide more text or lower --seq_len")

    special_ids = sorted({i for i in tokenizer.all_special_ids if i is not None})
    used = torch.unique(torch.cat([train_windows.reshape(-1), val_windows.reshape(-1),
                                   torch.tensor(special_ids, dtype=torch.int64)]))
    to_student = torch.full((int(used.max()) + 1,), -1, dtype=torch.int64)
    to_student[used] = torch.arange(len(used))

    def make_split(windows: torch.Tensor, n_docs: int) -> Split:
        texts = tokenizer.batch_decode(windows.tolist(), skip_special_tokens=True)
        return Split(tokens=to_student[windows], texts=[t.strip() for t in texts], n_documents=n_docs)

    train = make_split(train_windows, len(train_ids))
    val = make_split(val_windows, len(val_ids))
    digest = hashlib.sha256()
    for tensor in (train_windows, val_windows, used):
        digest.update(tensor.numpy().tobytes())
    digest.update(str(seq_len).encode())
    return Dataset(train=train, val=val, vocab=used, seq_len=seq_len, fingerprint=digest.hexdigest(),
                   special_ids=special_ids, n_duplicates=n_given - len(documents))
