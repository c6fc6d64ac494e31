"""Export the student as a llama.cpp GGUF file: llama architecture, the tokenizer inside, ternary Linear weights as
llama.cpp's TQ2_0 (2.0625 bits/weight) or TQ1_0 (1.6875 bits/weight), written with the `gguf` package.

Tensor types:
- ternary Linear layers: `linear_type` (TQ2_0 by default: llama.cpp decodes it 2.07× as fast as Q8_0 on the base
  student's shape, TQ1_0 1.61×, llama-bench with 1 thread; TQ1_0 is the smallest file, 18 % fewer bits on the
  Linear layers; Q8_0 / F16 / F32 for comparison files). TQ blocks are 256 weights of one row with one fp16 scale, so a layer is stored ternary only when its row
  length is a multiple of 256 and every block's codes × scale come back bit-identical (the student's per-tensor fp16
  scale always does); otherwise it falls back to F16 — exact for ternary values — and the report says which and why.
- other Linear layers (k-bit or full precision), the token embedding and the output head: `other_type` (F32 by
  default, so the file reproduces the student's logits to float rounding; F16 or Q8_0 for a smaller file).
- RMSNorm weights: F32, as llama.cpp requires for 1-D tensors.

The tokenizer is the run's own (byte-level BPE, gguf tokenizer model "gpt2"): the tiny preset's trained BPE
(pre-tokenizer "gpt-2", the GPT-2 split regex it was trained with) or SmolLM2's for the smollm2 preset (pre-tokenizer
"smollm"). Any byte-level BPE tokenizer.json exports the same way; other tokenizer kinds are refused with one line.
The vocabulary is the full tokenizer's (llama_format.py: embedding and head expanded, unused rows zero). The ids the
student never predicts are listed in `tokenizer.ggml.suppress_tokens` (INT32 array), llama.cpp's own key: since
llama.cpp PR #26276 (2026-07-29) the vocabulary keeps it (`llama_vocab_get_suppress_tokens()`) and
`common_sampler_init` (common/sampling.cpp) gives those ids a -INFINITY logit bias, so llama-cli / llama-server never
sample them. Older llama.cpp builds (the one inside llama-cpp-python 0.3.16 is commit 4227c9b) ignore the key, and
front-ends that build their own sampler chain (llama-cpp-python's `Llama`) must pass the ids as a logit bias
themselves (tests/test_export_gguf_hf.py's llama.cpp test does, with llama.cpp's logit-bias sampler). gguf-py 0.19
has no constant for that key yet, hence the string here.
`general.quantization_version` is written as llama.cpp's own converter writes it (GGML_QUANT_VERSION).

The file is written under a temporary name and renamed into place, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .export import ExportError, atomic_file
from .llama_format import llama_tensors, permute_for_gguf, unused_token_ids
from .presets import GGUF_ROW_MULTIPLE
from .student import StudentLM

LINEAR_TYPES = ("TQ2_0", "TQ1_0", "Q8_0", "F16", "F32")
# The measurement behind the default (issue 20: llama.cpp built from upstream source, llama-bench, 1 thread, the base
# student's shapes): TQ2_0 decodes at 2.07× Q8_0's tokens/s, TQ1_0 at 1.61×; TQ1_0 is 1.6875 vs 2.0625 bits/weight.
DEFAULT_LINEAR_TYPE = "TQ2_0"
OTHER_TYPES = ("F32", "F16", "Q8_0")
TERNARY_FALLBACK = "F16"        # exact for codes × fp16 scale
SUPPRESS_TOKENS_KEY = "tokenizer.ggml.suppress_tokens"
STUDENT_KEY = "hybrid.student"


@dataclass
class GGUFExportReport:
    path: str
    file_bytes: int
    linear_type: str
    other_type: str
    n_params: int                                   # of the written (vocabulary-expanded) model
    tensor_types: dict[str, str] = field(default_factory=dict)      # gguf name -> type written
    fallbacks: dict[str, str] = field(default_factory=dict)         # gguf name -> why it is not `linear_type`
    n_unused_tokens: int = 0

    @property
    def fully_ternary(self) -> bool:
        """Every ternary Linear layer in a llama.cpp ternary type."""
        return self.linear_type.startswith("TQ") and not self.fallbacks

    def to_dict(self) -> dict:
        return {**asdict(self), "fully_ternary": self.fully_ternary}

    def summary_line(self) -> str:
        text = (f"GGUF {self.path} ({self.file_bytes / 2**20:.2f} MiB; ternary Linear layers as {self.linear_type}, "
                f"embedding and head {self.other_type})")
        if self.fallbacks:
            names = ", ".join(list(self.fallbacks)[:4]) + (", …" if len(self.fallbacks) > 4 else "")
            text += (f"; {len(self.fallbacks)} tensor(s) fell back to another type ({names}): "
                     f"{next(iter(self.fallbacks.values()))}")
        return text


def export_gguf(student: StudentLM, vocab: torch.Tensor, tokenizer_dir: str | Path, path: str | Path, *,
                linear_type: str = DEFAULT_LINEAR_TYPE, other_type: str = "F32", pre_tokenizer: str = "gpt-2",
                name: str = "hybrid-distilled-student", metadata: dict | None = None) -> GGUFExportReport:
    import gguf

    linear_type, other_type = linear_type.upper(), other_type.upper()
    if linear_type not in LINEAR_TYPES:
        raise ExportError(f"GGUF Linear type {linear_type!r} is not supported: choose one of {', '.join(LINEAR_TYPES)}")
    if other_type not in OTHER_TYPES:
        raise ExportError(f"GGUF embedding/head type {other_type!r} is not supported: choose one of "
                          f"{', '.join(OTHER_TYPES)}")
    vocab_fields = gguf_tokenizer_fields(tokenizer_dir)
    tokenizer_size = len(vocab_fields["tokens"])
    config = student.config
    tensors = llama_tensors(student, vocab, tokenizer_size)
    unused = unused_token_ids(torch.as_tensor(vocab), tokenizer_size)
    report = GGUFExportReport(path=str(path), file_bytes=0, linear_type=linear_type, other_type=other_type,
                              n_params=sum(t.value.numel() for t in tensors), n_unused_tokens=len(unused))
    unfriendly = config.gguf_unfriendly_linears()

    encoded = []
    for tensor in tensors:
        array = tensor.value.numpy()
        if tensor.gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            array = permute_for_gguf(array, config.n_heads)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 1:
            kind = "F32"
        elif tensor.is_ternary:
            kind, why = _ternary_type(array, linear_type, unfriendly.get(tensor.student_name.split(".")[-2]))
            if why:
                report.fallbacks[tensor.gguf_name] = why
        else:
            kind = other_type
        qtype = gguf.GGMLQuantizationType[kind]
        data = gguf.quants.quantize(array, qtype) if kind not in ("F32", "F16") else \
            array.astype(np.float16 if kind == "F16" else np.float32)
        encoded.append((tensor.gguf_name, data, qtype if kind not in ("F32", "F16") else None))
        report.tensor_types[tensor.gguf_name] = kind

    head_dim = config.d_model // config.n_heads
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name)
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.d_model)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.d_ff)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.n_heads)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(tokenizer_size)
        writer.add_file_type(_file_type(gguf, linear_type, other_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer)
        writer.add_token_list(vocab_fields["tokens"])
        writer.add_token_types(vocab_fields["token_types"])
        writer.add_token_merges(vocab_fields["merges"])
        for key, setter in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                            ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
            if vocab_fields.get(key) is not None:
                setter(vocab_fields[key])
        writer.add_add_bos_token(False)
        if vocab_fields.get("chat_template"):
            writer.add_chat_template(vocab_fields["chat_template"])
        if unused:
            writer.add_array(SUPPRESS_TOKENS_KEY, [int(i) for i in unused])     # gguf-py writes Python ints as INT32
        writer.add_string(STUDENT_KEY, json.dumps({"config": config.to_dict(), "vocab": torch.as_tensor(vocab)
                                                   .tolist(), **(metadata or {})}))
        for gguf_name, data, qtype in encoded:
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    report.file_bytes = Path(path).stat().st_size
    return report


def _ternary_type(array: np.ndarray, linear_type: str, unfriendly_reason: str | None) -> tuple[str, str | None]:
    """(type to write, why it is not `linear_type` or None)."""
    if not linear_type.startswith("TQ"):
        return linear_type, None
    if unfriendly_reason or array.shape[1] % GGUF_ROW_MULTIPLE:
        return TERNARY_FALLBACK, unfriendly_reason or (f"row length {array.shape[1]} is not a multiple of "
                                                       f"{GGUF_ROW_MULTIPLE} (llama.cpp's TQ1_0 / TQ2_0 block)")
    import gguf
    qtype = gguf.GGMLQuantizationType[linear_type]
    back = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)
    if not np.array_equal(back, array):
        return TERNARY_FALLBACK, ("its ternary scale varies inside a 256-weight block (per-group scales), which "
                                  "TQ1_0 / TQ2_0's one fp16 scale per block cannot hold exactly")
    return linear_type, None


def _file_type(gguf, linear_type: str, other_type: str) -> int:
    names = {"TQ1_0": "MOSTLY_TQ1_0", "TQ2_0": "MOSTLY_TQ2_0", "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16",
             "F32": "ALL_F32"}
    return int(gguf.LlamaFileType[names[linear_type]])


# -- the tokenizer ------------------------------------------------------------------------------------------------------
def gguf_tokenizer_fields(tokenizer_dir: str | Path) -> dict:
    """tokens / token types / merges / special ids / chat template of a byte-level BPE tokenizer folder."""
    folder = Path(tokenizer_dir)
    source = folder / "tokenizer.json"
    if not source.is_file():
        raise ExportError(f"the run's tokenizer folder {folder} has no tokenizer.json (was the cache cleared? "
                          "re-run the export from a fresh training run)")
    spec = json.loads(source.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError(f"the tokenizer in {folder} is not a byte-level BPE ({model.get('type')}); GGUF export "
                          "supports byte-level BPE tokenizers (the tiny and smollm2 presets)")
    by_id: dict[int, str] = {int(i): token for token, i in model["vocab"].items()}
    special: set[int] = set()
    user: set[int] = set()
    for added in spec.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        (special if added.get("special") else user).add(int(added["id"]))
    size = max(by_id) + 1
    if len(by_id) != size:
        raise ExportError(f"the tokenizer in {folder} has gaps in its token ids ({len(by_id)} tokens, ids up to "
                          f"{size - 1}); GGUF needs ids 0..n-1")
    tokens = [by_id[i] for i in range(size)]
    token_types = [3 if i in special else 4 if i in user else 1 for i in range(size)]   # CONTROL / USER / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    fields = {"tokens": tokens, "token_types": token_types, "merges": merges}
    config = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text())
    index = {token: i for i, token in enumerate(tokens)}
    for key in ("bos", "eos", "pad", "unk"):
        value = config.get(f"{key}_token")
        if isinstance(value, dict):
            value = value.get("content")
        fields[key] = index.get(value) if isinstance(value, str) else None
    template = config.get("chat_template")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    fields["chat_template"] = template
    return fields
