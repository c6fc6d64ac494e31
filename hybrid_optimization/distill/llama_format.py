"""The student seen as a standard LLaMA with the tokenizer's full vocabulary — what GGUF and HF exports write.

Two differences between the student and a stock LLaMA are resolved here, once, for both exporters:

1. **Vocabulary.** The student's embedding and head cover only the tokens the training data uses (`vocab[i]` is the
   tokenizer id of student token i). A GGUF or HF file must carry the tokenizer itself, so the embedding and head are
   *expanded* to the tokenizer's full size: row `vocab[i]` holds the student's row i; every other row is zero. The
   logits of the used tokens are therefore exactly the student's (`full_logits[..., vocab] == student_logits`); the
   unused tokens get logit 0, which a sampler must not pick: the HF export lists them in
   `generation_config.suppress_tokens` (transformers' generate() masks them to -inf) and the GGUF export in
   llama.cpp's `tokenizer.ggml.suppress_tokens` (its common sampler biases them to -inf). A head row cannot be made
   -inf inside a bias-free LLaMA, so this is the honest way.
2. **Weights.** Quantized Linear layers are written dequantized (codes × scale), so any LLaMA reader sees exactly
   the weights the student computes with (codes × fp16 scale: exact in F16 and in TQ1_0 / TQ2_0 blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..quantization import QuantLinear
from ..quantization.quantizers import TERNARY_BITS
from .student import StudentLM

# student module name inside a block -> (HF LLaMA name, GGUF name)
LINEAR_NAMES = {
    "attn.q_proj": ("self_attn.q_proj", "attn_q"),
    "attn.k_proj": ("self_attn.k_proj", "attn_k"),
    "attn.v_proj": ("self_attn.v_proj", "attn_v"),
    "attn.o_proj": ("self_attn.o_proj", "attn_output"),
    "mlp.gate_proj": ("mlp.gate_proj", "ffn_gate"),
    "mlp.up_proj": ("mlp.up_proj", "ffn_up"),
    "mlp.down_proj": ("mlp.down_proj", "ffn_down"),
}
NORM_NAMES = {"attn_norm": ("input_layernorm", "attn_norm"), "mlp_norm": ("post_attention_layernorm", "ffn_norm")}


@dataclass
class LlamaTensor:
    student_name: str            # e.g. "layers.0.attn.q_proj.weight"
    hf_name: str                 # e.g. "model.layers.0.self_attn.q_proj.weight"
    gguf_name: str               # e.g. "blk.0.attn_q.weight"
    value: torch.Tensor          # float32, the weight the student computes with (dequantized where quantized)
    bits: float                  # 32 for full precision

    @property
    def is_ternary(self) -> bool:
        return self.bits == TERNARY_BITS


def check_vocab(vocab: torch.Tensor, tokenizer_size: int) -> torch.Tensor:
    vocab = torch.as_tensor(vocab, dtype=torch.long).reshape(-1)
    if vocab.numel() == 0 or int(vocab.min()) < 0 or int(vocab.max()) >= tokenizer_size \
            or vocab.unique().numel() != vocab.numel():
        raise ValueError(f"the student's vocabulary map does not fit a tokenizer of {tokenizer_size} tokens "
                         "(ids out of range or repeated)")
    return vocab


def expand_rows(rows: torch.Tensor, vocab: torch.Tensor, tokenizer_size: int) -> torch.Tensor:
    """[student_vocab, d] -> [tokenizer_size, d] with row vocab[i] = rows[i] and zeros elsewhere."""
    full = torch.zeros(tokenizer_size, rows.shape[1], dtype=torch.float32)
    full[vocab] = rows.detach().float().cpu()
    return full


def unused_token_ids(vocab: torch.Tensor, tokenizer_size: int) -> list[int]:
    used = torch.zeros(tokenizer_size, dtype=torch.bool)
    used[vocab] = True
    return torch.nonzero(~used).reshape(-1).tolist()


def llama_tensors(student: StudentLM, vocab: torch.Tensor, tokenizer_size: int) -> list[LlamaTensor]:
    """Every tensor of the student under its HF and GGUF LLaMA names (embedding and head expanded)."""
    vocab = check_vocab(vocab, tokenizer_size)
    student = student.eval()
    out = [LlamaTensor("embed.weight", "model.embed_tokens.weight", "token_embd.weight",
                       expand_rows(student.embed.weight, vocab, tokenizer_size), 32.0)]
    for index, block in enumerate(student.layers):
        for norm, (hf, gg) in NORM_NAMES.items():
            out.append(LlamaTensor(f"layers.{index}.{norm}.weight", f"model.layers.{index}.{hf}.weight",
                                   f"blk.{index}.{gg}.weight", _norm_weight(getattr(block, norm)), 32.0))
        for name, (hf, gg) in LINEAR_NAMES.items():
            module = block.get_submodule(name)
            out.append(_linear(module, f"layers.{index}.{name}.weight", f"model.layers.{index}.{hf}.weight",
                               f"blk.{index}.{gg}.weight"))
    out.append(LlamaTensor("norm.weight", "model.norm.weight", "output_norm.weight", _norm_weight(student.norm), 32.0))
    head = _linear(student.lm_head, "lm_head.weight", "lm_head.weight", "output.weight")
    if head.bits < 16:
        raise ValueError("the student's output head is quantized; GGUF / HF exports keep the head at full precision "
                         "(train with the head unquantized, the default)")
    head.value = expand_rows(head.value, vocab, tokenizer_size)
    out.append(head)
    return out


def _norm_weight(norm: torch.nn.RMSNorm) -> torch.Tensor:
    if norm.weight is None:
        return torch.ones(norm.normalized_shape, dtype=torch.float32)
    return norm.weight.detach().float().cpu().clone()


def _linear(module, student_name: str, hf_name: str, gguf_name: str) -> LlamaTensor:
    if module.bias is not None:
        raise ValueError(f"{student_name}: LLaMA Linear layers have no bias")
    if isinstance(module, QuantLinear) and module.is_quantized:
        if module.act_bits is not None:
            raise ValueError(f"{student_name} quantizes its input activations to {module.act_bits} bits, which "
                             "GGUF / HF LLaMA cannot express; export the packed format instead")
        q = module.quantized_weight()
        return LlamaTensor(student_name, hf_name, gguf_name, q.dequantize().float().cpu(), q.bits)
    return LlamaTensor(student_name, hf_name, gguf_name, module.weight.detach().float().cpu().clone(), 32.0)


def permute_for_gguf(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half rotary layout to llama.cpp's interleaved one (convert_hf_to_gguf's
    `permute`); transformers undoes it when it reads a GGUF. Whole rows move, so ternary rows stay intact."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))
