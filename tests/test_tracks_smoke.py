"""Issue 10's two-track benchmark: the Muon baseline, the track statistics, the targets table, and a CI smoke run
(seconds on the quick workload) whose report has every track, method and target row: that one is
test_benchmarks_smoke.py::test_smoke_run_has_every_track_method_and_target_row, which reads the tracks `bench_hybrid.py
--smoke` writes (one smoke run for both)."""
import math

import numpy as np
import pytest
import torch

from benchmarks import stats, tracks
from benchmarks.tracks_report import targets_table, verdict
from hybrid_optimization.optim import MuonWithAdamW, is_hidden_matrix

pytestmark = pytest.mark.timeout(1800)


def _tiny_lm():
    from hybrid_optimization.distill.student import StudentConfig, StudentLM
    torch.manual_seed(0)
    return StudentLM(StudentConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8))


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = _tiny_lm()
    opt = MuonWithAdamW(model, lr=1e-2)
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_ids) == (p.ndim == 2 and not name.startswith(("embed", "lm_head"))), name
        assert is_hidden_matrix(name, p) == (id(p) in muon_ids)
    assert {id(p) for g in opt.adamw.param_groups for p in g["params"]}.isdisjoint(muon_ids)


def test_muon_with_adamw_trains_and_a_scheduler_drives_both_parts():
    model = _tiny_lm()
    opt = MuonWithAdamW(model, lr=3e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    ids = torch.randint(0, 32, (8, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 32), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if len(losses) <= 2:
            sched.step()
    assert losses[-1] < 0.7 * losses[0]
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(3e-2 / 4)       # two scheduler steps: × 0.25
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(3e-2 / 4)
    assert len(opt.state) == sum(1 for p in model.parameters())           # both states visible, for memory figures
    assert all("exp_avg" in opt.state[p] for g in opt.adamw.param_groups for p in g["params"])
    assert all("momentum_buffer" in opt.state[p] for g in opt.muon.param_groups for p in g["params"])
    assert len(opt.muon.state) == sum(len(g["params"]) for g in opt.muon.param_groups)   # reading adds nothing


def test_grid_score_profile_and_bootstrap():
    inf = math.inf
    # 3 LRs × 2 seeds: per-LR medians 15, inf, 40 → median over the grid 40
    assert tracks.grid_score(np.array([[10, 20], [inf, inf], [30, 50]])) == 40
    assert tracks.grid_score(np.array([[inf, inf], [inf, 5], [inf, inf]])) == inf
    rho = tracks.performance_profile({"a": np.array([10, 20, inf]), "b": np.array([20, 20, inf])},
                                     np.array([1.0, 2.0, inf]))
    assert rho["a"].tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert rho["b"].tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    a = np.array([[10, 11, 12, 10, 11]] * 3, dtype=float)
    point, low, high = tracks.paired_bootstrap(a, 2 * a, tracks.grid_score, n_boot=200)
    assert point == pytest.approx(0.5) and high < 1


@pytest.mark.parametrize("score", [tracks.grid_score, stats.median], ids=["grid_score", "median"])
def test_batched_bootstrap_equals_one_draw_at_a_time(score):
    """The reports' scores run on every bootstrap draw at once (tracks.BATCHED_SCORES); the same draws scored one at
    a time must give the same (point, low, high), bit for bit, with misses (inf), zeros and NaN in the samples."""
    rng = np.random.default_rng(7)
    for trial in range(60):
        shape = (int(rng.integers(1, 5)), int(rng.integers(1, 7))) if score is tracks.grid_score \
            else (int(rng.integers(1, 7)),)
        a, b = (rng.normal(1.0, 0.3, size=shape) for _ in range(2))
        for x in (a, b):
            mask = rng.random(shape)
            x[mask < 0.15], x[(mask >= 0.15) & (mask < 0.2)] = math.inf, 0.0
            if trial % 10 == 0:
                x[mask > 0.95] = math.nan
        one_at_a_time = lambda x: score(x)  # noqa: E731  (not a key of BATCHED_SCORES: the loop)
        assert one_at_a_time not in tracks.BATCHED_SCORES
        batched = tracks.paired_bootstrap(a, b, score, n_boot=300, seed=trial)
        looped = tracks.paired_bootstrap(a, b, one_at_a_time, n_boot=300, seed=trial)
        np.testing.assert_array_equal(batched, looped)


def _analysis(hybrid_wins: bool) -> tuple[dict, tracks.TrackBudget]:
    """A synthetic analysis (5 seeds): AdamW never reaches the target (final 2.2), the other baselines reach it at
    step 100 (final 2.0 = the target), H at step 50 (final 1.8, smaller gap) or never (final 2.5, larger gap)."""
    b = tracks.track_budget("smoke")
    b.seeds = (0, 1, 2, 3, 4)
    curves = {"AdamW": (3.0, 2.2, 0.2), "H": (1.9, 1.8, 0.1) if hybrid_wins else (3.0, 2.5, 0.3)}
    rows = []
    runs = [(m, lr, s) for m in b.methods for lr in b.grid for s in (b.tuning_seed, *b.seeds)]
    runs += [(m, b.ablation_lr, s) for m in b.ablations for s in b.seeds]
    for m, lr, seed in runs:
        v50, v100, gap = curves.get(m, (3.0, 2.0, 0.2))
        rows.append({"method": m, "lr": lr, "seed": seed, "diverged": False, "cpu_ms_per_step": 10.0,
                     "optimizer_state_mb": 1.0, "evals": [{"step": 50, "val_loss": v50, "val_loss_fp": v50},
                                                          {"step": 100, "val_loss": v100, "val_loss_fp": v100 - gap}]})
    return tracks.analyse(rows, b, n_boot=200), b


def test_targets_table_says_yes_only_when_the_bar_is_met():
    good, b = _analysis(hybrid_wins=True)
    assert good["target"] == 2.0
    rows = tracks.targets(good, b)
    assert len(rows) == 5 and all(r["met"] for r in rows), rows
    bad, b = _analysis(hybrid_wins=False)
    rows = tracks.targets(bad, b)
    assert [r["met"] for r in rows] == [False, False, False, False, True]      # the sanity row is about AdamW
    table = "\n".join(targets_table(rows))
    assert table.count("| **no** |") == 4 and table.count("| **yes** |") == 1
    assert "Leave `--hybrid` off" in verdict(bad, b) and "**Switch `--hybrid` on**" in verdict(good, b)


def test_robustness_ratios_are_worst_and_median_over_the_grid_of_the_best_tuned_run():
    """Two methods, two LRs, three seeds, numbers chosen by hand: A ends at 5.0 (lr 1e-3) and 6.0 (lr 1e-2), B at 5.5
    at both; the best tuned run is A at 1e-3 (5.0). A: worst 6/5 = 1.2, median 5.5/5 = 1.1; B: 1.1 and 1.1. A diverged
    seed at B's second LR makes only the median over seeds move; all three diverged make B's worst ∞."""
    from benchmarks.tracks_report import robustness
    b = tracks.TrackBudget("t", "tiny", (0, 1, 2), 100, 10, 4, 5, (1e-3, 1e-2), ("A", "B"), (), n_boot=200)

    def row(m, lr, seed, loss):
        return {"method": m, "lr": lr, "seed": seed, "steps": 10, "evals": [{"step": 10, "val_loss": loss}]}
    rows = [row("A", 1e-3, s, 5.0) for s in b.seeds] + [row("A", 1e-2, s, 6.0) for s in b.seeds]
    rows += [row("B", lr, s, 5.5) for lr in b.grid for s in b.seeds]
    r = robustness(rows, b, b.n_boot)
    assert (r["best"], r["best_method"], r["best_lr"]) == (5.0, "A", 1e-3)
    assert r["methods"]["A"]["worst"] == pytest.approx((1.2, 1.2, 1.2)) and r["methods"]["A"]["worst_lr"] == 1e-2
    assert r["methods"]["A"]["median"] == pytest.approx((1.1, 1.1, 1.1))
    assert r["methods"]["B"]["worst"] == pytest.approx((1.1, 1.1, 1.1))
    assert robustness(rows, b, b.n_boot, key="kl_teacher") is None          # these rows have no KL
    rows[-1]["evals"][0]["val_loss"] = float("nan")                          # one diverged seed: median moves not
    assert robustness(rows, b, b.n_boot)["methods"]["B"]["worst"][0] == pytest.approx(1.1)
    for r_ in rows[-3:]:
        r_["evals"][0]["val_loss"] = float("nan")
    assert math.isinf(robustness(rows, b, b.n_boot)["methods"]["B"]["worst"][0])


def test_every_hybrid_variant_trains_and_an_interrupted_protocol_resumes_from_its_journal(tmp_path):
    """Issue 10's candidate changes to H (Muon direction, per-group multipliers, relative trust region, later plan,
    meta horizon) each run through the pipeline's step; the journal keeps every finished run, so a second
    invocation runs nothing again."""
    b = tracks.track_budget("smoke")
    keys = [m.key for m in tracks.VARIANTS] + ["H-h8"]
    specs = [tracks.RunSpec("W2", tracks.ALL_TRACK[k], tracks.BITS, 1e-3, 0, b.steps, b.batch_size, b.eval_every,
                            "cpu") for k in keys]
    journal = tmp_path / "runs.jsonl"
    said = []
    rows = tracks.run_all(specs, b.workload, "cpu", 1, 1, said.append, journal)
    assert sorted(r["method"] for r in rows) == sorted(keys)
    assert all(r["steps_done"] == b.steps and r["evals"] for r in rows), rows
    with open(journal, "a") as f:
        f.write('{"method": "H-mu')                     # a line a kill cut short is ignored, not fatal
    said.clear()
    again = tracks.run_all(specs, b.workload, "cpu", 1, 1, said.append, journal)
    assert said == [f"  {len(keys)} of {len(keys)} runs reused from {journal}"]
    assert sorted(map(repr, again)) == sorted(map(repr, rows))


def test_when_no_method_reaches_the_target_over_the_grid_the_verdict_ranks_by_final_loss():
    """A budget too short for steps to target (every method misses at most LRs): the self-tuning verdict must not
    read ∞/∞ = 1.00 as "indistinguishable"; it says so and ranks by the final loss over the grid."""
    b = tracks.track_budget("smoke")
    b.seeds = (0, 1, 2, 3, 4)
    rows = []
    for m in b.methods:
        for lr in b.grid:
            for seed in (b.tuning_seed, *b.seeds):
                # the reference reaches its own target (2.0) only at lr 1e-3; H ends lowest everywhere else
                end = 2.0 if (m == tracks.REFERENCE and lr == 1e-3) else (2.05 if m == "H" else 2.3)
                rows.append({"method": m, "lr": lr, "seed": seed, "diverged": False, "cpu_ms_per_step": 10.0,
                             "optimizer_state_mb": 1.0,
                             "evals": [{"step": 50, "val_loss": 3.0, "val_loss_fp": 2.9},
                                       {"step": 100, "val_loss": end, "val_loss_fp": end - 0.1}]})
    rows += [{"method": m, "lr": b.ablation_lr, "seed": s, "diverged": False, "cpu_ms_per_step": 10.0,
              "optimizer_state_mb": 1.0, "evals": [{"step": 100, "val_loss": 2.3, "val_loss_fp": 2.2}]}
             for m in b.ablations for s in b.seeds]
    a = tracks.analyse(rows, b, n_boot=200)
    assert all(math.isinf(v["score"]) for v in a["selftune"].values())
    h = a["selftune"]["H"]
    assert h["final_score"] == pytest.approx(2.05) and h["final_vs"]["AdamW"][2] < 1
    text = verdict(a, b)
    assert "no method reaches the target at most LRs of the grid" in text and "rank 1 of" in text
    assert "1.00 [1.00, 1.00]× the steps" not in text
    assert "**Without tuning, `--hybrid` ends lower than AdamW at a constant LR**" in text


def test_robustness_report_has_a_row_per_method_and_per_issue16_target_from_a_partial_protocol(tmp_path, monkeypatch):
    """Issue 16's two-workload report from synthetic journals cut short: chat has seeds 0–2 at the grid's ends and
    middle (the tuning seed for four methods, no H-bounded at all), python-docs only seeds 0–1. Each workload's
    tables rest on its largest complete set and say so; the targets table has one row per target of the issue,
    **yes** only when met on both workloads, "not measured" where a workload lacks the runs."""
    from benchmarks import robustness
    monkeypatch.setattr(robustness, "hybrid_default_key", lambda: "H-abs")

    def end(mode, m, lr):          # H-abs flat at the best loss on chat, 10 % worse at lr 1e-2 on python-docs
        if m == "H-abs":
            return 5.5 if (mode == "robust-docs" and lr == 1e-2) else 5.0
        return (5.1 if m == "AdamW" else 5.0) if lr == 1e-3 else 6.0

    def row(mode, m, lr, seed):
        loss = end(mode, m, lr) + 0.001 * seed
        return {"method": m, "lr": lr, "seed": seed, "steps": 400, "diverged": False,
                "cpu_ms_per_step": 10.4 if m.startswith("H") else 10.0, "optimizer_state_mb": 1.0,
                "mean_multiplier": 1.0, "train_cpu_s": 4.0,
                "evals": [{"step": 400, "val_loss": loss, "val_loss_fp": loss, "kl_teacher": loss - 4.0}]}
    methods = [m for m in tracks.ROBUST_METHODS if m != "H-bounded"]
    chat = [row("robust-chat", m, lr, s) for m in methods for lr in robustness.CORE_LRS for s in (0, 1, 2)]
    chat += [row("robust-chat", m, lr, 100) for m in ("AdamW", "AdamW-cos", "H-abs", "Muon")
             for lr in robustness.CORE_LRS]
    docs = [row("robust-docs", m, lr, s) for m in tracks.ROBUST_METHODS for lr in robustness.CORE_LRS for s in (0, 1)]
    path = robustness.report(tmp_path / "robustness", n_boot=200, rows={"robust-chat": chat, "robust-docs": docs},
                             results=tmp_path)
    text = path.read_text()
    assert text.startswith("# LR robustness on two workloads") and "Partial:" in text
    chat_part = text[text.index("## chat"):text.index("## python-docs")]
    docs_part = text[text.index("## python-docs"):text.index("## Setup")]
    assert "seeds [0, 1, 2], LRs 0.0001, 0.001, 0.01" in chat_part and "not yet run to completion: H-bounded" in chat_part
    assert "seeds [0, 1], LRs" in docs_part and "not yet run to completion" not in docs_part
    for m in methods:       # the cross-entropy table, its KL twin, the per-LR table (+ the multipliers for H-*)
        assert chat_part.count(f"| **{m}** | ") == (4 if m.startswith("H") else 3), m
    h = next(r for r in chat_part.splitlines() if r.startswith("| **H-abs** | "))
    assert h.split(" | ")[1].startswith("1.000 [")
    rows = {r.split(" | ")[0].lstrip("| "): r for r in text.splitlines() if r.startswith("| `--hybrid` default")
            or r.startswith(("| worst-case", "| external", "| sanity", "| cost per step"))}
    assert len(rows) == len(robustness.TARGETS) == 6
    worst = rows["`--hybrid` default: worst LR of the 100× grid ÷ best tuned run of any method"]
    assert "≤ 1.03×" in worst and "H-abs 1.000" in worst and "H-abs 1.100" in worst and worst.endswith("| **no** |")
    assert rows["cost per step ÷ AdamW (CPU, same run)"].endswith("| **yes** |")          # 1.04 on both
    sanity = rows["sanity: tuned cosine beats tuned constant LR"]           # met on chat, no tuning runs on docs
    assert "0.980 [0.980, 0.980] (AdamW-cos 5.0010 at lr 0.001 vs AdamW 5.1010 at lr 0.001; 3 seeds" in sanity
    assert sanity.endswith("| not measured |")
    external = rows["external tuning: `--hybrid` tuned ÷ Muon tuned, final validation loss"]
    assert "not measured (no tuning-seed runs for both)" in external and external.endswith("| not measured |")
    assert "**Not decided**: the complete runs have only 2 seeds" in text           # python-docs' two seeds
    assert "Leading so far — LR unknown: chat (chatterbot-corpus) H-abs; python-docs H-abs" in text
    commands = text[text.index("## Run any method yourself"):]      # every method, as a distillation.py command
    assert [r.split(" | ")[0].lstrip("| ") for r in commands.splitlines()[6:]
            if r.startswith("| ")] == list(tracks.ROBUST_METHODS)
    assert "| H-abs | `--hybrid --schedule constant --lr 0.001 --trust_region_mode absolute` | " \
           '`{"projected_hypergradient": true}` |' in commands
    saved = (tmp_path / "robustness" / "results.json").read_text()
    assert '"protocol": "robustness"' in saved and '"H-muon": "H with Muon' in saved       # labels travel
    assert (tmp_path / "robustness" / "figures.html").stat().st_size > 1000


def test_robustness_report_reads_its_verdict_at_the_longest_budget_complete_on_both_workloads(tmp_path):
    """Issue 16 reads its targets at the budget that decides (tuned cosine beats tuned constant). With 1600-step runs
    on python-docs only, the verdict stays at 400 steps and the 1600-step targets table says it has one workload;
    once both workloads have a complete set at 1600 steps, the verdict and the first targets table move there."""
    from benchmarks import robustness

    def rows(mode, steps, methods=("AdamW", "H-abs", robustness.hybrid_default_key(), "Muon")):
        def end(m, lr):
            return 5.0 if m.startswith("H") else (4.9 if lr == 1e-3 else 6.0)
        return [{"method": m, "lr": lr, "seed": s, "steps": steps, "diverged": False, "cpu_ms_per_step": 10.0,
                 "optimizer_state_mb": 1.0, "mean_multiplier": 1.0, "train_cpu_s": 4.0,
                 "evals": [{"step": steps, "val_loss": end(m, lr) + 0.001 * s, "val_loss_fp": 5.0,
                            "kl_teacher": 1.0}]} for m in methods for lr in robustness.CORE_LRS for s in (0, 1, 2)]
    base = {"robust-chat": rows("robust-chat", 400), "robust-docs": rows("robust-docs", 400)}
    one = robustness.report(tmp_path / "one", n_boot=100, results=tmp_path,
                            rows={**base, "robust-docs-1600": rows("robust-docs-1600", 1600)}).read_text()
    assert one.index("Read at 400 steps") < one.index("## Targets at 400 steps") < one.index(
        "## Targets at 1600 steps") < one.index("## python-docs, 1600 steps")
    at_1600 = one[one.index("## Targets at 1600 steps"):one.index("A target is **yes**")]
    assert "the protocol has runs here on python-docs only" in at_1600 and "chat" not in at_1600
    assert "| **no** on python-docs only |" in at_1600          # the median row: the default 5.0 ÷ AdamW 4.9 > 1.01
    both = robustness.report(tmp_path / "both", n_boot=100, results=tmp_path,
                             rows={**base, "robust-docs-1600": rows("robust-docs-1600", 1600),
                                   "robust-chat-1600": rows("robust-chat-1600", 1600)}).read_text()
    assert both.index("Read at 1600 steps") < both.index("## Targets at 1600 steps") < both.index(
        "## Targets at 400 steps")
    assert "## chat (chatterbot-corpus), batch 4, 1600 steps" in both and "## chat (chatterbot-corpus), 400 steps" in both
    import json
    saved = json.loads((tmp_path / "both" / "results.json").read_text())
    assert saved["steps"] == 1600 and [b["steps"] for b in saved["other_budgets"]] == [400]
    assert tracks.track_budget("robust-docs-1600").eval_every == 80        # 5 % of the budget, as the probe's


def test_robustness_protocol_runs_the_decision_first():
    """The journal's order: the grid's ends and middle on seeds 0–2 (seed by seed) for the six methods the targets
    need, then for the other three, then the tuning seed there, then the other two LRs, then seeds 3–4 — so a cut
    leaves complete sets."""
    from benchmarks import robustness
    b = tracks.track_budget("robust-chat")
    order = sorted(tracks.specs_for(b, "cpu"), key=robustness.priority(b))
    n1, n2 = robustness.FIRST_METHODS * 9, (len(b.methods) - robustness.FIRST_METHODS) * 9
    first, second = order[:n1], order[n1:n1 + n2]
    assert {s.method.key for s in first} == set(b.methods[:robustness.FIRST_METHODS])
    assert {s.method.key for s in second} == set(b.methods[robustness.FIRST_METHODS:])
    for part in (first, second):
        assert {s.seed for s in part} == {0, 1, 2} and {s.lr for s in part} == set(robustness.CORE_LRS)
        assert [s.seed for s in part[:len(part) // 3]] == [0] * (len(part) // 3)     # seed by seed
    assert {s.seed for s in order[n1 + n2:n1 + n2 + len(b.methods) * 3]} == {b.tuning_seed}
    assert {s.seed for s in order[-len(b.methods) * 5 * 2:]} == {3, 4}


def test_a_partial_protocol_reports_the_methods_before_more_seeds():
    """Six methods on seed 0 beat one method on seeds 0–1 (a robustness table of one method says nothing); once
    the six have three seeds, those win over seven methods on fewer."""
    from benchmarks import robustness
    b = tracks.track_budget("robust-chat")
    row = lambda m, lr, s: {"method": m, "lr": lr, "seed": s, "steps": 400, "evals": []}  # noqa: E731
    six = b.methods[:robustness.FIRST_METHODS]
    rows = [row(m, lr, 0) for m in six for lr in robustness.CORE_LRS] + [row("AdamW", lr, 1) for lr in b.grid]
    methods, grid, seeds = robustness.complete_set(tracks.Runs(rows), b)
    assert set(methods) == set(six) and seeds == (0,) and len(grid) == 3
    rows += [row(m, lr, s) for m in six for lr in robustness.CORE_LRS for s in (1, 2)]
    rows += [row(b.methods[6], lr, 0) for lr in robustness.CORE_LRS]
    methods, grid, seeds = robustness.complete_set(tracks.Runs(rows), b)
    assert set(methods) == set(six) and seeds == (0, 1, 2)


def test_the_sanity_row_reads_a_budget_probes_narrower_tuning_grid():
    """robustness.tuned_ratio tunes each method on the tuning seed over the whole grid, its ends and middle, or — a
    budget probe's runs — any ≥ 3 grid LRs both methods were tuned on; fewer than 3 is no tuning at all."""
    from benchmarks import robustness
    b = tracks.track_budget("robust-docs-1600")

    def row(m, lr, seed):
        loss = (4.40 if m == "AdamW-cos" else 4.58) + abs(math.log10(lr) + 3) * 0.1 + 0.001 * seed
        return {"method": m, "lr": lr, "seed": seed, "steps": 1600, "evals": [{"step": 1600, "val_loss": loss}]}
    probe_grid = (3e-4, 1e-3, 3e-3)
    rows = [row(m, lr, 100) for m in ("AdamW", "AdamW-cos") for lr in probe_grid]
    rows += [row(m, 1e-3, s) for m in ("AdamW", "AdamW-cos") for s in (0, 1, 2)]
    got = robustness.tuned_ratio(tracks.Runs(rows), b, "AdamW-cos", "AdamW")
    assert got["grid"] == list(probe_grid) and got["lr"] == got["ref_lr"] == 1e-3 and got["seeds"] == [0, 1, 2]
    assert got["ratio"][2] < 1 and not got["ref_overfit"]
    two = [r for r in rows if r["lr"] != 3e-3]
    assert robustness.tuned_ratio(tracks.Runs(two), b, "AdamW-cos", "AdamW") is None


def test_workload_info_is_rewritten_only_when_the_workload_changes(tmp_path):
    """A resumed protocol prepares its workload again (seconds on a warm cache): that timing alone must not rewrite
    the committed workload.json; a changed workload must."""
    import json

    from benchmarks.robustness import write_workload_info
    info = {"train_tokens": 1000, "vocab": 887, "teacher_val_loss": 3.646, "prepare_s": 95.2}
    assert write_workload_info(tmp_path, info)
    assert not write_workload_info(tmp_path, dict(info, prepare_s=3.1))           # a warm resume
    assert json.loads((tmp_path / "workload.json").read_text())["prepare_s"] == 95.2
    assert not write_workload_info(tmp_path, dict(info, teacher_val_loss=3.646 + 4e-7))  # a float sum's last digits
    assert write_workload_info(tmp_path, dict(info, teacher_val_loss=3.7))            # another teacher: rewritten
    assert write_workload_info(tmp_path, info)
    assert write_workload_info(tmp_path, dict(info, train_tokens=2000, prepare_s=3.1))
    assert json.loads((tmp_path / "workload.json").read_text()) == dict(info, train_tokens=2000, prepare_s=3.1)
    (tmp_path / "workload.json").write_text("{torn")                               # unreadable: written again
    assert write_workload_info(tmp_path, info)


def test_a_second_cost_measurement_waits_for_the_first(tmp_path, monkeypatch):
    """Two `--cost` measurements of one workload at once would disturb each other and the later would overwrite the
    earlier's cost.json: the second waits for the first's lock, says so, then measures."""
    import threading

    from benchmarks import robustness
    events, first_inside, release = [], threading.Event(), threading.Event()

    def fake_measure(mode, pairs, steps, log, target):
        events.append(("start", threading.current_thread().name))
        if threading.current_thread().name == "first":
            first_inside.set()
            assert release.wait(30)
        target.write_text(threading.current_thread().name)
        events.append(("end", threading.current_thread().name))
        return {}

    monkeypatch.setattr(robustness, "_measure_cost", fake_measure)
    said = []
    first = threading.Thread(target=robustness.measure_cost, args=("robust-chat",), name="first",
                             kwargs={"results": tmp_path, "log": lambda m: None})
    second = threading.Thread(target=robustness.measure_cost, args=("robust-chat",), name="second",
                              kwargs={"results": tmp_path, "log": said.append})
    first.start()
    assert first_inside.wait(30)
    second.start()
    second.join(1.0)
    assert second.is_alive() and events == [("start", "first")]       # waiting on the lock, not measuring
    release.set()
    first.join(30), second.join(30)
    assert events == [("start", "first"), ("end", "first"), ("start", "second"), ("end", "second")]
    assert any("waiting for another run" in m and "cost row of robust-chat" in m for m in said)
    assert (tmp_path / "robust-chat" / "cost.json").read_text() == "second"


def _described(optimizer, scheduler) -> tuple:
    """What two optimizers must share to train alike: their class, their state_dict before any step (param groups
    with every hyperparameter, nested for Muon + AdamW), the aux net's settings, and the LR factor per step."""
    aux = getattr(optimizer, "aux_net", None)
    factors = [] if scheduler is None else [[f(s) for f in scheduler.lr_lambdas] for s in range(0, 201, 5)]
    return (type(optimizer).__name__, repr(optimizer.state_dict()), factors,
            None if aux is None else (aux.hidden_size, aux.learning_rate, repr(aux.state_dict())))


@pytest.mark.parametrize("key", tracks.ROBUST_METHODS)
def test_every_robustness_method_is_a_product_command_that_builds_the_optimizer_the_report_measured(key, tmp_path):
    """Issue 16's "a user can run every method of the report": the flags the report prints for a method, parsed by
    `distillation.py`'s own parser and planned like a run, build the optimizer and schedule the benchmark built
    for that method — the same class, hyperparameters in every param group, aux net and LR factor at every step."""
    import json

    from benchmarks.methods import build_optimizer, hybrid_config, product_flags
    from hybrid_optimization.distill.cli import parse_options
    from hybrid_optimization.distill.plan import plan_run
    from hybrid_optimization.distill.setup import make_optimizer
    method, lr, steps = tracks.ALL_TRACK[key], 3e-3, 200
    flags, config = product_flags(method, lr)
    if config:
        (tmp_path / "config.json").write_text(json.dumps(config))
        flags += ["--config", str(tmp_path / "config.json")]
    plan = plan_run(parse_options([*flags, "--ternary", "--qat", "--max_steps", str(steps)]))
    torch.manual_seed(0)
    product = make_optimizer(plan, _tiny_lm(), n_clusters=8)
    cfg = hybrid_config(method, lr, tracks.BITS, steps, 32, 0)
    torch.manual_seed(0)
    bench = build_optimizer(method, _tiny_lm(), cfg, steps, 8)
    assert _described(*product) == _described(*bench)
