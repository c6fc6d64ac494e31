"""Export the student as a Hugging Face `LlamaForCausalLM` folder that transformers loads offline:
`config.json`, `model.safetensors` (float32; ternary Linear weights dequantized to codes × scale, exactly what the
student computes with), `generation_config.json` and the run's tokenizer files.

The vocabulary is the tokenizer's full one (llama_format.py: embedding and head expanded, unused rows zero);
`generation_config.suppress_tokens` lists the unused ids, so `model.generate()` never samples a token the student
was not trained on. The folder is built under a temporary name and swapped in, so a failed export leaves nothing.
Every file gets the mode an ordinary write gives (0644 under the usual umask), like the other exports: safetensors
creates model.safetensors 0600.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .export import ExportError, atomic_folder
from .llama_format import llama_tensors, unused_token_ids
from .student import StudentLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")


@dataclass
class HFExportReport:
    path: str
    folder_bytes: int
    n_params: int
    n_unused_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_line(self) -> str:
        return (f"HF folder {self.path} ({self.folder_bytes / 2**20:.2f} MiB, LlamaForCausalLM, "
                f"{self.n_params / 1e6:.2f} M parameters with the tokenizer's full vocabulary)")


def export_hf(student: StudentLM, vocab: torch.Tensor, tokenizer_dir: str | Path, path: str | Path) -> HFExportReport:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ExportError(f"the run's tokenizer folder {tokenizer_dir} has no tokenizer.json (was the cache "
                          "cleared? re-run the export from a fresh training run)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = len(tokenizer)
    tensors = llama_tensors(student, vocab, size)
    unused = unused_token_ids(torch.as_tensor(vocab), size)
    c = student.config
    config = LlamaConfig(
        vocab_size=size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads, head_dim=c.d_model // c.n_heads,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"], dtype="float32")
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, suppress_tokens=unused or None)
    with atomic_folder(path) as tmp:
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        save_file({t.hf_name: t.value.contiguous() for t in tensors}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        copied = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
        for name in copied:
            shutil.copy2(tokenizer_dir / name, tmp / name)
        mode = regular_file_mode()
        for file in tmp.iterdir():
            os.chmod(file, mode)
    folder = Path(path)
    if not folder.is_dir():
        raise ExportError(f"the HF export folder {folder} was not created")
    return HFExportReport(path=str(folder), folder_bytes=sum(f.stat().st_size for f in folder.iterdir()),
                          n_params=sum(t.value.numel() for t in tensors), n_unused_tokens=len(unused))


def regular_file_mode() -> int:
    """0666 less the process's umask: the mode open() gives a new file (os.umask can only be read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask
