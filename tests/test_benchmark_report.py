"""Every statement of the benchmark report comes from the run that wrote it (issue 9, defect 6)."""
import pytest

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


def test_the_benchmarks_page_reads_the_robustness_verdict_and_the_reports_own_labels(tmp_path):
    """Issue 16's two-workload report (benchmarks/robustness.py) writes its verdict as "**When you do not know the
    learning rate: X**" / "**With a tuned learning rate: Y**" lines; the page turns them into its "What to use"
    sentences, and names the methods with the labels the report's results.json carries (issue 18), none of its own."""
    import json

    from benchmarks.robustness import verdict
    from benchmarks.tracks_report import method_labels
    from workbench import bench_view
    ce = {"best": 4.0, "best_method": "Muon", "best_lr": 1e-2,
          "methods": {"H-abs": {"worst": (1.02, 1.01, 1.03)}, "Muon": {"worst": (1.20, 1.15, 1.25)}}}
    workloads = [{"name": n, "robustness": {"val_loss": ce}, "complete": {"seeds": [0, 1, 2]}}
                 for n in ("chat", "python-docs")]
    text = verdict(workloads)
    report = f"# LR robustness on two workloads\n\n## Verdict\n\n{text}\n\n## Setup\n\nx\n"
    advice = bench_view.situations(report)
    assert advice[0].startswith("**LR unknown** → H-abs") and advice[1].startswith("**LR tuned** → Muon")
    (tmp_path / "results.json").write_text(json.dumps({"methods": method_labels(["H-abs", "Muon"])}))
    names = bench_view.method_names(tmp_path)
    assert names["H-abs"].startswith("H with the absolute trust region")
    assert f"**{names['Muon']}** (Muon)" in bench_view.plain(advice[1].replace("→ Muon", "→ **Muon**"), names)
    split = [dict(w, robustness={"val_loss": dict(ce, best_method=m)}) for w, m in zip(workloads, ("Muon", "H-abs"))]
    assert "**With a tuned learning rate: no single method on both workloads**" in verdict(split)
    one_seed = [dict(w, complete={"seeds": [0]}) for w in workloads]       # leaders named, no advice given
    assert verdict(one_seed).startswith("**Not decided**")
    assert bench_view.situations(f"# r\n\n## Verdict\n\n{verdict(one_seed)}\n") == []


def test_the_lr_unknown_advice_names_the_grids_best_method_by_the_reports_own_code():
    """A two-track verdict's "best: X," (lowest median final loss over the grid) is added to the LR-unknown advice
    as X's code, which plain() then names from the report's results.json; nothing is added when H itself is best."""
    from workbench import bench_view
    text = ("**Without tuning, `--hybrid` ends lower than AdamW at a constant LR** over a 100× LR grid; rank 3 of 6 "
            "(best: {best}, 4.970); 0 of 25 runs diverged.")
    (line,) = bench_view.situations(f"# r\n\n## Verdict\n\n{text.format(best='H-bounded')}\n")
    assert line.endswith("; **H-bounded** ends lowest of all over the grid.")
    names = {"H-bounded": "H with the bounded trust region"}
    assert "**H with the bounded trust region** (H-bounded) ends lowest" in bench_view.plain(line, names)
    (line,) = bench_view.situations(f"# r\n\n## Verdict\n\n{text.format(best='H')}\n")
    assert "ends lowest" not in line


def test_the_robustness_verdict_names_a_leader_only_when_its_paired_interval_excludes_the_runner_up():
    """robustness() pairs the leader with its runner-up on the same bootstrap draws; the verdict names one method
    when that interval is below 1 on both workloads, "X or Y" when it holds 1, and the page still reads it."""
    from benchmarks import robustness, tracks
    from workbench import bench_view
    b = tracks.track_budget("robust-chat")

    def rows(loss):                 # loss(method, lr, seed) at the end of every run of three methods
        return [{"method": m, "lr": lr, "seed": s, "steps": b.steps, "diverged": False, "train_cpu_s": 1.0,
                 "evals": [{"step": b.steps, "val_loss": loss(m, lr, s)}]}
                for m in ("H-abs", "H-bounded", "AdamW") for lr in robustness.CORE_LRS for s in (0, 1, 2)]

    def worse_at_high_lr(m, lr, s):
        return 5.0 + (1.0 if m == "AdamW" and lr == 1e-2 else 0.0) + (0.3 if lr == 1e-2 else 0.0)

    sub = robustness.sub_budget(b, ["H-abs", "H-bounded", "AdamW"], robustness.CORE_LRS, (0, 1, 2))
    clear = robustness.robustness(rows(lambda m, lr, s: worse_at_high_lr(m, lr, s)
                                       + (0.2 if m == "H-bounded" and lr == 1e-2 else 0.0) + 0.01 * s), sub, 200)
    lead = clear["leader_unknown"]
    assert (lead["method"], lead["runner_up"]) == ("H-abs", "H-bounded") and lead["ratio"][2] < 1
    # H-bounded better on seed 0, worse on seeds 1 and 2 at the worst LR: the medians differ, the draws do not agree
    noisy = robustness.robustness(rows(lambda m, lr, s: worse_at_high_lr(m, lr, s)
                                       + ({0: -0.2, 1: 0.02, 2: 0.01}[s] if m == "H-bounded" and lr == 1e-2 else 0)),
                                  sub, 200)
    assert noisy["leader_unknown"]["ratio"][1] <= 1 <= noisy["leader_unknown"]["ratio"][2]

    def workloads(ce):
        return [{"name": n, "robustness": {"val_loss": ce}, "complete": {"seeds": [0, 1, 2]}}
                for n in ("chat", "python-docs")]
    text = robustness.verdict(workloads(clear))
    assert "**When you do not know the learning rate: H-abs** (" in text and "Level (" not in text.split("**With")[0]
    tie = robustness.verdict(workloads(noisy))
    leader, runner = noisy["leader_unknown"]["method"], noisy["leader_unknown"]["runner_up"]
    assert f"**When you do not know the learning rate: {leader} or {runner}** — not told apart" in tie
    assert "Level (paired 95 % interval holding 1): chat: " in tie
    advice = bench_view.situations(f"# r\n\n## Verdict\n\n{tie}\n")
    assert advice[0] == (f"**LR unknown** → {leader} or {runner} — not told apart, the smallest worst-case loss "
                         "over the 100× grid on both workloads.")


def test_the_robustness_report_lists_every_budget_probe_and_says_whether_one_decides(tmp_path):
    """Each budget-probe/*/probe.json becomes one line (workload, steps, precision, the command that reruns it, the
    ratio, its CPU), and the report says "none … passes" with the summed CPU until a probe's interval is below 1."""
    import json

    from benchmarks import robustness

    def probe(name, workload, steps, measured, met, bits=None, cpu=360.0, batch=None):
        folder = tmp_path / "budget-probe" / name
        folder.mkdir(parents=True)
        data = {"budget": {"workload": workload, "steps": steps, "seeds": [0, 1, 2], "grid": [1e-3, 3e-3]},
                "sanity": {"measured": measured, "met": met}, "runs": 10, "runs_cpu_seconds": cpu}
        if bits is not None:
            data["bits"] = bits
        if batch is not None:           # probes before --batch existed have no batch_size: they ran at 16
            data["budget"]["batch_size"] = batch
        (folder / "probe.json").write_text(json.dumps(data))
    probe("docs-400-fp32", "docs-quick", 400, "1.047 [1.041, 1.048]", False, bits=32.0)
    probe("quick-400", "quick", 400, "0.997 [0.990, 1.009]", False)
    probes = robustness.read_probes(tmp_path / "budget-probe")
    assert [p["name"] for p in probes] == ["chat, 400 steps, ternary QAT", "python-docs, 400 steps, full precision"]
    assert probes[1]["command"].endswith("--grid 0.001,0.003 --bits 32 --out benchmarks/results/budget-probe/"
                                         "docs-400-fp32")
    assert "--bits" not in probes[0]["command"]
    text = "\n".join(robustness.probes_md(probes))
    assert "none of the 2 probed budgets passes, in 0.20 CPU-h of probe runs" in text
    assert "- python-docs, 400 steps, full precision (`python -m benchmarks.budget_probe" in text
    probe("docs-1600", "docs-quick", 1600, "0.980 [0.970, 0.990]", True)
    text = "\n".join(robustness.probes_md(robustness.read_probes(tmp_path / "budget-probe")))
    assert "found at python-docs, 1600 steps, ternary QAT." in text
    probe("quick-1600-b4", "quick", 1600, "0.973 [0.969, 0.979]", True, batch=4)
    probes = robustness.read_probes(tmp_path / "budget-probe")
    b4 = next(p for p in probes if p["budget"].get("batch_size") == 4)
    assert b4["name"] == "chat, 1600 steps, batch 4, ternary QAT"
    assert b4["command"].endswith("--grid 0.001,0.003 --batch 4 --out benchmarks/results/budget-probe/quick-1600-b4")
    assert all("--batch" not in p["command"] for p in probes if p is not b4)


def test_a_budget_where_the_constant_lr_overfits_does_not_decide():
    """budget_probe.sanity: tuned cosine ÷ tuned constant below 1 decides only when the constant LR's held-out loss
    was still falling in the budget's second half. On chat at 1600 steps (37 passes over 45 k tokens) it bottoms out
    near step 400 and rises: cosine's lower final loss is less overfitting, not a better schedule."""
    from benchmarks import budget_probe, tracks
    b = budget_probe.budget("quick", 1600, 3, (1e-3, 3e-3))
    b.n_boot = 200

    def rows(constant_curve):
        out = []
        for m in ("AdamW", "AdamW-cos"):
            for lr in b.grid:
                for s in (*b.seeds, b.tuning_seed):
                    curve = constant_curve if m == "AdamW" else (lambda step: 5.0 - step / 1600)
                    shift = 0.0 if lr == 1e-3 else 0.3
                    out.append({"method": m, "lr": lr, "seed": s, "steps": 1600, "evals": [
                        {"step": st, "val_loss": curve(st) + shift + 0.001 * s} for st in range(80, 1601, 80)]})
        return out
    overfit = budget_probe.sanity(rows(lambda step: 4.5 + abs(step - 400) / 1000), b)     # lowest at 400, then up
    assert overfit["met"] and overfit["overfit"] and not overfit["decides"]
    assert overfit["constant_best_step"] == 400 and "lowest at step 400 of 1600, then rising" in overfit["measured"]
    falling = budget_probe.sanity(rows(lambda step: 5.0 - step / 2000), b)                 # still falling at 1600
    assert falling["met"] and not falling["overfit"] and falling["decides"]
    assert tracks.best_step({"evals": [{"step": 5, "val_loss": float("nan")}]}) == float("inf")


def test_the_cost_row_prefers_the_interleaved_measurement_of_todays_default(tmp_path):
    """robustness.cost_from_file: cost.json's alternating pairs (measure_cost) → the paired ratio of medians; a file
    that measured another method than today's default is not used (the report falls back to the journal's rows)."""
    import json

    from benchmarks import robustness
    path = tmp_path / "cost.json"
    assert robustness.cost_from_file(path, "H-rms-free") is None
    path.write_text(json.dumps({"method": "H-rms-free", "ref": "AdamW", "steps": 200,
                                "pairs": [[102.0, 100.0], [104.0, 100.0], [103.0, 100.0]]}))
    cost = robustness.cost_from_file(path, "H-rms-free", n_boot=200)
    assert cost["ratio"][0] == pytest.approx(1.03) and cost["runs"] == 3 and cost["interleaved"]
    assert 1.02 <= cost["ratio"][1] <= cost["ratio"][0] <= cost["ratio"][2] <= 1.04
    assert robustness.cost_from_file(path, "H-abs") is None


def test_a_journal_replaced_during_a_protocol_keeps_every_later_row(tmp_path, monkeypatch):
    """tracks.run_prepared appends each finished run by opening the journal anew: when the file is replaced
    underneath it (as `git stash` / `git checkout` of committed results does), the next rows land in the file on
    disk, not in the unlinked one the protocol held open."""
    import json
    import os

    from benchmarks import tracks
    from benchmarks.harness import RunSpec
    journal = tmp_path / "runs.jsonl"
    journal.write_text("")
    specs = [RunSpec("W2", tracks.ALL_TRACK["AdamW"], tracks.BITS, 1e-3, seed, 4, 4, 4) for seed in range(3)]

    def fake_run(spec):
        if spec.seed == 1:                    # between the first and the second row: the file is replaced
            copy = tmp_path / "replacement"
            copy.write_text(journal.read_text())
            os.replace(copy, journal)
        return {"method": spec.method.key, "lr": spec.lr, "seed": spec.seed, "steps": spec.steps, "evals": [],
                "train_cpu_s": 0.0}
    monkeypatch.setattr(tracks, "run_one", fake_run)
    tracks.run_prepared(specs, None, lambda m: None, journal)
    assert [json.loads(line)["seed"] for line in journal.read_text().splitlines()] == [0, 1, 2]


def test_the_verdict_says_beside_the_loss_which_method_ends_closest_to_the_teacher():
    """A distillation result needs both metrics (issue 16): when every workload has the KL robustness, the verdict
    adds "closest to the teacher" advice for each situation from those numbers (here they disagree with the
    cross-entropy's), and the page shows it as two more "What to use" lines."""
    from benchmarks.robustness import verdict
    from workbench import bench_view
    ce = {"best": 4.0, "best_method": "Muon", "best_lr": 1e-2,
          "methods": {"H-abs": {"worst": (1.02, 1.01, 1.03)}, "Muon": {"worst": (1.20, 1.15, 1.25)}}}
    kl = {"best": 0.4, "best_method": "H-abs", "best_lr": 1e-3,
          "methods": {"H-abs": {"worst": (1.50, 1.45, 1.55)}, "Muon": {"worst": (1.10, 1.05, 1.12)}}}
    workloads = [{"name": n, "robustness": {"val_loss": ce, "kl_teacher": kl}, "complete": {"seeds": [0, 1, 2]}}
                 for n in ("chat", "python-docs")]
    text = verdict(workloads)
    assert "**When you do not know the learning rate: H-abs**" in text
    assert "**Closest to the teacher when you do not know the learning rate: Muon**" in text
    assert "**Closest to the teacher with a tuned learning rate: H-abs**" in text
    assert "by KL to the teacher — Muon 1.100 [1.050, 1.120], then H-abs" in text
    advice = bench_view.situations(f"# r\n\n## Verdict\n\n{text}\n")
    assert [a.split(" → ")[0] for a in advice] == ["**LR unknown**", "**LR tuned**",
                                                    "**LR unknown, closest to the teacher**",
                                                    "**LR tuned, closest to the teacher**"]
    assert advice[2].startswith("**LR unknown, closest to the teacher** → Muon (")
    without = [dict(w, robustness={"val_loss": ce}) for w in workloads]     # no KL measured: no KL advice
    assert "Closest to the teacher" not in verdict(without)
