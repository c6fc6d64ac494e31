"""The optimizer menu (issue 16): every --optimizer × --schedule trains and resumes exactly, --hybrid steers Muon's
direction, and a bad combination is one line naming what is allowed."""
import io
import json
import math

import pytest
import torch

from hybrid_optimization.config import HybridTrainingConfig
from hybrid_optimization.optim import _orthogonalize, is_hidden_matrix
from hybrid_optimization.optimizers import (build_optimizer, combination_error, schedule_factor,
                                            set_optimizer_mode)
from hybrid_optimization.schema import BASE_OPTIMIZERS, HYBRID_BASES, SCHEDULES, TRUST_REGION_MODES

pytestmark = pytest.mark.timeout(1800)

VALID = [(o, s) for o in BASE_OPTIMIZERS for s in SCHEDULES if combination_error(o, s, False) is None]
HYBRID = [(o, s) for o in HYBRID_BASES for s in ("constant", "cosine", "hybrid-cosine")]


def _tiny_lm(seed: int = 0):
    from hybrid_optimization.distill.student import StudentConfig, StudentLM
    torch.manual_seed(seed)
    return StudentLM(StudentConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8))


def _loss(model, step: int):
    g = torch.Generator().manual_seed(step % 2)                 # two batches, seen again and again: it must learn
    x = torch.randint(0, 32, (4, 9), generator=g)
    return torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 32), x[:, 1:].reshape(-1))


def _build(model, optimizer, schedule, hybrid):
    return build_optimizer(model, optimizer=optimizer, schedule=schedule, lr=1.0 if optimizer == "prodigy" else 3e-3,
                           warmup_steps=2, total_steps=8, weight_decay=1e-4,
                           hybrid=HybridTrainingConfig() if hybrid else None)


def _steps(model, opt, sched, start: int, stop: int, hybrid: bool) -> list[float]:
    losses = []
    for step in range(start, stop):
        loss = _loss(model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(loss=float(loss.detach())) if hybrid else opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("optimizer,schedule,hybrid", [(o, s, False) for o, s in VALID] +
                         [(o, s, True) for o, s in HYBRID])
def test_every_optimizer_and_schedule_trains_and_resumes_exactly_from_its_state_dicts(optimizer, schedule, hybrid):
    """8 steps in one go == 3 steps, a checkpoint through torch.save / torch.load(weights_only=True), 5 more steps
    in a new process's worth of objects: the same losses and bit-identical weights."""
    model = _tiny_lm()
    opt, sched = _build(model, optimizer, schedule, hybrid)
    # warmup 2: a LambdaLR even for constant; Schedule-Free and the hybrid's own cosine schedule themselves
    assert (sched is None) == (optimizer == "schedule-free" or schedule == "hybrid-cosine")
    full = _steps(model, opt, sched, 0, 8, hybrid)
    assert full[-1] < full[0] or optimizer == "sgd", full          # it learns (SGD at this LR: slowly)

    first = _tiny_lm()
    opt1, sched1 = _build(first, optimizer, schedule, hybrid)
    part = _steps(first, opt1, sched1, 0, 3, hybrid)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(),
                "sched": sched1.state_dict() if sched1 else None}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = _tiny_lm(seed=123)                                   # different initial weights: all must come back
    opt2, sched2 = _build(second, optimizer, schedule, hybrid)
    second.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    if sched2 is not None:
        sched2.load_state_dict(saved["sched"])
    rest = _steps(second, opt2, sched2, 3, 8, hybrid)
    assert part + rest == full
    for (name, p), q in zip(model.state_dict().items(), second.state_dict().values()):
        assert torch.equal(p, q), name


def test_schedules_warm_up_then_hold_decay_or_anneal():
    total, warmup = 100, 10
    f = {s: [schedule_factor(s, warmup, total, t) for t in range(total)] for s in SCHEDULES}
    for s in SCHEDULES:
        assert f[s][:warmup] == [(t + 1) / warmup for t in range(warmup)], s
    assert f["constant"][warmup:] == [1.0] * (total - warmup)
    assert f["cosine"][warmup] == 1.0 and 0 < f["cosine"][-1] < 0.01
    assert all(a >= b for a, b in zip(f["cosine"][warmup:], f["cosine"][warmup + 1:]))
    assert f["wsd"][warmup:80] == [1.0] * 70                    # stable until the last 20 %
    assert all(a > b for a, b in zip(f["wsd"][80:], f["wsd"][81:])) and 0 < f["wsd"][-1] < 0.05


def test_schedule_free_evaluates_at_its_averaged_weights_and_returns_to_training():
    model = _tiny_lm()
    opt, sched = _build(model, "schedule-free", "constant", False)
    _steps(model, opt, sched, 0, 4, False)
    training = [p.detach().clone() for p in model.parameters()]
    set_optimizer_mode(opt, "eval")
    set_optimizer_mode(opt, "eval")                            # idempotent
    averaged = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(training, averaged))
    set_optimizer_mode(opt, "train")
    for a, p in zip(training, model.parameters()):               # back to the training weights (up to rounding)
        torch.testing.assert_close(p.detach(), a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="train or eval"):
        set_optimizer_mode(opt, "test")


@pytest.mark.parametrize("use_trust_region", [False, True])
def test_hybrid_over_muon_scales_muons_own_direction_by_the_multiplier_inside_the_trust_region(use_trust_region):
    """`--hybrid --optimizer muon`: on every hidden matrix the applied update is c × torch.optim.Muon's update from the
    same momentum buffer and gradient (c = the learned multiplier, or less where the trust region binds); the
    embedding, norms and head take AdamW's direction under the same c."""
    model = _tiny_lm()
    cfg = HybridTrainingConfig(use_trust_region=use_trust_region, initial_trust_radius=0.02,
                               trust_radius_adaptation=False, auxiliary_nn_learning_rate=0.05,
                               trust_region_mode="absolute")     # the region whose applied norm this test checks
    opt, _ = build_optimizer(model, optimizer="muon", lr=2e-2, weight_decay=1e-3, total_steps=12, hybrid=cfg)
    with torch.no_grad():                  # an aux net that asks for a multiplier ≠ 1 (as a trained one does)
        opt.aux_net.head.bias[0] = 0.3
    hidden = [(n, p) for n, p in model.named_parameters() if is_hidden_matrix(n, p)]
    assert {g["base"] for g in opt.param_groups} == {"muon", "adamw"}
    assert [p for g in opt.param_groups if g["base"] == "muon" for p in g["params"]] == [p for _, p in hidden]
    multipliers, active = [], []
    for step in range(12):
        loss = _loss(model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # the reference: Muon's update from the hybrid's own momentum buffer — written out (Nesterov momentum in
        # torch.optim.Muon's lerp form, Newton–Schulz in float32, Moonlight's RMS match, decoupled weight decay),
        # and torch.optim.Muon's own step (Newton–Schulz in bfloat16, so equal up to its rounding)
        refs, torch_refs = [], []
        for _, p in hidden:
            g = p.grad
            buf = opt.state[p].get("momentum_buffer", torch.zeros_like(p)).clone()
            buf.lerp_(g, 1 - 0.95)
            direction = _orthogonalize(g.lerp(buf, 0.95))
            refs.append(-2e-2 * (0.2 * math.sqrt(max(p.shape)) * direction + 1e-3 * p.detach()))
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = g.clone()
            muon = torch.optim.Muon([q], lr=2e-2, weight_decay=1e-3, momentum=0.95, nesterov=True,
                                    adjust_lr_fn="match_rms_adamw")
            muon.step()                                          # from a zero buffer: compare on the first step
            torch_refs.append(q.detach() - p.detach())
        before = [p.detach().clone() for _, p in hidden]
        opt.step(loss=float(loss.detach()))
        info = opt.last_info
        for (name, p), old, ref, torch_ref in zip(hidden, before, refs, torch_refs):
            c = opt.state[p]["scale"]
            torch.testing.assert_close(p.detach() - old, c * ref, rtol=1e-4, atol=1e-8, msg=name)
            if step == 0:
                cosine = torch.nn.functional.cosine_similarity((p.detach() - old).flatten(), torch_ref.flatten(), 0)
                assert cosine > 0.99, (name, float(cosine))
            assert c <= info.lr_multiplier * (1 + 1e-6)
            if not info.constraint_active:
                assert c == pytest.approx(info.lr_multiplier, rel=1e-6)
        multipliers.append(info.lr_multiplier)
        active.append(bool(info.constraint_active))
        if info.constraint_active:                               # absolute region: ‖ΔΘ‖ over everything = μ
            assert info.update_magnitude == pytest.approx(info.trust_radius, rel=1e-3)
    assert any(abs(m - 1.0) > 1e-3 for m in multipliers), multipliers      # the multiplier did steer
    assert any(active) == use_trust_region, active


@pytest.mark.parametrize("optimizer,schedule,hybrid,warmup,fragment", [
    ("schedule-free", "cosine", False, 0, "--schedule cosine cannot be combined with --optimizer schedule-free: "
                                          "Schedule-Free replaces the schedule by averaging; use --schedule constant"),
    ("schedule-free", "wsd", False, 0, "use --schedule constant"),
    ("prodigy", "constant", True, 0, "--hybrid cannot be combined with --optimizer prodigy: the hybrid steers the "
                                     "direction of adamw, sgd, muon"),
    ("schedule-free", "constant", True, 0, "--hybrid cannot be combined with --optimizer schedule-free"),
    ("lion", "constant", False, 0, "--optimizer 'lion' is invalid: it must be one of adamw, sgd, muon, "
                                   "schedule-free, prodigy"),
    ("adamw", "linear", False, 0, "--schedule 'linear' is invalid: it must be one of constant, cosine, wsd"),
    ("adamw", "hybrid-cosine", False, 0, "--schedule hybrid-cosine is invalid without --hybrid"),
    ("adamw", "cosine", False, -1, "--warmup_steps -1 is invalid: it must be an integer ≥ 0"),
    ("adamw", "cosine", False, 4, "--warmup_steps 4 is invalid: it must be less than the run's 4 steps"),
])
def test_a_bad_combination_is_refused_with_one_line_naming_the_allowed_ones(optimizer, schedule, hybrid, warmup,
                                                                            fragment):
    message = combination_error(optimizer, schedule, hybrid, warmup, 4)
    assert message is not None and fragment in message and "\n" not in message
    with pytest.raises(ValueError, match="cannot be combined|is invalid"):
        build_optimizer(_tiny_lm(), optimizer=optimizer, schedule=schedule, warmup_steps=warmup, total_steps=4,
                        hybrid=HybridTrainingConfig() if hybrid else None)


@pytest.mark.parametrize("optimizer,schedule,hybrid,warmup", [
    ("muon", "cosine", False, 2), ("adamw", "wsd", True, 2), ("muon", "cosine", True, 2), ("schedule-free", "constant",
                                                                                           False, 2),
    ("adamw", "constant", False, 0), ("adamw", "constant", True, 0),
])
def test_an_unset_warmup_builds_the_benchmarks_five_percent(optimizer, schedule, hybrid, warmup):
    """The run's optimizer (setup.make_optimizer, from the plan) with --warmup_steps unset: 5 % of a 40-step run
    with a schedule or Schedule-Free, as the benchmark measured it; none at a constant LR."""
    from hybrid_optimization.distill.options import TrainOptions
    from hybrid_optimization.distill.plan import plan_run
    from hybrid_optimization.distill.setup import make_optimizer
    plan = plan_run(TrainOptions(track=False, max_steps=40, optimizer=optimizer, schedule=schedule, hybrid=hybrid))
    assert plan.warmup_steps == warmup
    unset, scheduler = make_optimizer(plan, _tiny_lm(), n_clusters=8)
    given, _ = build_optimizer(_tiny_lm(), optimizer=optimizer, schedule=schedule, warmup_steps=warmup,
                               total_steps=40, hybrid=HybridTrainingConfig() if hybrid else None,
                               n_clusters=8 if hybrid else None)
    assert [g["lr"] for g in unset.param_groups] == [g["lr"] for g in given.param_groups]
    if warmup and optimizer != "schedule-free":
        assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 / warmup)    # step 0 of a 2-step linear warmup
    elif optimizer == "schedule-free":
        assert unset.param_groups[0]["warmup_steps"] == warmup
    else:
        assert scheduler is None


def test_hybrid_cosine_is_the_hybrids_own_schedule_as_the_benchmark_built_h_sched_free():
    """--hybrid --schedule hybrid-cosine: no LambdaLR; the HybridOptimizer's own warmup + cosine (its settings, in
    the checkpoint's param groups) — the same optimizer the robustness report's H-sched-free method builds."""
    from benchmarks.methods import build_optimizer as method_build
    from benchmarks.tracks import HYB_SCHED_FREE
    cfg = HybridTrainingConfig()
    menu, scheduler = build_optimizer(_tiny_lm(), optimizer="adamw", schedule="hybrid-cosine", warmup_steps=None,
                                      total_steps=200, hybrid=cfg, n_clusters=8)
    assert scheduler is None
    group = menu.param_groups[0]
    assert (group["warmup_steps"], group["decay_steps"], group["anneal_meta_learning"]) == (10, 200, True)
    bench, bench_scheduler = method_build(HYB_SCHED_FREE, _tiny_lm(), cfg, 200, 8)
    assert bench_scheduler is None
    assert {k: v for k, v in bench.param_groups[0].items() if k != "params"} == \
        {k: v for k, v in group.items() if k != "params"}


# -- through the CLI (distillation.py's main), tiny preset -------------------------------------------------------
def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from hybrid_optimization.distill.cli import main
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,fragment", [
    (["--optimizer", "schedule-free", "--schedule", "cosine"], "cannot be combined with --optimizer schedule-free"),
    (["--hybrid", "--optimizer", "prodigy"], "--hybrid cannot be combined with --optimizer prodigy"),
    (["--optimizer", "adam"], "--optimizer: invalid choice"),
    (["--schedule", "linear"], "--schedule: invalid choice"),
    (["--warmup_steps", "5", "--max_steps", "3"], "--warmup_steps 5 is invalid"),
])
def test_cli_refuses_a_bad_combination_with_exit_2_and_one_line(argv, fragment, tmp_path, capsys):
    code, out, err = _cli([*argv, "--runs_root", str(tmp_path)], capsys)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())                        # nothing started


def test_cli_refuses_an_unknown_trust_region_in_one_line_naming_every_mode(tmp_path, capsys):
    code, out, err = _cli(["--hybrid", "--trust_region_mode", "global", "--runs_root", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--trust_region_mode: invalid choice: 'global'" in err and "rms" in TRUST_REGION_MODES
    assert "(choose from " + ", ".join(map(repr, TRUST_REGION_MODES)) + ")" in err
    assert not list(tmp_path.iterdir())


def test_cli_trains_with_the_rms_trust_region_and_holds_the_update_rms_at_mu_times_1e_3(tmp_path, capsys,
                                                                                         one_torch_thread):
    code, out, err = _cli(["--hybrid", "--trust_region_mode", "rms", "--max_steps", "3", "--steps_per_epoch", "3",
                           "--eval_windows", "4", "--ternary", "--qat", "--quiet", "--no_progress",
                           "--runs_root", str(tmp_path)], capsys)
    assert code == 0, err
    checkpoint = _checkpoint(tmp_path, _run_id(out))
    assert checkpoint["optimizer"]["param_groups"][0]["trust_region"] == "rms"
    n = sum(p.numel() for p in checkpoint["model"].values() if p.is_floating_point())
    history = checkpoint["history"]
    assert all(history["constraint_active"])          # LR 1e-3 proposes more than μ = 0.01 of a 1e-3 RMS
    for radius, applied in zip(history["trust_radius"], history["update_magnitude"]):
        assert applied / math.sqrt(n) == pytest.approx(radius * 1e-3, rel=1e-3)    # ‖ΔΘ‖ = μ·1e-3·√N


def _run_id(out: str) -> str:
    first = out.strip().splitlines()[0]
    assert first.startswith("run_id="), out
    return first.split("=", 1)[1]


def _checkpoint(root, run_id: str) -> dict:
    from hybrid_optimization.tracking import RunStore
    from hybrid_optimization.distill.checkpoint import load_checkpoint
    return load_checkpoint(RunStore(root).get_run(run_id)["artifacts"]["checkpoint"])


# Through the CLI: every optimizer and every schedule, and --hybrid over both adamw and muon, in the default run
# (~10 s per CLI run on a loaded 2-core machine, three runs per case); the rest of the optimizer × schedule matrix
# with `pytest -m slow` (every pair already resumes exactly at the state-dict level above).
FAST = {("adamw", "cosine", False), ("sgd", "wsd", False), ("muon", "wsd", False), ("schedule-free", "constant", False),
        ("prodigy", "cosine", False), ("adamw", "constant", True), ("muon", "cosine", True),
        ("adamw", "hybrid-cosine", True)}       # --hybrid's default schedule
CLI_CASES = [pytest.param(*case, marks=() if case in FAST else pytest.mark.slow)
             for case in [(o, s, False) for o, s in VALID] + [(o, s, True) for o, s in HYBRID]]


@pytest.mark.parametrize("optimizer,schedule,hybrid", CLI_CASES)
def test_cli_trains_every_optimizer_and_schedule_and_a_stopped_run_resumes_exactly(optimizer, schedule, hybrid,
                                                                                   tmp_path, capsys, one_torch_thread):
    flags = ["--optimizer", optimizer, "--schedule", schedule, "--warmup_steps", "1", "--max_steps", "4",
             "--steps_per_epoch", "3", "--eval_windows", "4", "--seed", "1", "--ternary", "--qat", "--quiet",
             "--no_progress", "--runs_root", str(tmp_path)] + (["--hybrid"] if hybrid else [])
    code, out, err = _cli(flags, capsys)
    assert code == 0, err
    full_id = _run_id(out)
    stop = tmp_path / "stop.json"
    stop.write_text(json.dumps({"stop_after_steps": 2}))
    code, out, err = _cli([*flags, "--options", str(stop)], capsys)
    assert code == 143, err                                    # stopped mid-epoch, checkpointed
    stopped_id = _run_id(out)
    assert _checkpoint(tmp_path, stopped_id)["step"] == 2
    code, out, err = _cli(["--resume", stopped_id, "--quiet", "--no_progress", "--runs_root", str(tmp_path)], capsys)
    assert code == 0, err
    a, b = _checkpoint(tmp_path, full_id), _checkpoint(tmp_path, stopped_id)
    assert a["step"] == b["step"] == 4
    assert a["history"]["loss"] == b["history"]["loss"] and all(math.isfinite(x) for x in a["history"]["loss"])
    assert [e["val_loss"] for e in a["evals"]] == [e["val_loss"] for e in b["evals"]]
    for name, p in a["model"].items():
        assert torch.equal(p, b["model"][name]), name
    assert (a["scheduler"] is None) == (b["scheduler"] is None)
    if a["scheduler"] is not None:
        assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4


def test_a_finished_schedule_free_run_returns_and_exports_its_averaged_weights(tmp_path, one_torch_thread):
    """The checkpoint keeps Schedule-Free's training weights (so a resume is exact); the trained student the run
    returns (and exports) is the averaged one: the checkpoint's weights after optimizer.eval()."""
    from hybrid_optimization.distill import TrainOptions, train
    from hybrid_optimization.distill.student import StudentLM
    result = train(TrainOptions(optimizer="schedule-free", warmup_steps=1, max_steps=3, eval_windows=4, seed=2,
                                quiet=True, progress=False, runs_root=str(tmp_path)))
    assert result.status == "finished"
    saved = _checkpoint(tmp_path, result.run_id)
    model = StudentLM(result.model.config)
    model.load_state_dict(saved["model"])
    opt, _ = build_optimizer(model, optimizer="schedule-free", warmup_steps=1, total_steps=3)
    opt.load_state_dict(saved["optimizer"])
    trained = result.model.state_dict()
    assert any(not torch.equal(p, trained[n]) for n, p in model.state_dict().items())   # y ≠ x
    set_optimizer_mode(opt, "eval")
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, trained[name], rtol=1e-6, atol=1e-7, msg=name)
