"""The torch-free vocabulary: one definition of the step columns, the summary block and the choices."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from hybrid_optimization import schema
from hybrid_optimization.schema import RunSummary, StepMetrics, render_summary, to_jsonable

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_vocabulary_loads_no_torch_numpy_or_pandas():
    code = ("import sys, hybrid_optimization.schema as s; "
            "print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('hybrid_optimization.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['hybrid_optimization.schema']"      # the bottom layer: it imports no module of ours


def test_step_metrics_define_history_store_columns_and_csv_header():
    assert schema.HISTORY_KEYS[0] == "step" and "step" not in schema.STEP_COLUMNS
    assert set(schema.STEP_COLUMNS) < set(schema.HISTORY_KEYS) and {"ce", "kl", "time"} <= set(schema.HISTORY_KEYS)
    row = StepMetrics(step=3, loss=1.5, cluster_id=None, epoch=0)
    assert list(row.as_dict()) == list(schema.HISTORY_KEYS)
    assert list(row.store_values()) == list(schema.STEP_COLUMNS)
    assert StepMetrics.from_dict({**row.as_dict(), "not_a_metric": 1}) == row
    assert schema.metrics_csv_header(["val_loss", "step"]) == [*schema.HISTORY_KEYS, "val_loss"]


def test_the_optimizers_step_record_is_a_strict_subset_of_the_step_metrics():
    """Issue 18 item 3: one step record — everything optim.StepInfo reports has its StepMetrics field."""
    import dataclasses

    from hybrid_optimization.optim import StepInfo
    info = {f.name for f in dataclasses.fields(StepInfo)}
    assert info < set(schema.HISTORY_KEYS)
    assert set(schema.STEP_COLUMNS) - info <= {"loss", "tokens_per_s", "cluster_id", "epoch", "flip_rate"}


def test_the_hybrid_summary_is_the_guides_block():
    text = render_summary({"steps_completed": 20, "final_loss": 0.456789, "avg_lr_multiplier": 1.15,
                           "constraint_activation_rate": 0.325, "final_trust_radius": 0.012345})
    assert text.splitlines() == ["HYBRID OPTIMIZATION SUMMARY", "=" * 60, "Total Steps: 20", "Final Loss: 0.456789",
                                 "Avg Learning Rate Multiplier: 1.15x", "Constraint Activation Rate: 32.5%",
                                 "Final Trust Radius: 0.012345", "=" * 60]
    assert "Final Loss: —" in render_summary({})


def test_a_baseline_summary_has_its_own_title_and_no_hybrid_lines():
    summary = RunSummary(steps_completed=5, final_loss=2.0, optimizer="adamw", val_loss=2.5, val_ppl=12.18,
                         top1_agreement=0.25, tokens_per_s=1234.0, train_seconds=2.0)
    lines = render_summary(summary).splitlines()
    assert lines[0] == "TRAINING SUMMARY (baseline: AdamW at constant LR)"
    assert "Final Loss: 2.000000" in lines and not any("Multiplier" in line or "Radius" in line for line in lines)
    assert "Validation Loss: 2.500000 (perplexity 12.18), top-1 agreement with the teacher 25.0%" in lines
    assert render_summary(summary, optimizer="custom").startswith("TRAINING SUMMARY (baseline: custom optimizer)")


def test_run_summary_round_trips_with_extra_values():
    data = {"steps_completed": 7, "final_loss": 1.25, "export_bytes": 1024, "val_loss_cluster_0": 3.0}
    summary = RunSummary.from_dict(data)
    assert summary.extra == {"export_bytes": 1024, "val_loss_cluster_0": 3.0}
    assert {k: v for k, v in summary.to_dict().items() if v is not None and k != "skipped_steps"} == data
    # a summary stored before the rename (total_steps) reads as the same summary, under the guide's label
    old = RunSummary.from_dict({"total_steps": 7, "final_loss": 1.25})
    assert old.steps_completed == 7 and "Total Steps: 7" in render_summary(old) and old.extra == {}


def test_the_vocabulary_is_declared_once():
    """Issue 18 item 3: one normalize_bits, one runs-root rule, one list of export formats and statuses."""
    assert [schema.normalize_bits(b) for b in (1, 1.585, 1.6, "ternary", 2.0, 32)] == [1.0, 1.58, 1.58, 1.58, 2.0, 32.0]
    for bad in (3, 0, float("nan"), True, "two"):
        try:
            schema.normalize_bits(bad)
        except schema.UnsupportedBitsError as exc:
            assert "it must be one of 1, 1.58, 2, 4, 8" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")
    from hybrid_optimization.config import HybridTrainingConfig
    assert HybridTrainingConfig(target_bits=1.585).target_bits == 1.58       # the config uses the same rule
    assert schema.EXPORT_FORMATS == tuple(e.name for e in schema.EXPORTS) == ("packed", "gguf", "hf")
    assert set(schema.STATUS_COLORS) == set(schema.RUN_STATUSES)
    assert set(schema.ACTIVE_STATUSES) | set(schema.TERMINAL_STATUSES) == set(schema.RUN_STATUSES)


def test_the_runs_root_rule(tmp_path):
    assert schema.check_runs_root(tmp_path / "new" / "runs") == tmp_path / "new" / "runs"   # creatable
    assert not (tmp_path / "new").exists()                                                 # and nothing created
    (tmp_path / "file").write_text("x")
    for root, must_exist, message in ((tmp_path / "file", False, "is a file, not a directory"),
                                      (tmp_path / "file" / "sub", False, "cannot be created"),
                                      (tmp_path / "missing", True, "does not exist")):
        try:
            schema.check_runs_root(root, must_exist=must_exist)
        except schema.RunsRootError as exc:
            assert message in str(exc) and str(exc).count("\n") == 0
        else:
            raise AssertionError(f"{root} was accepted")


def test_to_jsonable_turns_numpy_paths_and_tuples_into_json():
    value = to_jsonable({"a": np.float32(1.5), "b": np.arange(3), "c": (1, Path("/x")), 4: np.bool_(True),
                         "nan": float("nan")})
    assert value == {"a": 1.5, "b": [0, 1, 2], "c": [1, "/x"], "4": True, "nan": value["nan"]}
    assert math.isnan(value["nan"]) and json.loads(json.dumps(value))["b"] == [0, 1, 2]


def test_named_data_sources_and_their_loaders_agree():
    from hybrid_optimization import schema
    from hybrid_optimization.distill import data
    assert tuple(data.DATA_SOURCES) == schema.DATA_SOURCES


def test_a_runs_labels_have_one_bound():
    assert schema.run_name_problem("baseline 1") is None and schema.tags_problem(["a", "sweep:lr"]) is None
    assert "of 100,000 characters" in schema.run_name_problem("n" * 100_000)
    for bad_name in ("", "   ", "two\nlines", "n" * (schema.MAX_RUN_NAME_CHARS + 1), 5):
        assert schema.run_name_problem(bad_name), bad_name
    for bad_tags in (["a,b"], [""], ["t" * (schema.MAX_TAG_CHARS + 1)], ["x"] * (schema.MAX_TAGS + 1), "a,b", [1]):
        assert schema.tags_problem(bad_tags), bad_tags
    assert schema.notes_problem("") is None and schema.notes_problem("n" * (schema.MAX_NOTES_CHARS + 1))
