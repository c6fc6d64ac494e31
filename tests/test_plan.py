"""plan_run without data: the steps / epochs arithmetic, the precision ladder, the clustering switches, the options
hash a checkpoint carries, and merge-on-resume — each asserted on a RunPlan, in milliseconds, torch not imported."""
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_optimization.distill.options import MAX_STEPS, OptionsError, TrainOptions
from hybrid_optimization.distill.plan import (RunResumeError, merge_for_resume, plan_run, precision_ladder_for,
                                              train_windows_budget)
from hybrid_optimization.tracking import RunStore

ROOT = Path(__file__).resolve().parents[1]


def plan(**values):
    return plan_run(TrainOptions(track=False, **values))


def test_tiny_preset_epochs_are_ten_steps_and_the_plan_is_made_after_a_tenth():
    p = plan(epochs=20)
    assert (p.steps_per_epoch, p.total_steps, p.n_epochs, p.plan_at_step) == (10, 200, 20, 20)
    assert p.config.max_steps == 200 and p.seq_len == 64 and p.batch_size == 32
    p = plan(max_steps=25, steps_per_epoch=4)
    assert (p.total_steps, p.n_epochs, p.plan_at_step) == (25, 7, 2)
    assert plan(max_steps=3).plan_at_step == 1                  # never step 0


def test_an_epoch_of_one_pass_needs_the_data_and_is_bounded_then():
    p = plan(preset="smollm2", epochs=3, batch_size=16)
    assert p.steps_per_epoch is None and p.total_steps is None and p.train_windows is None
    full = p.for_data(n_train=1000, n_available=1000)
    assert (full.steps_per_epoch, full.total_steps) == (63, 189) and full.config.max_steps == 189
    assert full.options.train_windows is None                   # every window used: nothing to record
    with pytest.raises(OptionsError, match=r"--epochs 100000 × 625000 steps per epoch = 62,500,000,000 steps, more than the limit"):
        plan(preset="smollm2", epochs=100_000, batch_size=16).for_data(10_000_000, 10_000_000)


def test_steps_over_the_bound_are_refused_before_any_data():
    with pytest.raises(OptionsError, match=f"100,000,000 steps.*{MAX_STEPS:,}"):
        plan(epochs=100_000, steps_per_epoch=1000)
    assert plan(epochs=100_000, steps_per_epoch=1000, max_steps=5).total_steps == 5   # --max_steps wins


def test_a_run_that_draws_a_subset_records_it_for_resume():
    p = plan(max_steps=100, batch_size=32)
    assert p.train_windows == 3200
    assert train_windows_budget(32, 10, 20, 10) == 1024         # never below SUBSET_MIN_WINDOWS
    assert train_windows_budget(32, None, 2, None) is None
    assert train_windows_budget(32, 5000, 1, None, stored=777) == 777
    assert p.for_data(3200, 50_000).options.train_windows == 3200
    assert p.for_data(698, 698).options.train_windows is None


@pytest.mark.parametrize("bits, groups, ladder", [
    (1.58, 4, (2.0, 1.58, 1.58, 1.0)),                          # the guide's example
    (1.58, 2, (2.0, 1.0)), (1.58, 1, (1.58,)), (1.0, 3, (1.58, 1.0, 1.0)), (8.0, 3, (8.0, 8.0, 4.0))])
def test_precision_ladder(bits, groups, ladder):
    assert precision_ladder_for(bits, groups) == ladder


def test_bits_switches_and_optimizer_kind():
    assert plan().bits == 32 and plan(qat=True).bits == 1.0 and plan(qat=True, ternary=True).bits == 1.58
    assert plan(bits=1.585).bits == 1.58
    p = plan(hybrid=True, qat=True, ternary=True, param_clusters=3)
    assert p.data_clustering and p.param_clustering and p.optimizer == "hybrid"
    assert p.precision_ladder == (2.0, 1.58, 1.0)
    assert not plan(hybrid=True).param_clustering                     # full precision: no per-layer bits
    assert not plan(hybrid=True, qat=True, data_clustering=False).data_clustering
    assert not plan(qat=True).data_clustering and plan(qat=True).optimizer == "adamw"
    assert plan(optimizer_factory=lambda model, options: None).optimizer == "custom"


def test_the_options_hash_ignores_what_a_resume_may_change_and_names_what_it_does_not():
    base = plan(hybrid=True, qat=True, ternary=True, max_steps=20)
    same = plan(hybrid=True, qat=True, ternary=True, max_steps=40, quiet=True, save_metrics=True, run_name="x")
    assert base.options_hash() == same.options_hash()
    other = plan(hybrid=True, qat=True, ternary=True, max_steps=20, lr=0.01)
    assert other.options_hash() != base.options_hash()
    assert other.hashed_options()["config"]["base_learning_rate"] == 0.01
    assert "max_steps" not in base.hashed_options()["config"]


def _stored_run(root, **values) -> str:
    options = TrainOptions(runs_root=str(root), **values)
    store = RunStore(root)
    return store.create_run(config={}, args={"argv": [], "options": options.to_dict()}, preset=options.preset,
                            status="stopped")


def test_resume_takes_the_stored_options_and_only_the_allowed_overrides(tmp_path):
    run_id = _stored_run(tmp_path, hybrid=True, qat=True, lr=0.002, max_steps=10)
    p = plan_run(TrainOptions(resume=run_id, runs_root=str(tmp_path), max_steps=30, quiet=True))
    assert p.options.hybrid and p.options.lr == 0.002 and p.total_steps == 30 and p.options.quiet
    assert p.resume_dir == tmp_path / run_id and p.options.resume == run_id


def test_resume_accepts_the_runs_own_values_repeated_and_refuses_a_different_one_by_name(tmp_path):
    run_id = _stored_run(tmp_path, preset="tiny", hybrid=True, lr=0.002)
    # The CLI: `--preset tiny --hybrid --lr 0.002` (the command the run was started with) plus --resume.
    given = TrainOptions(resume=run_id, runs_root=str(tmp_path), preset="tiny", hybrid=True, lr=0.002,
                         max_steps=50, given=("resume", "runs_root", "preset", "hybrid", "lr", "max_steps"))
    assert plan_run(given).total_steps == 50
    with pytest.raises(OptionsError, match=r"lr=0\.01 \(the run's: 0\.002\).*cannot change when a run is resumed"):
        plan_run(given.replace(lr=0.01))
    with pytest.raises(OptionsError, match=r"preset='smollm2' \(the run's: 'tiny'\)"):
        plan_run(given.replace(preset="smollm2"))
    # A Python caller (no `given`): a default value is "not set", any other must equal the stored one.
    assert plan_run(TrainOptions(resume=run_id, runs_root=str(tmp_path), lr=0.002)).options.lr == 0.002
    with pytest.raises(OptionsError, match=r"hybrid=False|lr=0\.5"):
        plan_run(TrainOptions(resume=run_id, runs_root=str(tmp_path), lr=0.5))


def test_resume_of_an_unknown_or_foreign_run_is_refused(tmp_path):
    RunStore(tmp_path)
    with pytest.raises(Exception, match="nope"):
        plan_run(TrainOptions(resume="nope", runs_root=str(tmp_path)))
    foreign = RunStore(tmp_path).create_run(config={}, args=["--x"], preset="tiny", status="stopped")
    with pytest.raises(RunResumeError, match="not started by this pipeline"):
        plan_run(TrainOptions(resume=foreign, runs_root=str(tmp_path)))


def test_merge_keeps_hooks_and_drops_the_launcher_id():
    stored = TrainOptions(hybrid=True, run_id="launcher-id", epochs=3)
    factory = (lambda model, options: None)
    merged = merge_for_resume(stored, TrainOptions(resume="r", optimizer_factory=factory, epochs=7))
    assert merged.run_id is None and merged.optimizer_factory is factory and merged.epochs == 7 and merged.hybrid


def test_planning_imports_no_torch():
    code = ("import sys; from hybrid_optimization.distill.plan import plan_run; "
            "from hybrid_optimization.distill.options import TrainOptions; "
            "p = plan_run(TrainOptions(track=False, hybrid=True, qat=True, ternary=True)); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]; print(p.total_steps)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "200", out.stderr


@pytest.mark.parametrize("argv, message", [
    (["--teacher", "/nonexistent"], "--teacher /nonexistent: does not exist"),
    (["--epochs", "100000", "--steps_per_epoch", "1000"], "100,000,000 steps"),
    (["--preset", "smollm2", "--epochs", "5", "--batch_size", "1", "--max_steps", "10", "--resume", "nope"], "nope")])
def test_the_cli_refuses_cheap_mistakes_in_under_2_seconds(tmp_path, argv, message):
    """Issue 17: these were refused only after 22-89 s of data preparation; now before torch is imported."""
    import time
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "hybrid_optimization.distill", *argv, "--runs_root", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - started
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert seconds < 2, f"{seconds:.2f} s"
    assert not (tmp_path / "runs.db").exists()                     # nothing started, no store created


def test_an_unset_warmup_is_five_percent_of_the_steps_with_a_schedule_or_schedule_free_and_none_without():
    from hybrid_optimization.schema import HYBRID_DEFAULT_SCHEDULE
    # what the benchmark measured (5 % warmup) is what `--optimizer muon --schedule cosine` runs, with no flag more
    assert plan(max_steps=1600, optimizer="muon", schedule="cosine").warmup_steps == 80
    assert plan(max_steps=1600, hybrid=True, schedule="wsd").warmup_steps == 80
    assert plan(max_steps=200, optimizer="schedule-free").warmup_steps == 10     # its own warmup, constant schedule
    assert plan(max_steps=1600).warmup_steps == 0                                 # AdamW at a constant LR: as before
    assert plan(max_steps=1600, hybrid=True, schedule="constant").warmup_steps == 0
    assert plan(max_steps=1600, hybrid=True).warmup_steps == (0 if HYBRID_DEFAULT_SCHEDULE == "constant" else 80)
    assert plan(max_steps=1600, optimizer="prodigy").warmup_steps == 0
    assert plan(max_steps=10, schedule="cosine").warmup_steps == 1                # at least one step …
    assert plan(max_steps=1, schedule="cosine").warmup_steps == 0                 # … and always less than the run
    assert plan(max_steps=1600, schedule="cosine", warmup_steps=0).warmup_steps == 0   # set: as given
    one_pass = plan(preset="smollm2", epochs=1, batch_size=16, schedule="cosine").for_data(1000, 1000)
    assert one_pass.warmup_steps == 3                                             # 5 % of 63 steps, once known
    # unset is its own value in the options document (not frozen into a number) and in the checkpoint's hash
    assert plan(max_steps=1600, schedule="cosine").options.to_dict()["warmup_steps"] is None
    assert plan(max_steps=40, schedule="cosine").options_hash() != \
        plan(max_steps=40, schedule="cosine", warmup_steps=2).options_hash()


def test_an_unset_schedule_is_constant_and_the_hybrids_default_with_hybrid():
    from hybrid_optimization.schema import HYBRID_DEFAULT_SCHEDULE
    assert plan(max_steps=100).schedule == "constant"
    assert plan(max_steps=100, hybrid=True).schedule == HYBRID_DEFAULT_SCHEDULE
    assert plan(max_steps=100, hybrid=True, schedule="constant").schedule == "constant"
    assert plan(max_steps=100, hybrid=True, schedule="hybrid-cosine").warmup_steps == 5
    with pytest.raises(OptionsError, match="--schedule hybrid-cosine is invalid without --hybrid"):
        plan(max_steps=100, schedule="hybrid-cosine")


def test_a_warmup_longer_than_an_epochs_run_is_refused_in_one_line():
    # With --max_steps the options check the warmup; with --epochs the run's length is known only to the plan (tiny:
    # 10 steps per epoch) or, for one-pass epochs, once the data is split — the same rule applies at both points.
    with pytest.raises(OptionsError, match=r"--warmup_steps 50 is invalid: it must be less than the run's 30 steps"):
        plan(epochs=3, warmup_steps=50)
    assert plan(epochs=3, warmup_steps=29).total_steps == 30
    one_pass = plan(preset="smollm2", epochs=1, batch_size=16, warmup_steps=100)
    with pytest.raises(OptionsError, match=r"--warmup_steps 100 is invalid: it must be less than the run's 63 steps"):
        one_pass.for_data(n_train=1000, n_available=1000)
