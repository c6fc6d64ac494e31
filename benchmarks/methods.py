"""The methods compared by the hybrid benchmark (issue 6), each a recipe for (optimizer, LR schedule, sampler).

    R    AdamW + linear warmup + cosine decay, base LR tuned on a separate seed from a small grid (the reference)
    B1   AdamW at constant LR 0.001 (the guide's baseline; what `distillation.py` without --hybrid runs)
    B2   R + gradient-norm clipping at 1.0
    B3   Schedule-Free AdamW (PyPI `schedulefree`) with R's tuned LR and warmup (no schedule to tune)
    H    the full hybrid exactly as `distillation.py --hybrid` runs it (issue 6's settings):
         HybridOptimizer.from_config (aux net, trust region), mixed cluster-balanced batches (every batch an equal
         share of each data cluster, repetition cap 2), per-layer precision plan after 10 % of the steps; LR 0.001
         (the guide's), untuned — correcting the LR is the aux net's job. The optimizer's built-in warmup + cosine
         schedule (H-sched) and a repetition cap of 1 (H-cap1) were measured and are off: on these short budgets
         each cost more than it gave
    H-aux / H-TR / H-data / H-param / H-frozen   ablations of H: without the aux net, without the trust region,
         without data clustering, without parameter clustering, and with a frozen (untrained = identity) aux net
    H0   the hybrid before issue 6: the optimizer's old behaviour (`PRE_ISSUE6`), one cluster per batch

Every method's LR is "base LR × workload scale" (W4 scales it by 10 and 0.1). Weight decay and betas are the
pipeline's defaults (HybridTrainingConfig: 1e-5, (0.9, 0.999)) for every method, so only the optimizer differs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from hybrid_optimization import HybridOptimizer, HybridTrainingConfig
from hybrid_optimization.optimizers import build_optimizer as menu_build
from hybrid_optimization.schema import scheduled_warmup_steps

GUIDE_LR = 1e-3
CLIP_NORM = 1.0
# HybridOptimizer keyword arguments that restore its behaviour before issue 6 (the "before" of before/after).
PRE_ISSUE6: dict = {"rho_from": "losses", "projected_hypergradient": False, "aux_radius": "direct"}
# HybridTrainingConfig values H sets on top of the pipeline's defaults. The committed quick, medium and variants
# runs were made with the absolute trust region, --hybrid's default until issue 16 made it rms: pinned, so that H
# and every variant built on it stay the runs those reports measured. The new default is measured as H-rms by the
# robustness protocol (benchmarks/robustness.py).
RECOMMENDED: dict = {"trust_region_mode": "absolute"}
# HybridOptimizer arguments every committed hybrid run was made with, pinned under each method's own overrides for
# the same reason: a later change of the optimizer's defaults must not change what a journal's method key means.
# (The LR head's hypergradient through the trust-region projection; H-rms-free and H-noProj set it off.)
PINNED_OPTIMIZER: dict = {"projected_hypergradient": True}


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    optimizer: str                          # schema.BASE_OPTIMIZERS (the product's --optimizer) | hybrid
    schedule: str = "constant"              # constant | warmup_cosine
    clip: float | None = None
    tuned_lr: bool = False                  # True: base LR = the workload's tuned LR; False: the guide's 0.001
    data_clustering: bool = False
    param_clustering: bool = False
    config: dict = field(default_factory=dict)          # HybridTrainingConfig overrides
    optimizer_kwargs: dict = field(default_factory=dict)  # HybridOptimizer overrides (from_config(**kwargs))
    builtin_schedule: bool = False          # hybrid: warmup_steps / decay_steps from the run's length
    mixed_batches: bool = False             # data clustering: balanced mixed batches instead of one cluster each
    groups: str = "one"                     # hybrid: one (base adamw) | muon (--hybrid --optimizer muon) | roles
    plan_fraction: float | None = None      # precision plan after this share of the steps (None: the pipeline's)

    @property
    def is_hybrid(self) -> bool:
        return self.optimizer == "hybrid"


R = Method("R", "AdamW + warmup + cosine (tuned LR)", "adamw", "warmup_cosine", tuned_lr=True)
B1 = Method("B1", "AdamW, constant LR 1e-3 (guide baseline)", "adamw")
B2 = Method("B2", "R + grad-norm clipping 1.0", "adamw", "warmup_cosine", clip=CLIP_NORM, tuned_lr=True)
B3 = Method("B3", "Schedule-Free AdamW (R's LR)", "schedule-free", tuned_lr=True)
H = Method("H", "Hybrid, full (= distillation.py --hybrid --trust_region_mode absolute, guide LR 1e-3)", "hybrid",
           data_clustering=True,
           param_clustering=True, config=RECOMMENDED, mixed_batches=True)
ABLATIONS = (
    replace(H, key="H-aux", label="H without aux net", config={**RECOMMENDED, "use_auxiliary_nn": False}),
    replace(H, key="H-TR", label="H without trust region", config={**RECOMMENDED, "use_trust_region": False}),
    replace(H, key="H-data", label="H without data clustering", data_clustering=False),
    replace(H, key="H-param", label="H without parameter clustering", param_clustering=False),
    replace(H, key="H-frozen", label="H with frozen untrained aux net", optimizer_kwargs={"meta_learning": False}),
)
H0 = replace(H, key="H0", label="Hybrid before issue 6 (old optimizer, one cluster per batch)",
             optimizer_kwargs=PRE_ISSUE6, mixed_batches=False)
# Each of issue 6's changes taken back out of H on its own (the `--changes` mode): the per-change before/after.
CHANGES = (
    replace(H, key="H-rhoLoss", label="H, ρ from loss differences (old)",
            optimizer_kwargs={"rho_from": "losses"}),
    replace(H, key="H-noProj", label="H, hypergradient not through the projection (old)",
            optimizer_kwargs={"projected_hypergradient": False}),
    replace(H, key="H-direct", label="H, radius = aux net's prediction alone (old)",
            optimizer_kwargs={"aux_radius": "direct"}),
    replace(H, key="H-sched", label="H with the built-in warmup + cosine (old)", builtin_schedule=True),
    replace(H, key="H-single", label="H, one data cluster per batch (old)", mixed_batches=False),
    replace(H, key="H-sched-noAnneal", label="H-sched, meta-learning rate not annealed", builtin_schedule=True,
            optimizer_kwargs={"anneal_meta_learning": False}),
    replace(H, key="H-cap1", label="H, repetition cap 1", config={"max_sample_repeats": 1}),
)
MAIN = (R, B1, B2, B3, H)
ALL = {m.key: m for m in (*MAIN, *ABLATIONS, H0, *CHANGES)}


def hybrid_config(method: Method, lr: float, bits: float, steps: int, batch_size: int, seed: int,
                  data_clusters: int = 8, param_clusters: int = 4) -> HybridTrainingConfig:
    """The HybridTrainingConfig the pipeline builds for these options (TrainOptions.hybrid_training_config)."""
    values = dict(base_learning_rate=lr, batch_size=batch_size, max_steps=steps, seed=seed,
                  data_clusters=data_clusters, parameter_clusters=param_clusters, use_quantization=bits < 16)
    if bits < 16:
        values["target_bits"] = bits
    values.update(method.config)
    return HybridTrainingConfig(**values)


def _role(name: str) -> str:
    if name.startswith("embed"):
        return "embedding"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "head_and_norms"


def role_param_groups(model: torch.nn.Module) -> list[dict]:
    """One HybridOptimizer param group per role (embedding, attention, MLP, head + norms): the research variant
    H-cm's per-layer-type hypergradient LR factors (cluster_multipliers). Not on the product's menu."""
    roles: dict[str, list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            roles.setdefault(_role(n), []).append(p)
    return [{"params": params} for params in roles.values()]


def build_optimizer(method: Method, model: torch.nn.Module, cfg: HybridTrainingConfig, steps: int,
                    n_clusters: int | None):
    """(optimizer, lr_scheduler or None) for `method` on `model`: the product's own menu
    (hybrid_optimization.optimizers.build_optimizer, what `distillation.py --optimizer … --schedule … --hybrid`
    builds), so what the report measures is what a user runs. Only H-cm's per-role groups are built here."""
    warmup = scheduled_warmup_steps(steps)     # the product's unset --warmup_steps (AlgoPerf's NAdamW: ~5 %)
    schedule = menu_schedule(method)
    # schedule-free: its own warmup, no schedule
    warmup_steps = warmup if schedule != "constant" or method.optimizer == "schedule-free" else 0
    if method.is_hybrid:
        overrides = {**PINNED_OPTIMIZER, **method.optimizer_kwargs}
        # settings that are HybridTrainingConfig fields reach the optimizer through the config, as a user's do
        cfg = replace(cfg, **{k: overrides.pop(k) for k in list(overrides) if k in CONFIG_FIELDS})
        clusters = n_clusters if method.data_clustering else None
        if method.groups == "roles":
            if method.builtin_schedule:                       # the optimizer's own warmup + cosine
                overrides.update(warmup_steps=warmup, decay_steps=steps)
            return HybridOptimizer.from_config(role_param_groups(model), cfg, quantization_bits=None,
                                               n_clusters=clusters, **overrides), None
        base = {"one": "adamw", "muon": "muon"}.get(method.groups)
        if base is None:
            raise ValueError(f"unknown param grouping {method.groups!r}: use one, muon or roles")
        return menu_build(model, optimizer=base, schedule=schedule, lr=cfg.base_learning_rate,
                          warmup_steps=warmup_steps, total_steps=steps, weight_decay=cfg.weight_decay, hybrid=cfg,
                          n_clusters=clusters, hybrid_overrides=overrides)
    lr = cfg.base_learning_rate
    if method.optimizer == "prodigy":        # LR-free: the grid's LR becomes the factor on Prodigy's own estimate
        lr = lr / GUIDE_LR                   # (the guide's LR ↦ 1.0, the method's own setting; the grid spans 100×)
    return menu_build(model, optimizer=method.optimizer, schedule=schedule, lr=lr, warmup_steps=warmup_steps,
                      total_steps=steps, weight_decay=cfg.weight_decay)


CONFIG_FIELDS = frozenset(f.name for f in fields(HybridTrainingConfig))
# Pipeline settings the product's flags cannot express; a method that needs one has no product command.
_NOT_A_FLAG = ("clip", "plan_fraction")


def menu_schedule(method: Method) -> str:
    """The product's --schedule that runs `method`'s LR schedule: hybrid-cosine for the hybrid's own warmup + cosine
    (H-sched), cosine for warmup + cosine on the base LR, else constant (Schedule-Free: its own warmup only)."""
    if method.is_hybrid and method.builtin_schedule:
        return "hybrid-cosine"
    return "cosine" if method.schedule == "warmup_cosine" and method.optimizer != "schedule-free" else "constant"


def product_flags(method: Method, lr: float) -> tuple[list[str], dict]:
    """(flags, config): the `distillation.py` flags that train `method` at `lr` as the benchmark does — on top of
    the workload's own data, size and length flags and --ternary --qat — and the HybridTrainingConfig fields a
    `--config FILE.json` must add ({} when none). The robustness report prints them, and
    tests/test_tracks_smoke.py checks that the product builds the same optimizer from them. Raises ValueError for a
    method only the benchmark can build (an ablation of the optimizer's internals, clipping, a later plan)."""
    plain = Method(method.key, "", method.optimizer)
    if method.groups == "roles" or any(getattr(method, name) != getattr(plain, name) for name in _NOT_A_FLAG):
        raise ValueError(f"{method.key} has no product command (benchmark-only settings)")
    if not method.is_hybrid:
        flags = ["--optimizer", method.optimizer] if method.optimizer != "adamw" else []
        if menu_schedule(method) != "constant":
            flags += ["--schedule", menu_schedule(method)]
        # Prodigy: the grid's LR is the factor on its own estimate (build_optimizer above)
        return flags + ["--lr", f"{lr / GUIDE_LR if method.optimizer == 'prodigy' else lr:g}"], {}
    extra = {**PINNED_OPTIMIZER, **method.optimizer_kwargs}
    unknown = sorted(set(extra) - CONFIG_FIELDS)
    if unknown or not (method.data_clustering and method.param_clustering and method.mixed_batches):
        raise ValueError(f"{method.key} has no product command (benchmark-only settings: "
                         f"{', '.join(unknown) or 'clustering'})")
    flags = ["--hybrid", *(["--optimizer", "muon"] if method.groups == "muon" else []), "--schedule", menu_schedule(method),
             "--lr", f"{lr:g}"]
    config = dict(method.config)
    if "trust_region_mode" in config:
        flags += ["--trust_region_mode", config.pop("trust_region_mode")]
    defaults = HybridTrainingConfig()
    config.update({k: v for k, v in extra.items() if v != getattr(defaults, k)})
    return flags, config
