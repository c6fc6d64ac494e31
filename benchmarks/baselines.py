"""The baselines of the AlgoPerf-style tracks (issue 10), next to the hybrid: what a user could run instead.

Every one is an entry of the product's optimizer menu (hybrid_optimization/optimizers.py, `distillation.py
--optimizer … --schedule … --warmup_steps …`); the benchmark builds them through that same `build_optimizer`
(benchmarks/methods.py), so there is no optimizer code of the benchmark's own here.

    AdamW        --optimizer adamw --schedule constant (the guide's baseline: `distillation.py` without --hybrid)
    AdamW-cos    --optimizer adamw --schedule cosine --warmup_steps 5 % (AlgoPerf's reference recipe)
    SF-AdamW     --optimizer schedule-free --warmup_steps 5 % (Defazio et al. 2024; PyPI `schedulefree`), the
                 winner of AlgoPerf's self-tuning track; evaluated at its averaged weights
    Muon         --optimizer muon --schedule cosine --warmup_steps 5 %: torch.optim.Muon on the 2-D hidden matrices
                 (attention and MLP projections) + AdamW on the embedding, the norms and the output head, as its
                 authors use it (Jordan et al. 2024; "Muon is Scalable", Liu et al. 2025);
                 adjust_lr_fn="match_rms_adamw" (Moonlight's rule) lets the one base LR of the grid drive both parts;
                 momentum 0.95, Nesterov, 5 Newton–Schulz steps (torch's defaults)
    Prodigy      --optimizer prodigy --schedule cosine --warmup_steps 5 % (Mishchenko & Defazio 2024; PyPI
                 `prodigyopt`), the LR-free anchor: it estimates its own step size; the grid's LR is read as the
                 factor on that estimate relative to the guide's 1e-3 (1e-3 ↦ 1.0, its authors' setting)

All share the pipeline's weight decay and betas, so only the optimizer (and its schedule) differs.
"""
from hybrid_optimization.optim import MuonWithAdamW, is_hidden_matrix  # noqa: F401  (where they used to live)
