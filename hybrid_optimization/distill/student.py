"""The student: a small LLaMA-style decoder (RMSNorm, rotary positions, SwiGLU, causal attention).

Its Linear layers are plain `nn.Linear` when built; `quantize_model` from the core then swaps them for
`QuantLinear` with the bits of the precision plan (or one bit-width for all), sharing the same Parameters. The token
embedding and the output head stay full precision, as in BitNet b1.58. The vocabulary is the reduced one of the
dataset (only the tokens the data uses), which makes the head cheap on a CPU.

Layer names follow Hugging Face LLaMA (`layers.0.attn.q_proj`, `layers.0.mlp.gate_proj`, ...), so module types in
the precision views read the same as for any LLaMA.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .presets import GGUF_ROW_MULTIPLE, STUDENT_SIZES


@dataclass
class StudentConfig:
    vocab_size: int
    d_model: int = 256
    n_layers: int = 1
    n_heads: int = 4
    d_ff: int = 512
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @classmethod
    def from_size(cls, size: str, vocab_size: int, max_seq_len: int) -> "StudentConfig":
        if size not in STUDENT_SIZES:
            raise ValueError(f"student size {size!r} is unknown; choose one of {', '.join(STUDENT_SIZES)}")
        d_model, n_layers, n_heads, d_ff = STUDENT_SIZES[size]
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff,
                   max_seq_len=max_seq_len)

    def to_dict(self) -> dict:
        return asdict(self)

    def gguf_unfriendly_linears(self) -> dict[str, str]:
        """{Linear kind: why} for the Linear layers whose rows llama.cpp cannot store ternary (empty: all fit)."""
        why = {}
        for kinds, in_features in ((("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"), self.d_model),
                                   (("down_proj",), self.d_ff)):
            if in_features % GGUF_ROW_MULTIPLE:
                for kind in kinds:
                    why[kind] = (f"row length {in_features} is not a multiple of {GGUF_ROW_MULTIPLE} "
                                 f"(llama.cpp's TQ1_0 / TQ2_0 block)")
        return why

    @classmethod
    def from_dict(cls, data: dict) -> "StudentConfig":
        return cls(**data)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)     # [L, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)                                    # [L, head_dim]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles (the 'rotate_half' form used by HF LLaMA)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: StudentConfig):
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(f"d_model={config.d_model} must be divisible by n_heads={config.n_heads}")
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        shape = (batch, length, self.n_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: StudentConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: StudentConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class StudentLM(nn.Module):
    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config.d_model // config.n_heads, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 / LLaMA style: N(0, 0.02); residual output projections scaled by 1/√(2·layers).
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence of {length} tokens is longer than max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        x = self.embed(ids)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
