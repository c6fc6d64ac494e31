"""Every statement of the benchmark report comes from the run that wrote it (issue 9, defect 6)."""
from benchmarks import report


def _rows(**methods):
    """One W2 row per (method, seed) with the given (final_val_loss, qdiff_mean) per seed."""
    return [{"workload": "W2", "method": m, "seed": seed, "final_val_loss": loss, "qdiff_mean": qdiff}
            for m, values in methods.items() for seed, (loss, qdiff) in enumerate(values)]


def test_the_compression_verdict_follows_the_numbers():
    assert report.compression_verdict(20.3, 20.3) == "linear layers: yes; whole file: yes"
    assert report.compression_verdict(19.7, 2.6) == "linear layers: ≈ (97% of it); whole file: no"
    assert report.compression_verdict(10.0, 19.9) == "linear layers: no; whole file: ≈ (98% of it)"


def test_the_unmoved_student_remark_names_only_what_this_run_shows():
    rows = _rows(B1=[(3.0, 0.2), (3.1, 0.2)], H0=[(4.0, 0.1), (4.2, 0.1)], H=[(2.9, 0.1), (2.8, 0.1)])
    assert report.small_but_unmoved(rows) == ["H0"]
    assert report.small_but_unmoved(_rows(B1=[(3.0, 0.2)], H=[(2.9, 0.1)])) == []


def test_left_off_variants_are_described_by_their_measurement():
    rows = _rows(H=[(3.0, 0.1), (3.0, 0.1)], **{"H-sched": [(3.3, 0.1), (3.3, 0.1)]})
    assert report.measured_vs_h(rows, "H-sched").startswith("final val loss 1.100")
    assert report.measured_vs_h(rows, "H-cap1") == "not measured in this run"
