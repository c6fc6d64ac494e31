"""HybridOptimizer where users train: a plain PyTorch loop, `transformers.Trainer(optimizers=(opt, sched))` and a
LightningModule's `configure_optimizers`. Each trains the same small regression model (the loss must fall to under
half its start) and resumes from a checkpoint taken halfway: the resumed run ends with exactly the weights (and, in
the plain loop, exactly the losses) of the uninterrupted one.

What the optimizer needs each step (README "Use the optimizer in your own code"): the batch's loss — through
`step(closure)` (Lightning passes its closure), `step(loss=...)` (a plain loop), or, for a Trainer that calls
`optimizer.step()` bare, a step pre-hook that adds it — and optionally the batch's data cluster (`cluster_id=`).
"""
import math

import pytest
import torch
from torch import nn

from hybrid_optimization import AuxiliaryNeuralNetwork
from hybrid_optimization.optim import HybridOptimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, BATCH, STEPS = 160, 16, 20          # 10 batches an epoch; checkpoints after step 10 (one epoch)
N_CLUSTERS = 4


def make_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g)
    y = torch.tanh(x @ torch.tensor([0.5, -1.0, 0.25, 0.75])).unsqueeze(1)
    return x, y


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))


def make_optimizer(params):
    torch.manual_seed(1)                 # the auxiliary net's initial weights
    aux = AuxiliaryNeuralNetwork(hidden_size=16, learning_rate=1e-3, initial_trust_radius=0.1)
    return HybridOptimizer(params, lr=1e-2, aux_net=aux, trust_radius=0.1, n_clusters=N_CLUSTERS)


def make_scheduler(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-3)


def batch(x, y, step):
    i = (step % (N // BATCH)) * BATCH
    return x[i:i + BATCH], y[i:i + BATCH]


def falls(losses):
    """The second epoch's mean loss is under half the first's."""
    half = len(losses) // 2
    first, last = sum(losses[:half]) / half, sum(losses[half:]) / (len(losses) - half)
    return math.isfinite(last) and last < 0.5 * first


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


# -- a plain loop ---------------------------------------------------------------------------------------------------
def plain_steps(model, opt, sched, x, y, start, stop):
    losses, infos = [], []
    for step in range(start, stop):
        xb, yb = batch(x, y, step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        opt.step(loss=loss, cluster_id=step % N_CLUSTERS)       # the loss (for ρ and the aux net), the cluster
        sched.step()
        losses.append(loss.item())
        infos.append(opt.last_info)
    return losses, infos


def test_plain_loop_trains_and_resumes_exactly(tmp_path):
    x, y = make_data()
    model = make_model()
    opt = make_optimizer(model.parameters())
    sched = make_scheduler(opt)
    first, _ = plain_steps(model, opt, sched, x, y, 0, STEPS // 2)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
               tmp_path / "ckpt.pt")
    second, infos = plain_steps(model, opt, sched, x, y, STEPS // 2, STEPS)
    assert falls(first + second), first + second
    info = infos[-1]                                  # what each step reports
    assert info.step == STEPS and 0 < info.learning_rate and info.trust_radius > 0
    assert math.isfinite(info.lr_multiplier) and math.isfinite(info.gradient_magnitude) and not info.skipped
    assert sched.get_last_lr()[0] == pytest.approx(1e-3)     # the scheduler drove the optimizer's lr

    resumed = make_model()
    opt2 = make_optimizer(resumed.parameters())
    sched2 = make_scheduler(opt2)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    again, _ = plain_steps(resumed, opt2, sched2, x, y, STEPS // 2, STEPS)
    assert again == second                                         # bit-identical losses
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(resumed)))


# -- Hugging Face Trainer -------------------------------------------------------------------------------------------
class Regression(nn.Module):
    """A plain nn.Module the Trainer can drive: forward(x, labels) -> {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def run_trainer(out_dir, resume_from=None):
    from transformers import Trainer, TrainingArguments

    class HybridTrainer(Trainer):
        """Trainer calls optimizer.step() without arguments: keep each step's loss for the optimizer."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_loss = loss.detach()
            return loss

    model = Regression()
    opt = make_optimizer(model.parameters())
    sched = make_scheduler(opt)
    args = TrainingArguments(output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             logging_steps=1, save_steps=STEPS // 2, save_strategy="steps", report_to=[],
                             use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    x, y = make_data()
    trainer = HybridTrainer(model=model, args=args, train_dataset=Pairs(x, y), optimizers=(opt, sched))
    # a step pre-hook returning (args, kwargs) changes the call: here it adds the loss the Trainer does not pass
    opt.register_step_pre_hook(lambda optimizer, a, kw: (a, {**kw, "loss": trainer.step_loss}))
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return model, opt, losses


def test_transformers_trainer_with_optimizers_trains_and_resumes_exactly(tmp_path):
    model, opt, losses = run_trainer(tmp_path / "a")
    assert len(losses) == STEPS and falls(losses), losses
    assert opt.last_info.step == STEPS and math.isfinite(opt.last_info.lr_multiplier)
    assert opt.controller.tracker.last_loss == pytest.approx(losses[-1], rel=1e-3)   # the loss reached the optimizer
    resumed, _, resumed_losses = run_trainer(tmp_path / "b", resume_from=tmp_path / "a" / f"checkpoint-{STEPS // 2}")
    assert resumed_losses[STEPS // 2:] == losses[STEPS // 2:]      # (the first half is the checkpoint's log)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(resumed)))


# -- Lightning ------------------------------------------------------------------------------------------------------
def run_lightning(root, resume_from=None):
    import lightning as L

    class LitRegression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()
            self.losses = []

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            loss = nn.functional.mse_loss(self.net(xb), yb)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            opt = make_optimizer(self.parameters())
            return {"optimizer": opt, "lr_scheduler": {"scheduler": make_scheduler(opt), "interval": "step"}}

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            # Lightning passes its closure (forward + backward, returns the loss): the optimizer gets the loss from
            # it; extra keyword arguments reach HybridOptimizer.step unchanged.
            optimizer.step(closure=optimizer_closure, cluster_id=batch_idx % N_CLUSTERS)

    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    model = LitRegression()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1,
                                                       filename="{epoch}")
    trainer = L.Trainer(max_epochs=STEPS // (N // BATCH), accelerator="cpu", devices=1, logger=False,
                        callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, deterministic=True)
    trainer.fit(model, loader, ckpt_path=str(resume_from) if resume_from else None)
    return model, trainer


def test_lightning_configure_optimizers_trains_and_resumes_exactly(tmp_path):
    model, trainer = run_lightning(tmp_path / "a")
    assert trainer.global_step == STEPS and falls(model.losses), model.losses
    opt = trainer.optimizers[0]
    assert isinstance(opt, HybridOptimizer) and opt.last_info.step == STEPS
    assert opt.controller.tracker.last_loss == pytest.approx(model.losses[-1])    # the closure's loss
    resumed, trainer2 = run_lightning(tmp_path / "b", resume_from=tmp_path / "a" / "epoch=0.ckpt")
    assert trainer2.global_step == STEPS
    assert resumed.losses == model.losses[STEPS // 2:]
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(resumed)))
