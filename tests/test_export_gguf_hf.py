"""GGUF and Hugging Face exports of the student: exact ternary round trips, logits through real readers (gguf-py,
transformers' GGUF loader, transformers' HF loader), fall-back reporting, tokenizer inside, and bad input.

The student is a small random one (QAT'd for a few steps so codes are not at initialisation) with the tiny preset's
kind of tokenizer (byte-level BPE trained here in a fraction of a second). The opt-in llama.cpp test is at the end.
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hybrid_optimization.distill.export import ExportError, export_student
from hybrid_optimization.distill.export_gguf import DEFAULT_LINEAR_TYPE, SUPPRESS_TOKENS_KEY, export_gguf
from hybrid_optimization.distill.export_hf import export_hf
from hybrid_optimization.distill.llama_format import permute_for_gguf
from hybrid_optimization.distill.run_export import export_packed_student, main as export_main
from hybrid_optimization.distill.student import STUDENT_SIZES, StudentConfig
from hybrid_optimization.quantization import QuantLinear, quantize_model
from tests.fixtures.student_run import make_tokenizer_dir, trained_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    os.environ["HYBRID_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    return make_tokenizer_dir()


def _student(**kwargs):
    model, vocab, ids = trained_student(**kwargs)
    return copy.deepcopy(model), vocab, ids


def _gguf_tensors(path):
    import gguf
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, values.reshape([int(d) for d in reversed(t.shape)]))
    return reader, out


def test_default_student_sizes_are_gguf_friendly():
    for size, (d_model, _, n_heads, d_ff) in STUDENT_SIZES.items():
        config = StudentConfig(vocab_size=10, d_model=d_model, n_heads=n_heads, d_ff=d_ff)
        assert (config.gguf_unfriendly_linears() == {}) == (size != "micro"), size
    from hybrid_optimization.distill.presets import PRESETS
    assert all(STUDENT_SIZES[p.student_size][0] % 256 == 0 and STUDENT_SIZES[p.student_size][3] % 256 == 0
               for p in PRESETS.values())


@pytest.mark.parametrize("linear_type", ["TQ1_0", "TQ2_0"])
def test_gguf_ternary_weights_round_trip_bit_identical(tmp_path, tokenizer_dir, linear_type):
    model, vocab, _ = _student()
    report = export_gguf(model, vocab, tokenizer_dir, tmp_path / "s.gguf", linear_type=linear_type)
    assert report.fully_ternary and not report.fallbacks
    _, tensors = _gguf_tensors(tmp_path / "s.gguf")
    n_checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        kind, values = tensors[_gguf_name(name)]
        assert kind == linear_type
        q = module.quantized_weight()
        expected = (q.codes.float() * q.scale).numpy()          # codes × scale, the student's ternary weight
        if name.endswith(("q_proj", "k_proj")):
            expected = permute_for_gguf(expected, model.config.n_heads)
        assert values.dtype == np.float32 and np.array_equal(values, expected), name   # bit-identical
        assert set(np.unique(values / q.scale.item())) <= {-1.0, 0.0, 1.0}
        n_checked += 1
    assert n_checked == 7
    # the head and the embedding: expanded to the tokenizer's vocabulary, the student's rows in place, others zero
    _, head = tensors["output.weight"]
    assert head.shape == (300, 256) and np.array_equal(head[vocab.numpy()], model.lm_head.weight.detach().numpy())
    unused = np.setdiff1d(np.arange(300), vocab.numpy())
    assert not head[unused].any()


def _gguf_name(student_name):
    from hybrid_optimization.distill.llama_format import LINEAR_NAMES
    _, index, kind, proj = student_name.split(".")
    return f"blk.{index}.{LINEAR_NAMES[f'{kind}.{proj}'][1]}.weight"


def test_transformers_reads_gguf_and_hf_with_the_students_logits(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, vocab, ids = _student(n_layers=2)
    with torch.no_grad():
        expected = model(ids)
    export_gguf(model, vocab, tokenizer_dir, tmp_path / "s.gguf")
    export_hf(model, vocab, tokenizer_dir, tmp_path / "hf")
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="s.gguf", dtype=torch.float32).eval()
    from_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(from_hf).__name__ == "LlamaForCausalLM" == type(from_gguf).__name__
    with torch.no_grad():
        for loaded in (from_gguf, from_hf):
            logits = loaded(vocab[ids]).logits
            assert logits.shape[-1] == 300
            assert torch.allclose(logits[..., vocab], expected, atol=1e-4, rtol=0)
            unused = torch.ones(300, dtype=torch.bool)
            unused[vocab] = False
            assert torch.all(logits[..., unused] == 0)
    # the tokenizer inside both: same ids and chat template as the run's tokenizer
    original = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "<|im_start|>user\nWhy did the robot cross the road?<|im_end|>\n"
    chat = [{"role": "user", "content": "hello there"}]
    for tok in (AutoTokenizer.from_pretrained(tmp_path, gguf_file="s.gguf"),
                AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)):
        assert tok(text).input_ids == original(text).input_ids
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    # generate() never picks a token the student was not trained on
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert sorted(generation["suppress_tokens"]) == sorted(set(range(300)) - set(vocab.tolist()))
    out = from_hf.generate(vocab[ids[:1, :4]], max_new_tokens=6, do_sample=False)
    assert set(out[0].tolist()) <= set(vocab.tolist())


def test_gguf_metadata_and_tokenizer_fields(tmp_path, tokenizer_dir):
    import gguf
    model, vocab, _ = _student()
    export_gguf(model, vocab, tokenizer_dir, tmp_path / "s.gguf", other_type="Q8_0")
    reader, tensors = _gguf_tensors(tmp_path / "s.gguf")
    fields = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 1
    assert fields["llama.embedding_length"] == 256 and fields["llama.feed_forward_length"] == 512
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 300
    assert fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    # llama.cpp's own key for ids its sampler must never pick (an INT32 array, as llama.cpp's vocabulary reads it)
    assert sorted(fields[SUPPRESS_TOKENS_KEY]) == sorted(set(range(300)) - set(vocab.tolist()))
    assert reader.fields[SUPPRESS_TOKENS_KEY].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert "hybrid.unused_token_ids" not in fields                   # the private key nothing read is gone
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION == 2
    assert reader.fields["general.quantization_version"].types == [gguf.GGUFValueType.UINT32]
    assert tensors["token_embd.weight"][0] == "Q8_0" and tensors["output.weight"][0] == "Q8_0"
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"


def test_non_friendly_shape_falls_back_and_says_why(tmp_path, tokenizer_dir):
    model, vocab, _ = _student(d_model=128, d_ff=384)           # the "micro" size: rows of 128 and 384
    report = export_gguf(model, vocab, tokenizer_dir, tmp_path / "s.gguf")
    assert not report.fully_ternary
    assert set(report.fallbacks) == {f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                   "ffn_gate", "ffn_up", "ffn_down")}
    assert "row length 128 is not a multiple of 256" in report.fallbacks["blk.0.attn_q.weight"]
    assert "row length 384 is not a multiple of 256" in report.fallbacks["blk.0.ffn_down.weight"]
    assert "fell back" in report.summary_line()
    _, tensors = _gguf_tensors(tmp_path / "s.gguf")
    kind, values = tensors["blk.0.ffn_down.weight"]
    q = model.layers[0].mlp.down_proj.quantized_weight()
    assert kind == "F16" and np.array_equal(values, (q.codes.float() * q.scale).numpy())   # still exact

    half = _student(d_model=256, d_ff=512)[0]    # d_model fits but d_ff 640 would not: only ffn_down falls back
    half.layers[0].mlp.down_proj = QuantLinear(640, 256, bias=False, bits=1.58)
    half.layers[0].mlp.gate_proj = QuantLinear(256, 640, bias=False, bits=1.58)
    half.layers[0].mlp.up_proj = QuantLinear(256, 640, bias=False, bits=1.58)
    half.config.d_ff = 640
    report = export_gguf(half, vocab, tokenizer_dir, tmp_path / "half.gguf")
    assert list(report.fallbacks) == ["blk.0.ffn_down.weight"]


def test_per_group_scales_fall_back_exactly(tmp_path, tokenizer_dir):
    model, vocab, _ = _student()
    quantize_model(model, {"layers.0.mlp.up_proj": 1.58}, group_size=64)
    report = export_gguf(model, vocab, tokenizer_dir, tmp_path / "s.gguf")
    assert list(report.fallbacks) == ["blk.0.ffn_up.weight"] and "256-weight block" in report.fallbacks[
        "blk.0.ffn_up.weight"]


def test_bad_targets_leave_nothing_behind(tmp_path, tokenizer_dir):
    model, vocab, _ = _student()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write the export to .*a-file/s.gguf"):
        export_gguf(model, vocab, tokenizer_dir, blocker / "s.gguf")
    with pytest.raises(ExportError, match="cannot write the export to .*a-file/hf"):
        export_hf(model, vocab, tokenizer_dir, blocker / "hf")
    with pytest.raises(ExportError, match="no tokenizer.json"):
        export_gguf(model, vocab, tmp_path, tmp_path / "s.gguf")
    with pytest.raises(ExportError, match="not supported"):
        export_gguf(model, vocab, tokenizer_dir, tmp_path / "s.gguf", linear_type="Q4_K")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]
    if os.geteuid() != 0:       # root writes into read-only folders; other users get the same one line
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ExportError, match="not writable"):
            export_gguf(model, vocab, tokenizer_dir, locked / "s.gguf")
        locked.chmod(0o700)


def test_write_failure_midway_leaves_no_partial_file(tmp_path, tokenizer_dir, monkeypatch):
    import gguf
    model, vocab, _ = _student()

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, vocab, tokenizer_dir, tmp_path / "s.gguf")
    assert list(tmp_path.iterdir()) == []


def test_export_from_the_packed_student_and_cli_errors(tmp_path, tokenizer_dir, capsys):
    model, vocab, ids = _student()
    packed = tmp_path / "student.safetensors"
    export_student(model, packed, vocab, extra={"preset": "tiny", "run_id": "r1", "tokenizer_dir": tokenizer_dir})
    result = export_packed_student(packed, "gguf")
    assert result.path == tmp_path / "student.gguf" and result.report.fully_ternary
    assert export_packed_student(packed, "hf").path == tmp_path / "student-hf"
    assert (tmp_path / "student-hf" / "model.safetensors").is_file()
    assert result.report.linear_type == DEFAULT_LINEAR_TYPE              # the CLI's default is the exporter's
    # one mode for every exported file (safetensors alone would create its files 0600)
    from hybrid_optimization.distill.export_hf import regular_file_mode
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in [packed, tmp_path / "student.gguf",
                                                              *(tmp_path / "student-hf").iterdir()]}
    assert set(modes.values()) == {oct(regular_file_mode())}, modes

    from hybrid_optimization.tracking import RunStore
    store = RunStore(tmp_path / "runs")
    failed = store.create_run(config={}, args=[], preset="tiny", status="queued")
    store.set_status(failed, "failed", error="boom")
    assert export_main([failed, "--runs_root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "failed" in err and "no trained student" in err
    untrained = store.create_run(config={}, args=[], preset="tiny", status="queued")
    store.set_status(untrained, "finished")
    assert export_main([untrained, "--runs_root", str(tmp_path / "runs"), "--format", "hf"]) == 2
    assert "without --export" in capsys.readouterr().err
    assert export_main(["nope-123", "--runs_root", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not any(p.name.startswith("student") for p in store.run_dir(untrained).iterdir())


@pytest.mark.slow
def test_llama_cpp_runs_the_ternary_gguf(tmp_path, tokenizer_dir):
    """Opt-in (`-m slow`): a real llama.cpp gives the student's next-token logits on the exported GGUF.

    Setup, once (builds llama.cpp from source; ~15 min on 2 cores; never part of requirements*.txt):
        python -m venv /work/llama-venv
        CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF" \\
            /work/llama-venv/bin/pip install llama-cpp-python==0.3.16
    and point LLAMA_PYTHON at that interpreter (default /work/llama-venv/bin/python).
    """
    python = os.environ.get("LLAMA_PYTHON", "/work/llama-venv/bin/python")
    if not os.path.exists(python):
        pytest.skip(f"no llama-cpp-python interpreter at {python} (see this test's docstring)")
    model, vocab, ids = _student(n_layers=2)
    with torch.no_grad():
        expected = model(ids[:1])[0]
    for linear_type in ("TQ1_0", "TQ2_0"):
        path = tmp_path / f"s-{linear_type}.gguf"
        export_gguf(model, vocab, tokenizer_dir, path, linear_type=linear_type)
        script = ("import json,sys,llama_cpp,numpy as np\n"
                  "m=llama_cpp.Llama(sys.argv[1],n_ctx=32,logits_all=True,verbose=False,n_threads=2)\n"
                  "ids=json.loads(sys.argv[2]); m.eval(ids)\n"
                  "print(json.dumps(np.asarray(m.scores[:len(ids)]).tolist()))\n")
        out = subprocess.run([python, "-c", script, str(path), json.dumps(vocab[ids[0]].tolist())],
                             capture_output=True, text=True, timeout=300, check=True)
        logits = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))[:, vocab]
        # llama.cpp quantizes activations to 8 bits for its ternary dot products: close, not bit-equal
        assert torch.equal(logits.argmax(-1), expected.argmax(-1)), linear_type
        assert (logits - expected).abs().max() < 0.05 * expected.abs().max(), linear_type


@pytest.mark.slow
def test_llama_cpp_never_samples_an_unused_token_at_temperature_1(tmp_path, tokenizer_dir):
    """Opt-in (`-m slow`; same llama-cpp-python interpreter as above, skipped without it): llama.cpp's own samplers,
    at temperature 1 with no top-k / top-p / min-p cut, never draw an id the GGUF lists in
    `tokenizer.ggml.suppress_tokens`; on a copy of the file without the key the same sampling draws them.

    Upstream llama.cpp applies the key itself since PR #26276 ("move suppress_tokens handling to common/sampling",
    2026-07-29): `llama_vocab_get_suppress_tokens()` returns the file's list and `common_sampler_init`
    (common/sampling.cpp) puts every id at -INFINITY into the logit-bias sampler that heads the chain, so llama-cli
    and llama-server never sample them. The llama.cpp inside llama-cpp-python 0.3.16 (commit 4227c9b) predates that
    (no `suppress` anywhere in its libllama.so), and llama-cpp-python builds its own sampler chain anyway. So the ids
    are read here from the file with gguf-py and the chain is built as common_sampler_init builds it, from
    llama.cpp's own samplers: logit_bias(ids at -inf) -> temp(1.0) -> dist(seed). Where the library has
    `llama_vocab_get_suppress_tokens`, its list must equal gguf-py's.
    """
    import gguf
    python = os.environ.get("LLAMA_PYTHON", "/work/llama-venv/bin/python")
    if not os.path.exists(python):
        pytest.skip(f"no llama-cpp-python interpreter at {python} (see test_llama_cpp_runs_the_ternary_gguf)")
    model, vocab, ids = _student()
    path, plain = tmp_path / "s.gguf", tmp_path / "plain.gguf"
    export_gguf(model, vocab, tokenizer_dir, path)
    # the same file less the key, made with gguf-py's own metadata tool (llama.cpp's gguf-new-metadata)
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--remove-metadata",
                    SUPPRESS_TOKENS_KEY, "--force", str(path), str(plain)], capture_output=True, check=True,
                   timeout=120, stdin=subprocess.DEVNULL)
    unused = sorted(set(range(300)) - set(vocab.tolist()))

    def listed(file):
        field = gguf.GGUFReader(str(file)).fields.get(SUPPRESS_TOKENS_KEY)
        return sorted(int(i) for i in field.contents()) if field is not None else []

    assert listed(path) == unused and listed(plain) == []
    script = ("import ctypes,json,sys,llama_cpp,numpy as np\n"
              "from llama_cpp import _internals\n"
              "path,prompt,ids=sys.argv[1],json.loads(sys.argv[2]),json.loads(sys.argv[3])\n"
              "m=llama_cpp.Llama(path,n_ctx=32,verbose=False,n_threads=1,seed=1)\n"
              "out={'drawn':[]}\n"
              "if hasattr(llama_cpp.llama_cpp._lib,'llama_vocab_get_suppress_tokens'):\n"
              "    f=llama_cpp.llama_cpp._lib.llama_vocab_get_suppress_tokens\n"
              "    f.restype=ctypes.POINTER(ctypes.c_int32); n=ctypes.c_int32(0)\n"
              "    p=f(m._model.vocab,ctypes.byref(n)); out['library_list']=sorted(p[i] for i in range(n.value))\n"
              "m.eval(prompt)\n"
              "out['logits']=np.ctypeslib.as_array(m._ctx.get_logits_ith(-1),shape=(m.n_vocab(),)).tolist()\n"
              "for run in range(16):\n"
              "    s=_internals.LlamaSampler()\n"
              "    if ids: s.add_logit_bias(m.n_vocab(),{int(i):float('-inf') for i in ids})\n"
              "    s.add_temp(1.0); s.add_dist(1000+run)\n"
              "    m.n_tokens=0; m._ctx.kv_cache_seq_rm(-1,0,-1); m.eval(prompt)\n"
              "    for _ in range(24):\n"
              "        t=s.sample(m._ctx,-1); out['drawn'].append(int(t)); m.eval([t])\n"
              "print(json.dumps(out))\n")
    prompt = json.dumps(vocab[ids[0, :8]].tolist())
    out = {}
    for name, file in (("suppressed", path), ("plain", plain)):
        done = subprocess.run([python, "-c", script, str(file), prompt, json.dumps(listed(file))],
                              capture_output=True, text=True, timeout=600, check=True)
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        if "library_list" in out[name]:                          # a llama.cpp new enough to read the key itself
            assert out[name]["library_list"] == listed(file), name
    # without the bias the unused ids are far from negligible: llama.cpp's own next-token distribution after the
    # prompt gives them this much mass (logit 0 each, beside the student's logits)
    logits = torch.tensor(out["plain"]["logits"], dtype=torch.float64)
    unused_mass = torch.softmax(logits, -1)[unused].sum().item()
    assert unused_mass > 0.05, unused_mass                       # 384 draws with none: < 1e-8 by chance
    assert len(out["suppressed"]["drawn"]) == 384 and not set(out["suppressed"]["drawn"]) & set(unused)
    drawn_unused = [t for t in out["plain"]["drawn"] if t in set(unused)]
    assert drawn_unused, "without the key the same sampling draws unused ids: the check can fail"
    print(f"unused mass {unused_mass:.3f}; plain: {len(drawn_unused)}/384 draws unused; with the key: 0/384")


def test_export_cli_module_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "hybrid_optimization.export", "no-such-run", "--runs_root",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "error:" in out.stderr


def test_training_run_with_export_gguf_writes_a_fully_ternary_gguf(tmp_path):
    """The pipeline end to end (tiny preset, default student size, 2 steps): --export gguf leaves the packed student
    and a GGUF whose every Linear layer is TQ2_0 (the default: the faster-decoding ternary type), both registered
    with the run; every exported file has the same mode (0644 under the usual umask)."""
    from hybrid_optimization.distill.options import TrainOptions
    from hybrid_optimization.distill.train import train
    from hybrid_optimization.tracking import RunStore
    result = train(TrainOptions(qat=True, ternary=True, max_steps=2, eval_windows=8, quiet=True, export="gguf",
                                runs_root=str(tmp_path)))
    assert result.exit_code == 0
    run = RunStore(tmp_path).get_run(result.run_id)
    gguf_path = run["artifacts"]["export_gguf"]
    reader, tensors = _gguf_tensors(gguf_path)
    kinds = {name: kind for name, (kind, _) in tensors.items()}
    assert {kinds[f"blk.0.{n}.weight"] for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                                  "ffn_down")} == {DEFAULT_LINEAR_TYPE} == {"TQ2_0"}
    assert kinds["output.weight"] == "F32" and run["artifacts"]["export"].endswith("student.safetensors")
