"""The baselines of the AlgoPerf-style tracks (issue 10), next to the hybrid: what a user could run instead.

    AdamW        AdamW at a constant LR (the guide's baseline: `distillation.py` without --hybrid)
    AdamW-cos    AdamW + linear warmup (5 % of the steps) + cosine decay to 0 (AlgoPerf's reference recipe)
    SF-AdamW     Schedule-Free AdamW (Defazio et al. 2024; PyPI `schedulefree`, warmup 5 %), the winner of
                 AlgoPerf's self-tuning track; evaluated at its averaged weights
    Muon         torch.optim.Muon on the 2-D hidden matrices (attention and MLP projections) + AdamW on the
                 embedding, the norms and the output head, as its authors use it (Jordan et al. 2024; "Muon is
                 Scalable", Liu et al. 2025), with the same warmup + cosine schedule as AdamW-cos.
                 adjust_lr_fn="match_rms_adamw" (Moonlight's rule: update RMS matched to AdamW's, 0.2·√max(A, B))
                 lets the one base LR of the grid drive both parts, which is what "the same LR grid for every
                 method" needs; momentum 0.95, Nesterov, 5 Newton–Schulz steps (torch's defaults)

All share the pipeline's weight decay and betas, so only the optimizer (and its schedule) differs.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch


def is_hidden_matrix(name: str, param: torch.nn.Parameter) -> bool:
    """Muon's share of the student: 2-D weights inside the transformer blocks (not the embedding, not the head)."""
    return param.ndim == 2 and not name.startswith(("embed", "lm_head"))


class _States(Mapping):
    """Read-only view of several optimizers' `state` dicts. (Not collections.ChainMap: its lookups would go through
    the first optimizer's defaultdict, which creates an empty entry for every key it lacks.)"""

    def __init__(self, *maps):
        self.maps = maps

    def __getitem__(self, key):
        for m in self.maps:
            if key in m:
                return m[key]
        raise KeyError(key)

    def __iter__(self):
        for m in self.maps:
            yield from m

    def __len__(self) -> int:
        return sum(len(m) for m in self.maps)


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer object over two torch optimizers: Muon for the hidden matrices, AdamW for the rest.

    Its `param_groups` are the two inner optimizers' own group dicts, so an LR scheduler (or any code that writes
    group["lr"]) drives both; `state` is a live read-only view of both states (for the memory figures)."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 1e-5,
                 betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.95):
        hidden = [p for n, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(n, p)]
        other = [p for n, p in model.named_parameters() if p.requires_grad and not is_hidden_matrix(n, p)]
        if not hidden:
            raise ValueError("Muon needs at least one 2-D hidden weight matrix; this model has none")
        super().__init__([*hidden, *other], {"lr": lr})          # hooks and bookkeeping of torch's Optimizer
        self.muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(other, lr=lr, betas=betas, weight_decay=weight_decay) if other else None
        inner = [self.muon] + ([self.adamw] if self.adamw is not None else [])
        self.param_groups = [g for o in inner for g in o.param_groups]
        self.state = _States(*(o.state for o in inner))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
