"""The optimizer menu: `--optimizer`, `--schedule`, `--warmup_steps` and `--hybrid`, built in one place.

    build_optimizer(model, optimizer="muon", schedule="cosine", lr=1e-3, warmup_steps=10, total_steps=200)
        -> (optimizer, lr_scheduler or None)

The menu (schema.BASE_OPTIMIZERS, schema.SCHEDULES):
    adamw           torch.optim.AdamW (decoupled weight decay), betas (0.9, 0.999)
    sgd             torch.optim.SGD with momentum 0.9
    muon            torch.optim.Muon on the 2-D hidden matrices + AdamW on the embedding, norms and head
                    (optim.MuonWithAdamW; Moonlight's match_rms_adamw rule lets one LR drive both)
    schedule-free   PyPI schedulefree AdamWScheduleFree (Defazio et al. 2024): no schedule, its own warmup, and
                    weights that must be switched with optimizer.eval() / .train() around every evaluation,
                    checkpoint and export (set_optimizer_mode)
    prodigy         PyPI prodigyopt Prodigy (Mishchenko & Defazio 2024), LR-free: it estimates the step size d
                    itself; `lr` is the factor on that estimate (1.0 is the method's own choice)
    schedules       constant | cosine (to 0 at the last step) | wsd (warmup, stable, linear decay to 0 over the
                    last 20 %), each after `warmup_steps` of linear warmup, as a torch LambdaLR so that its state
                    is one integer in the checkpoint and a resumed run continues exactly; hybrid-cosine (hybrid
                    only): the same warmup + cosine inside the HybridOptimizer (warmup_steps, decay_steps), which
                    anneals its aux net's meta-learning rate by the same factor (state: the optimizer's step)
    hybrid          HybridOptimizer (optim.py) on the adamw, sgd or muon base: its learned LR multiplier and its
                    trust region act on that base's direction (muon: hidden matrices with base="muon", AdamW for
                    the rest — the same split as `--optimizer muon`)

What combines with what is one torch-free rule, schema.optimizer_combination_error (here `combination_error`): the
CLI's validation calls it before torch is imported; build_optimizer calls it again.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

from .schema import optimizer_combination_error as combination_error  # noqa: F401  (the menu's one rule)
from .schema import default_warmup_steps

WSD_DECAY_FRACTION = 0.2        # wsd: the share of the steps spent decaying (Hägele et al. 2024 use 10–20 %)
MUON_MOMENTUM = 0.95            # torch.optim.Muon's default (Nesterov)
SGD_MOMENTUM = 0.9
PRODIGY_DEFAULT_LR = 1.0        # Prodigy's lr multiplies its own estimate; 1.0 is the method's setting


def schedule_factor(schedule: str, warmup_steps: int, total_steps: int, step: int) -> float:
    """The LR factor at `step` (steps taken so far): linear warmup over `warmup_steps`, then the schedule.
    cosine is the controller's rule (HybridController.schedule_factor with decay_steps = total_steps), so a
    benchmark method built here is the one its committed runs measured."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay = max(1, round(WSD_DECAY_FRACTION * total_steps))
        start = max(warmup_steps, total_steps - decay)
        if step < start:
            return 1.0
        return max(0.0, (total_steps - step) / (total_steps - start + 1))   # the last step still moves a little
    return 1.0


def param_split(model) -> tuple[list, list]:
    """(hidden 2-D matrices, everything else) of the trainable parameters: Muon's share and AdamW's."""
    from .optim import is_hidden_matrix
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return ([p for n, p in named if is_hidden_matrix(n, p)], [p for n, p in named if not is_hidden_matrix(n, p)])


def hybrid_param_groups(model, base: str) -> list[dict]:
    """The HybridOptimizer's groups for `base`: one group, or for muon the hidden matrices with Muon's direction
    and the rest with AdamW's (as `--optimizer muon`), both under the one multiplier and trust region."""
    if base != "muon":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "base": base}]
    hidden, other = param_split(model)
    if not hidden:
        raise ValueError("Muon needs at least one 2-D hidden weight matrix; this model has none")
    groups = [{"params": hidden, "base": "muon", "momentum": MUON_MOMENTUM}]
    if other:
        groups.append({"params": other, "base": "adamw"})
    return groups


def build_optimizer(model, *, optimizer: str = "adamw", schedule: str = "constant", lr: float = 1e-3,
                    warmup_steps: int | None = 0, total_steps: int = 1, weight_decay: float = 1e-5,
                    betas: tuple[float, float] = (0.9, 0.999), hybrid=None, n_clusters: int | None = None,
                    hybrid_overrides: dict | None = None):
    """(optimizer, LambdaLR or None) for `model`.

    hybrid : a HybridTrainingConfig to wrap the `optimizer` base in the HybridOptimizer (its aux net, trust region
             and clusters from the config; lr and weight decay from the arguments); None: the plain optimizer.
    n_clusters : data clusters fed to the hybrid's aux net (None: no cluster feature).
    hybrid_overrides : extra HybridOptimizer keyword arguments (the benchmark's ablations).
    warmup_steps : None = the CLI's unset --warmup_steps (schema.default_warmup_steps: 5 % of total_steps with a
             schedule or Schedule-Free, else 0)."""
    message = combination_error(optimizer, schedule, hybrid is not None, warmup_steps, total_steps)
    if message:
        raise ValueError(message)
    if warmup_steps is None:
        warmup_steps = default_warmup_steps(optimizer, schedule, total_steps)
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    own_warmup = False
    if hybrid is not None:
        from .optim import HybridOptimizer
        overrides = dict(hybrid_overrides or {})
        if schedule == "hybrid-cosine":       # the hybrid's own warmup + cosine (its meta-learning annealed with it)
            overrides.update(warmup_steps=int(warmup_steps), decay_steps=int(total_steps))
            own_warmup = True
        opt = HybridOptimizer.from_config(hybrid_param_groups(model, optimizer), hybrid, quantization_bits=None,
                                          n_clusters=n_clusters, lr=lr, weight_decay=weight_decay, base=optimizer,
                                          **overrides)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    elif optimizer == "muon":
        from .optim import MuonWithAdamW
        opt = MuonWithAdamW(model, lr, weight_decay=weight_decay, betas=betas, momentum=MUON_MOMENTUM)
    elif optimizer == "schedule-free":
        import schedulefree
        opt = schedulefree.AdamWScheduleFree(params, lr=lr, betas=betas, weight_decay=weight_decay,
                                             warmup_steps=warmup_steps)
        own_warmup = True
    else:                                           # prodigy (combination_error has refused anything else)
        import contextlib
        import io

        import prodigyopt
        # safeguard_warmup: Prodigy's authors' setting when the LR warms up (keeps d from growing on tiny steps).
        # Its constructor prints a line; stdout belongs to the run (--quiet's first line is the run id).
        with contextlib.redirect_stdout(io.StringIO()):
            opt = prodigyopt.Prodigy(params, lr=lr, betas=betas, weight_decay=weight_decay,
                                     safeguard_warmup=warmup_steps > 0)
    set_optimizer_mode(opt, "train")
    if own_warmup or (schedule == "constant" and warmup_steps == 0):
        return opt, None
    factor = partial(schedule_factor, schedule, int(warmup_steps), int(total_steps))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def set_optimizer_mode(optimizer: Any, mode: str) -> None:
    """Schedule-Free keeps two weight sequences: .eval() puts the averaged weights (what is evaluated, saved for
    use and exported) into the model, .train() the ones it steps from. Every other optimizer of the menu has
    neither method, and this is a no-op for it. Idempotent (schedulefree checks its own mode)."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be train or eval, got {mode!r}")
    method = getattr(optimizer, mode, None)
    if callable(method) and not hasattr(optimizer, "parameters"):      # not an nn.Module's train()/eval()
        method()
