"""Data loading for distillation: chatterbot corpus, .txt, chat .jsonl, errors, split, packing, featurisers."""
import json
import os

import numpy as np
import pytest
import torch

from hybrid_optimization.distill.data import (DataError, build_dataset, load_chatterbot, load_documents,
                                              pack, split_documents)
from hybrid_optimization.distill.tiny import CHATML_TEMPLATE, tiny_tokenizer
from hybrid_optimization.featurize import MiniLMFeaturizer, TfidfSvdFeaturizer, project_2d


@pytest.fixture(scope="module")
def chats():
    return load_chatterbot()


@pytest.fixture(scope="module")
def tokenizer(chats):
    return tiny_tokenizer(chats, "test-chatterbot", vocab_size=512, log=lambda m: None)


def test_chatterbot_corpus_is_real_english_chat(chats):
    assert len(chats) > 1500                                # ~2,000 conversations in chatterbot-corpus 1.3.3
    roles = {m["role"] for doc in chats for m in doc.messages}
    assert roles == {"user", "assistant"}
    assert chats[0].messages[0]["role"] == "user"
    assert any("computer" in m["content"].lower() for doc in chats for m in doc.messages)


def test_render_uses_the_chat_template(chats, tokenizer):
    assert tokenizer.chat_template == CHATML_TEMPLATE
    text = tokenizer.apply_chat_template(chats[0].messages, tokenize=False)
    assert text.startswith("<|im_start|>user\n") and "<|im_end|>\n<|im_start|>assistant\n" in text


def test_txt_paragraphs_and_jsonl_chats(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("First paragraph.\nStill first.\n\n\nSecond paragraph.\n", encoding="utf-8")
    docs = load_documents(txt)
    assert [d.text for d in docs] == ["First paragraph.\nStill first.", "Second paragraph."]
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello!"}]}) + "\n\n")
    docs = load_documents(jsonl)
    assert len(docs) == 1 and docs[0].messages[1] == {"role": "assistant", "content": "Hello!"}


@pytest.mark.parametrize("name, content, expected", [
    ("empty.txt", b"  \n", "is empty"),
    ("bad.jsonl", b'{"messages": [{"role": "user", "content": "ok"}]}\n{"messages": [\n', "line 2: malformed JSON"),
    ("noroles.jsonl", b'{"messages": [{"role": "robot", "content": "x"}]}\n', "role 'robot'"),
    ("nomsg.jsonl", b'{"text": "x"}\n', 'non-empty "messages" list'),
    ("latin1.txt", "caf\u00e9 ok\nna\u00efve".encode("latin-1"), "not valid UTF-8: undecodable byte 0xe9 at line 1"),
    ("data.csv", b"a,b\n", "use .txt"),
])
def test_bad_data_files_give_one_clear_error(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_documents(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_too_little_text(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(tmp_path / "nope.txt")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Just a few words.\n\nAnd a few more.")
    with pytest.raises(DataError, match="at least .* are needed"):
        build_dataset(load_documents(tiny), tokenizer, seq_len=64)


def test_pack_makes_overlapping_windows_so_every_token_is_a_target_once():
    windows = pack([[0, 1, 2], [3, 4, 5, 6, 7]], seq_len=3)
    assert windows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6]]
    targets = windows[:, 1:].reshape(-1).tolist()
    assert targets == [1, 2, 3, 4, 5, 6]


def test_split_is_deterministic_by_seed_and_keeps_duplicates_together(chats):
    counts = [40] * len(chats)
    a = split_documents(chats, counts, 64, split_seed=0)
    assert a == split_documents(chats, counts, 64, split_seed=0)
    assert a != split_documents(chats, counts, 64, split_seed=1)
    assert 0.08 < np.mean(a) < 0.2
    side = {}
    for doc, is_val in zip(chats, a):        # tech_support.yml repeats chats: copies never straddle the split
        assert side.setdefault(doc.key(), is_val) == is_val


def test_dataset_vocabulary_is_reduced_and_maps_back(chats, tokenizer):
    ds = build_dataset(chats, tokenizer, seq_len=32, split_seed=0)
    assert ds.train.tokens.shape[1] == 33 and len(ds.val) > 0
    assert ds.vocab_size <= len(tokenizer)
    assert int(ds.train.tokens.max()) < ds.vocab_size
    assert torch.all(ds.vocab[:-1] < ds.vocab[1:])                  # sorted, unique
    text = tokenizer.decode(ds.vocab[ds.train.tokens[0]].tolist())               # student ids -> tokenizer ids
    assert "<|im_start|>" in text or "<|im_end|>" in text
    again = build_dataset(chats, tokenizer, seq_len=32, split_seed=0)
    assert again.fingerprint == ds.fingerprint
    assert build_dataset(chats, tokenizer, seq_len=32, split_seed=1).fingerprint != ds.fingerprint


def test_tfidf_featurizer_groups_by_topic():
    texts = ["my computer will not boot", "the computer screen is black", "reboot the computer",
             "what is your favourite food", "I like pizza and pasta food", "food recipes for dinner"]
    features = TfidfSvdFeaturizer(n_components=3).fit_transform(texts)
    assert features.shape == (6, 3)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    sim = features @ features.T
    assert sim[0, 1] > sim[0, 4] and sim[3, 4] > sim[3, 1]
    assert project_2d(features).shape == (6, 2)


def test_minilm_featurizer_runs_offline():
    features = MiniLMFeaturizer().fit_transform(["my laptop is broken", "my computer does not work",
                                                 "I love chocolate cake"])
    assert features.shape == (3, 384)
    sim = features @ features.T
    assert sim[0, 1] > sim[0, 2]


def test_exact_duplicate_documents_are_dropped_before_the_split(chats, tokenizer):
    keys = [doc.key() for doc in chats]
    assert len(set(keys)) < len(keys)                      # the corpus repeats conversations
    ds = build_dataset(chats, tokenizer, seq_len=32, split_seed=0)
    assert ds.n_duplicates == len(keys) - len(set(keys))
    assert ds.train.n_documents + ds.val.n_documents == len(set(keys))
    kept = build_dataset(chats, tokenizer, seq_len=32, split_seed=0, dedupe=False)
    assert kept.n_duplicates == 0 and len(kept.train) > len(ds.train)


# -- user data at scale (issue 13) ------------------------------------------------------------------------------
def words_text(n_words: int, seed: int = 0) -> str:
    """Plain English-like text without blank lines: one long paragraph."""
    vocabulary = ("the printer is jammed again and my computer will not boot so I called support who said to "
                  "restart it twice before lunch while the cat sleeps near a warm window in spring").split()
    rng = np.random.default_rng(seed)
    return " ".join(vocabulary[i] for i in rng.integers(0, len(vocabulary), n_words)) + "."


def test_a_single_long_document_is_cut_into_windows_with_a_held_out_tail(tmp_path, tokenizer):
    path = tmp_path / "one.txt"
    path.write_text(words_text(6000))
    ds = build_dataset(load_documents(path), tokenizer, seq_len=16)
    assert ds.split_mode == "tail" and ds.n_documents == 1
    assert len(ds.train) > 8 * len(ds.val) > 0
    assert (len(ds.train) + len(ds.val)) * 16 > 0.95 * ds.n_tokens_total          # nearly every token is used
    text = path.read_text()

    def position(windows: torch.Tensor, row: int) -> float:
        words = tokenizer.decode(ds.vocab[windows[row]].tolist()).split(" ")[1:-1]      # whole words only
        return text.find(" ".join(words)) / len(text)

    assert 0 <= position(ds.train.tokens, 0) < 0.01 and position(ds.train.tokens, -1) < 0.9
    assert 0.85 < position(ds.val.tokens, 0) < position(ds.val.tokens, -1) <= 1     # validation: the tail
    assert "held-out last part" in ds.describe("one.txt")


def test_a_few_long_documents_also_use_the_tail_when_validation_would_take_too_much(tmp_path, tokenizer):
    path = tmp_path / "three.txt"
    path.write_text("\n\n".join(words_text(1500, seed) for seed in range(3)))
    ds = build_dataset(load_documents(path), tokenizer, seq_len=16)
    assert ds.split_mode == "tail"                       # one of three documents would be a third of the tokens
    assert 0.05 < len(ds.val) / (len(ds.train) + len(ds.val)) < 0.2


def test_duplicates_are_named_when_too_little_remains_and_in_the_summary(tmp_path, tokenizer):
    path = tmp_path / "same.txt"
    path.write_text("\n\n".join(["The same paragraph again and again."] * 400))
    with pytest.raises(DataError) as info:
        build_dataset(load_documents(path), tokenizer, seq_len=64)
    message = str(info.value)
    assert "399 of its 400 documents were exact duplicates" in message and "\n" not in message
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("\n\n".join([words_text(40, i) for i in range(60)] + ["A repeated line."] * 30))
    ds = build_dataset(load_documents(mixed), tokenizer, seq_len=16)
    assert ds.n_duplicates == 29
    assert "29 of 90 documents were exact duplicates and were dropped" in ds.describe("mixed.txt")


def test_encoding_in_chunks_and_pieces_gives_the_tokenizers_ids(chats, tokenizer, monkeypatch):
    from hybrid_optimization.distill import data as data_module
    from hybrid_optimization.distill.data import encode_documents, render, text_pieces

    rendered = [render(doc, tokenizer) for doc in chats[:300]]
    expected = [t for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"] for t in ids]
    monkeypatch.setattr(data_module, "ENCODE_CHUNK_CHARS", 2000)       # many chunks
    flat, counts, truncated = encode_documents(chats[:300], tokenizer)
    assert flat.tolist() == expected and int(counts.sum()) == len(expected) and not truncated
    text = words_text(3000)
    pieces = list(text_pieces(text, size=500))
    assert len(pieces) > 10 and "".join(pieces) == text and max(map(len, pieces)) <= 500
    assert all(p.startswith(" ") for p in pieces[1:])                  # cut just before a space
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t for p in pieces for t in tokenizer(p, add_special_tokens=False)["input_ids"]] == whole


def test_max_tokens_keeps_the_first_tokens_and_says_so(tmp_path, tokenizer):
    path = tmp_path / "many.txt"
    path.write_text("\n\n".join(words_text(50, i) for i in range(200)))
    full = build_dataset(load_documents(path), tokenizer, seq_len=16)
    cut = build_dataset(load_documents(path), tokenizer, seq_len=16, max_tokens=2000)
    assert cut.n_tokens_total == 2000 < full.n_tokens_total and cut.truncated and not full.truncated
    assert cut.n_documents < full.n_documents
    assert "cut at --max_tokens" in cut.describe("many.txt")
    with pytest.raises(DataError, match="raise --max_tokens"):
        build_dataset(load_documents(path), tokenizer, seq_len=16, max_tokens=20)


def test_big_splits_keep_only_the_windows_a_run_uses(tmp_path, tokenizer):
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(words_text(80, i) for i in range(400)))
    full = build_dataset(load_documents(path), tokenizer, seq_len=16)
    assert len(full.train) > 1000 and len(full.val) > 100
    sub = build_dataset(load_documents(path), tokenizer, seq_len=16, max_train_windows=300, max_val_windows=40)
    assert len(sub.train) == 300 and len(sub.val) == 40
    assert sub.train.n_available == len(full.train) and sub.val.n_available == len(full.val)
    index = np.unique(np.linspace(0, len(full.train) - 1, 300).round().astype(np.int64))
    assert torch.equal(sub.vocab[sub.train.tokens], full.vocab[full.train.tokens[index]])   # evenly spread
    assert sub.train.texts[0] == full.train.texts[0] and sub.vocab_size <= full.vocab_size
    assert "300 of" in sub.describe("big.txt") and sub.fingerprint != full.fingerprint
    small = build_dataset(load_documents(path), tokenizer, seq_len=16, max_train_windows=300, max_val_windows=40,
                          keep_all_below=5000)                          # small data are used whole, as before
    assert small.fingerprint == full.fingerprint


def test_window_budget_and_estimate():
    from hybrid_optimization.distill.data import preparation_estimate
    from hybrid_optimization.distill.plan import SUBSET_MIN_WINDOWS, train_windows_budget   # the plan owns them

    assert train_windows_budget(32, None, 20, 10) == 6400                # the tiny preset's default run
    assert train_windows_budget(32, 1, 20, 10) == SUBSET_MIN_WINDOWS
    assert train_windows_budget(32, None, 20, None) is None              # an epoch is one pass: every window
    assert train_windows_budget(32, 500, 20, 10, stored=6400) == 6400    # a resumed run keeps its windows
    fast, line = preparation_estimate(50e6, 64, 6400, 128, 20_000)
    slow, _ = preparation_estimate(50e6, 128, None, 256, 500)
    assert 10 < fast < 300 and slow > 3600 and "6,528 windows" in line
    capped, _ = preparation_estimate(50e6, 128, None, 256, 500, max_tokens=100_000)
    assert capped < slow / 50


def test_tokenizer_is_trained_on_an_even_sample_of_big_data():
    from hybrid_optimization.distill.data import Document
    from hybrid_optimization.distill.tiny import tokenizer_sample

    documents = [Document(text=words_text(200, i)) for i in range(100)]
    total = sum(d.n_chars() for d in documents)
    assert sum(map(len, tokenizer_sample(documents, max_chars=total))) > total      # all of it (+ markers)
    sample = list(tokenizer_sample(documents, max_chars=total // 10))
    assert 0.05 * total < sum(map(len, sample)) < 0.15 * total
    assert sample == list(tokenizer_sample(documents, max_chars=total // 10))       # deterministic
    assert sample[-1].startswith(words_text(200, 99)[:20]) or len(sample) >= 9     # spread to the end


def test_max_tokens_flag():
    from hybrid_optimization.distill.cli import main, parse_options

    assert parse_options(["--max_tokens", "5000"]).max_tokens == 5000
    assert main(["--max_tokens", "0"]) == 2


RST_PAGE = """.. _tut-if:

:keyword:`!if` Statements
=========================

Perhaps the most well-known statement type is the :keyword:`if` statement.  For
example::

   >>> x = int(input("Please enter an integer: "))
   >>> if x < 0:
   ...     x = 0

There can be zero or more ``elif`` parts, see `the docs <https://example.org>`_ and
:func:`len <builtins.len>` for more.

.. function:: len(s)

   Return the length (the number of items) of an object, as described in
   :ref:`typesseq`.

   .. code-block:: python

      len([1, 2, 3])

* a bulleted item that is not prose
"""


def test_python_docs_source_keeps_prose_and_drops_markup():
    from hybrid_optimization.distill.data import _rst_prose

    assert _rst_prose(RST_PAGE) == [
        "Perhaps the most well-known statement type is the if statement.  For example:",
        "There can be zero or more elif parts, see the docs and len for more.",
        "Return the length (the number of items) of an object, as described in typesseq.",
    ]


def test_named_data_sources(tmp_path):
    from hybrid_optimization.distill import data
    from hybrid_optimization.distill.cli import main
    from hybrid_optimization.distill.options import DATA_SOURCES, OptionsError, TrainOptions

    assert tuple(data.DATA_SOURCES) == DATA_SOURCES
    assert len(load_documents(source="chatterbot")) == len(load_documents())
    with pytest.raises(DataError, match="unknown"):
        load_documents(source="wikipedia")
    with pytest.raises(OptionsError, match="cannot be combined"):
        TrainOptions(data_source="python-docs", data=__file__).validate()
    assert main(["--data_source", "wikipedia"]) == 2
    try:
        folder = data.python_docs_dir()
    except DataError as exc:
        assert "apt-get install python3.11-doc" in str(exc)
        pytest.skip("the Debian package python3.11-doc is not installed")
    documents = load_documents(source="python-docs")
    assert len(documents) > 400 and folder.is_dir()
    assert sum(doc.n_chars() for doc in documents) > 4_000_000          # ≥ 1 M tokens at ~4 characters/token
    assert not any(".. " in doc.text[:3] or ">>>" in doc.text for doc in documents[:50])


def test_progress_lines_without_a_bar():
    from hybrid_optimization.distill.data import make_progress

    lines = []
    update = make_progress("tokenising", lines.append, bar=False, unit="M characters", scale=1e6)
    for done in range(0, 10_000_001, 1_000_000):
        update(done, 10_000_000)
    assert lines == [f"  tokenising: {x:.1f}/10.0 M characters" for x in (3.0, 5.0, 8.0, 10.0)]


def test_the_reader_takes_regular_text_files_only_and_answers_at_once(tmp_path):
    """Issue 17 item 5: a FIFO would block the reader and a gigabyte of NUL bytes was decoded for 14 minutes; both
    are refused from stat() and a 64 kB head, in well under a second."""
    import os
    import time
    fifo = tmp_path / "chats.jsonl"
    os.mkfifo(fifo)
    zeros = tmp_path / "zeros.txt"
    with open(zeros, "wb") as handle:
        handle.truncate(2 ** 30)                     # 1 GB of NUL bytes, sparse
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("hello there, how are you?\n\n".encode("utf-16"))
    for path, message in ((fifo, "is not a regular file"), (zeros, "looks binary"), (utf16, "looks binary")):
        started = time.perf_counter()
        with pytest.raises(DataError, match=message):
            load_documents(path)
        assert time.perf_counter() - started < 2


def test_chatterbot_loads_the_same_documents_with_the_pure_python_yaml_loader(chats, monkeypatch):
    """The corpus is parsed with libyaml's CSafeLoader when PyYAML has it (speed); the documents must be exactly
    those of PyYAML's own SafeLoader."""
    import yaml

    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)          # what a PyYAML without libyaml does
    assert load_chatterbot() == chats


def test_clusters_are_cached_by_content_and_read_back_identical(tmp_path, monkeypatch):
    """setup.cluster_samples: the second run on the same texts, embedder, seed and k reads the arrays the first
    computed (bit-identical, same dtypes) instead of refitting; other texts or another seed refit; a torn cache
    file is computed again."""
    from types import SimpleNamespace

    from hybrid_optimization.distill import setup
    monkeypatch.setenv("HYBRID_CACHE_DIR", str(tmp_path))
    texts = [f"the {w} sat on the {v} mat number {i}" for i, (w, v) in
             enumerate(zip(["cat", "dog", "bird", "fish"] * 10, ["red", "blue", "green"] * 14))]
    data = SimpleNamespace(train=SimpleNamespace(texts=texts[:32]), val=SimpleNamespace(texts=texts[32:]))

    def plan(seed=0):
        return SimpleNamespace(options=SimpleNamespace(embedder="tfidf"),
                               config=SimpleNamespace(seed=seed, data_clusters=3))
    first = setup.cluster_samples(data, plan())
    assert len(list((tmp_path / "clusters").glob("*.npz"))) == 1
    real_fit = setup._fit_clusters

    def no_fit(*args):
        raise AssertionError("refitted")
    monkeypatch.setattr(setup, "_fit_clusters", no_fit)
    again = setup.cluster_samples(data, plan())
    for key in setup.CLUSTER_KEYS:
        assert np.array_equal(again[key], first[key]) and again[key].dtype == first[key].dtype, key
    with pytest.raises(AssertionError, match="refitted"):
        setup.cluster_samples(data, plan(seed=1))
    other = SimpleNamespace(train=SimpleNamespace(texts=texts[:31] + ["a different text"]), val=data.val)
    with pytest.raises(AssertionError, match="refitted"):
        setup.cluster_samples(other, plan())
    (cached,) = (tmp_path / "clusters").glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])            # torn
    # a writer killed before its rename left its partial file; a live writer's is its own business
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = cached.with_name(f"{cached.name}.tmp{dead.pid}")
    live = cached.with_name(f"{cached.name}.tmp{os.getppid()}")
    for f in (killed, live):
        f.write_bytes(b"half")
    monkeypatch.setattr(setup, "_fit_clusters", real_fit)
    recomputed = setup.cluster_samples(data, plan())
    assert all(np.array_equal(recomputed[key], first[key]) for key in setup.CLUSTER_KEYS)
    assert not killed.exists() and live.exists()
    live.unlink()
    # a full disk: the write fails, the arrays are still returned, and no partial file stays
    cached.unlink()

    def full_disk(sink, **arrays):
        sink.write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(setup.np, "savez", full_disk)
    assert np.array_equal(setup.cluster_samples(data, plan())["train"], first["train"])
    assert list((tmp_path / "clusters").iterdir()) == []
