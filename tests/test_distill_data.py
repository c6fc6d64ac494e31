"""Data loading for distillation: chatterbot corpus, .txt, chat .jsonl, errors, split, packing, featurisers."""
import json

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
    text = tokenizer.decode(ds.to_teacher_ids(ds.train.tokens[0]).tolist())
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
