"""AuxiliaryNeuralNetwork: a small meta-learner that predicts the LR multiplier and the trust radius, online.

Architecture: the six normalised TrainingState features -> Linear(6, hidden) -> tanh -> Linear(hidden, 2).
The two outputs are squashed in log space into the guide's ranges:

    log m = log(10) · tanh(z₁)                       m ∈ [0.1, 10]
    log μ = c + h · tanh(z₂ + b₀)                    μ ∈ [0.001, 1.0]   (c, h: centre and half-width in log space)

The output layer starts at zero (and b₀ is chosen so that μ equals `initial_trust_radius`), so an untrained network
predicts exactly m = 1 and μ = initial radius: it cannot harm training before it has learned anything.

How it learns (`update_with_feedback`, one Adam step of its own, learning rate `learning_rate`):

* LR head — hypergradient descent (Baydin et al., 2018). After an update Δ_{t-1} = m·(base step), the next
  gradient g_t gives dL_t/d log m = g_t · Δ_{t-1}. Its sign says whether a larger multiplier would have lowered the
  loss. We use the cosine cos(g_t, Δ_{t-1}) ∈ [-1, 1] (scale-free, so it works the same for any model), and descend
  the surrogate  cos · log m(s_{t-1})  with respect to the network weights: the multiplier predicted for state s_{t-1}
  falls when the step overshot (cos > 0) and rises when it undershot (cos < 0).
* Radius head — the classic trust-region rule (Nocedal & Wright, Alg. 4.1): the agreement ratio
  ρ = actual loss reduction / predicted (first-order) reduction. ρ < 0.25: the model of the loss was poor → the
  radius should shrink (×0.5); ρ > 0.75 while the constraint was binding → it should grow (×2); otherwise keep it.
  The head regresses log μ(s_{t-1}) toward that target.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .controller import LR_RANGE, RADIUS_RANGE, trust_region_factor  # noqa: F401  (the ranges are the controller's)
from .state import TrainingState

class AuxiliaryNeuralNetwork(nn.Module):
    def __init__(self, input_size: int = 6, hidden_size: int = 16, learning_rate: float = 0.001,
                 initial_trust_radius: float = 0.01, lr_range: tuple[float, float] = LR_RANGE,
                 radius_range: tuple[float, float] = RADIUS_RANGE):
        super().__init__()
        if input_size != 6:
            raise ValueError(f"input_size must be 6 (the six TrainingState features), got {input_size}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be an integer ≥ 1, got {hidden_size!r}")
        if not (learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
        lo, hi = radius_range
        if not (lo <= initial_trust_radius <= hi):
            raise ValueError(f"initial_trust_radius must lie in [{lo}, {hi}], got {initial_trust_radius!r}")
        self.input_size, self.hidden_size, self.learning_rate = input_size, hidden_size, learning_rate
        self.log_lr_max = math.log(lr_range[1])
        self.log_lr_min = math.log(lr_range[0])
        self.radius_centre = (math.log(lo) + math.log(hi)) / 2
        self.radius_half = (math.log(hi) - math.log(lo)) / 2

        self.body = nn.Sequential(nn.Linear(input_size, hidden_size), nn.Tanh())
        self.head = nn.Linear(hidden_size, 2)
        nn.init.zeros_(self.head.weight)   # identity at start: m = 1, μ = initial radius
        with torch.no_grad():
            self.head.bias.zero_()
            ratio = (math.log(initial_trust_radius) - self.radius_centre) / self.radius_half
            self.head.bias[1] = math.atanh(max(min(ratio, 0.999999), -0.999999))
        self.meta_optimizer = torch.optim.Adam(self.parameters(), lr=learning_rate)
        self.meta_updates = 0

    # -- prediction -------------------------------------------------------------------------------------------------
    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log LR multiplier and log trust radius for a batch (or one vector) of normalised features."""
        z = self.head(self.body(features.to(self.head.weight.dtype)))
        z_lr, z_radius = z[..., 0], z[..., 1]
        # Symmetric squashing in log space keeps m = 1 at z = 0; the range may be asymmetric around 1.
        log_m = torch.where(z_lr >= 0, self.log_lr_max * torch.tanh(z_lr), -self.log_lr_min * torch.tanh(z_lr))
        log_radius = self.radius_centre + self.radius_half * torch.tanh(z_radius)
        return log_m, log_radius

    @torch.no_grad()
    def predict(self, state: TrainingState | torch.Tensor) -> tuple[float, float]:
        """(LR multiplier, trust radius) for one training state."""
        log_m, log_radius = self(_features(state))
        return math.exp(float(log_m)), math.exp(float(log_radius))

    def predict_learning_rate(self, state: TrainingState | torch.Tensor) -> float:
        return self.predict(state)[0]

    def predict_trust_region(self, state: TrainingState | torch.Tensor) -> float:
        return self.predict(state)[1]

    # -- learning ---------------------------------------------------------------------------------------------------
    def update_with_feedback(self, state: TrainingState | torch.Tensor, *, hypergradient: float | None = None,
                             rho: float | None = None, constraint_active: bool = False,
                             loss_before: float | None = None, loss_after: float | None = None,
                             predicted_reduction: float | None = None) -> dict[str, float]:
        """One meta-learning step from the outcome of the update taken in `state`.

        hypergradient : the normalised hypergradient cos(g_t, Δ_{t-1}) (or any signal whose sign says "the
                        multiplier was too large" when positive); clipped to [-1, 1].
        rho           : trust-region agreement ratio actual/predicted reduction; alternatively give
                        loss_before, loss_after and predicted_reduction and it is computed here.
        constraint_active : whether the trust region bound the update taken in `state`.
        Returns the signals used and the meta-loss, for logging.
        """
        if rho is None and None not in (loss_before, loss_after, predicted_reduction) and predicted_reduction > 0:
            rho = (loss_before - loss_after) / predicted_reduction
        lr_signal = None
        if hypergradient is not None and math.isfinite(hypergradient):
            lr_signal = max(-1.0, min(1.0, float(hypergradient)))
        factor = trust_region_factor(rho, constraint_active)
        if lr_signal is None and factor == 1.0 and rho is None:
            return {"meta_loss": 0.0, "lr_signal": float("nan"), "rho": float("nan"), "radius_factor": 1.0}

        with torch.enable_grad():   # optimizers step under no_grad; the meta-learner needs its own graph
            log_m, log_radius = self(_features(state))
            meta_loss = torch.zeros(())
            if lr_signal is not None:
                meta_loss = meta_loss + lr_signal * log_m
            if rho is not None and math.isfinite(rho):
                target = (log_radius.detach() + math.log(factor)).clamp(self.radius_centre - self.radius_half,
                                                                        self.radius_centre + self.radius_half)
                meta_loss = meta_loss + 0.5 * (log_radius - target) ** 2
            self.meta_optimizer.zero_grad(set_to_none=True)
            if meta_loss.requires_grad:
                meta_loss.backward()
                self.meta_optimizer.step()
                self.meta_updates += 1
        return {"meta_loss": float(meta_loss.detach()), "lr_signal": float("nan") if lr_signal is None else lr_signal,
                "rho": float("nan") if rho is None else float(rho), "radius_factor": factor}

    # -- checkpointing: the meta-optimizer's moments travel with the weights when asked ----------------------------
    def full_state_dict(self) -> dict:
        return {"weights": self.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "meta_updates": self.meta_updates}

    def load_full_state_dict(self, state: dict) -> None:
        self.load_state_dict(state["weights"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.meta_updates = int(state.get("meta_updates", 0))


def features(state: TrainingState) -> torch.Tensor:
    """The net's input: the state's normalised features (float32, shape [6])."""
    return torch.tensor(state.feature_values(), dtype=torch.float32)


def _features(state: TrainingState | torch.Tensor) -> torch.Tensor:
    if isinstance(state, TrainingState):
        return features(state)
    return torch.as_tensor(state, dtype=torch.float32)
