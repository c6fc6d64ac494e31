"""The report of the two-track benchmark (issue 10): verdict first, then the targets table, then the evidence.

Every sentence of the verdict and every cell is computed from this run's rows (tracks.analyse / tracks.targets);
nothing is typed in by hand. Files: report.md, results.json (everything), runs.csv (one row per run, every
evaluation's step and validation loss), figures.html (performance profile, steps to target over the LR grid).
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

# LR robustness (issue 16): the statistics and the table live with the two-workload protocol (robustness.py)
from benchmarks.robustness import robustness, robustness_table  # noqa: F401  (robustness is re-exported)
from benchmarks.tracks import ALL_TRACK, REFERENCE, TrackBudget, fmt_ci


def _f(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _steps(x) -> str:
    return "∞ (miss)" if math.isinf(x) else f"{x:.0f}"


def _kind(v) -> str:
    """'fewer' / 'more' / 'indistinguishable' for a (point, low, high) ratio of steps."""
    if v[2] < 1:
        return "fewer"
    if v[1] > 1:
        return "more"
    return "indistinguishable"


def _loss_kind(v) -> str:
    """'lower' / 'higher' / 'indistinguishable' for a (point, low, high) ratio of losses."""
    return {"fewer": "lower", "more": "higher"}.get(_kind(v), "indistinguishable")


def robustness_section(result: dict, b: TrackBudget) -> list[str]:
    rob = result.get("robustness") or {}
    ce, kl = rob.get("val_loss"), rob.get("kl_teacher")
    if ce is None:
        return []
    lines = ["## LR robustness (issue 16)", "",
             "The question a user without a tuned LR asks: how far from the best achievable loss does each method "
             "end when its LR is off by up to 100×? Intervals: 95 % paired bootstrap over seeds (same draws for "
             "every method and LR; the best tuned run recomputed on each draw). A diverged run counts as ∞. "
             "Figure: final loss against LR, one line per method, in figures.html.", "",
             "By the held-out cross-entropy (final validation loss):", "", *robustness_table(ce, b, "cross-entropy"),
             ""]
    if kl is not None:
        lines += ["By the KL to the teacher on the same held-out windows (the student's gap to its teacher):", "",
                  *robustness_table(kl, b, "KL to the teacher"), ""]
    else:
        lines += ["KL to the teacher: these runs did not record it (runs from now on keep `kl_teacher` in every "
                  "evaluation, and this table gets a KL twin).", ""]
    if "Prodigy" not in ce["methods"]:
        lines += ["Prodigy (the LR-free anchor) is not among these runs: its rows appear once the protocol is run "
                  "again (it is on the grid now; `bench_hybrid.py --medium` runs only the missing runs).", ""]
    return lines


def verdict(a: dict, b: TrackBudget) -> str:
    """When to switch --hybrid on, what it buys, what it costs — in plain words, from the measured ratios."""
    st, ex, cost = a["selftune"], a["external"], a["cost"]
    if "H" not in st:
        return "No verdict: the hybrid (H) was not part of this run."
    h_st, h_ex = st["H"], ex["H"]
    va, vs = h_st["vs"]["AdamW"], h_st["vs"].get("SF-AdamW")
    v_ref, v_muon = h_ex["vs"][REFERENCE], h_ex["vs"].get("Muon")
    nobody = all(math.isinf(v["score"]) for v in st.values())   # no method reaches the target over the grid
    robust_win = _kind(va) == "fewer" and h_st["divergences"] == 0
    tuned_win = _kind(v_ref) == "fewer"
    parts = []
    # When no method reaches the target over the grid, the self-tuning question is answered by the final loss.
    loss_win = nobody and _loss_kind(h_st["final_vs"]["AdamW"]) == "lower" and h_st["divergences"] == 0
    ranked = sorted(st, key=lambda m: st[m]["final_score"])
    if loss_win and not tuned_win:
        best = min(ex, key=lambda m: (ex[m]["median_steps"], ex[m]["final_val"]))
        parts.append(f"**With a tuned learning rate, leave `--hybrid` off**: tuned {best} "
                     f"({ALL_TRACK[best].label}) gets there first and ends lower. **Without tuning, `--hybrid` ends "
                     f"lower than AdamW at a constant LR** over a 100× LR grid"
                     + ("." if ranked[0] == "H" else
                        f" — but {ranked[0]} ends lower still." if _loss_kind(h_st["final_vs"].get(ranked[0], (1, 1, 1)))
                        == "higher" else f"; against {ranked[0]} it is level ({fmt_ci(h_st['final_vs'].get(ranked[0]), 3)}"
                        f"×, not distinguishable)."))
    elif robust_win and tuned_win:
        parts.append("**Switch `--hybrid` on**: it reached the target in fewer steps both when the LR is not known "
                     "and when every method's LR is tuned.")
    elif robust_win:
        parts.append("**Switch `--hybrid` on when you do not know a good learning rate**; with a tuned LR it buys "
                     "nothing here.")
    elif tuned_win:
        parts.append("**Switch `--hybrid` on only with a tuned learning rate**; it does not make a mis-set LR safe.")
    else:
        best = min(ex, key=lambda m: (ex[m]["median_steps"], ex[m]["final_val"]))
        parts.append(f"**Leave `--hybrid` off** on this evidence: it wins neither track. With a tuned LR use "
                     f"{best} ({ALL_TRACK[best].label}).")
    if nobody:
        fa = h_st["final_vs"]["AdamW"]
        parts.append(f"Self-tuning (one run at each LR of a {b.grid[-1] / b.grid[0]:.0f}× grid, nothing tuned): "
                     f"**no method reaches the target at most LRs of the grid**, so steps to target cannot rank them "
                     f"here. By the final validation loss, median over the grid, H ends at {h_st['final_score']:.3f}: "
                     f"{fmt_ci(fa)}× AdamW at a constant LR ({_loss_kind(fa)}), rank {ranked.index('H') + 1} of "
                     f"{len(ranked)} (best: {ranked[0]}, {st[ranked[0]]['final_score']:.3f}); "
                     f"{h_st['divergences']} of {len(b.grid) * len(b.seeds)} runs diverged.")
    else:
        parts.append(f"Self-tuning (one run at each LR of a {b.grid[-1] / b.grid[0]:.0f}× grid, nothing tuned): H "
                     f"needs {fmt_ci(va)}× the steps of AdamW at a constant LR ({_kind(va)})"
                     + (f" and {fmt_ci(vs)}× those of Schedule-Free AdamW ({_kind(vs)})" if vs else "")
                     + f"; {h_st['divergences']} of {len(b.grid) * len(b.seeds)} runs diverged.")
    parts.append(f"External tuning (every method's LR tuned on a separate seed): H tuned needs {fmt_ci(v_ref)}× the "
                 f"steps of tuned AdamW + warmup + cosine ({_kind(v_ref)})"
                 + (f" and {fmt_ci(v_muon)}× those of tuned Muon ({_kind(v_muon)})" if v_muon else "") + ".")
    g = h_ex["gap_vs"].get("AdamW")
    if g:
        parts.append(f"Its ternary quantization gap |gap| is {fmt_ci(g)}× AdamW's ({_kind(g).replace('fewer', 'smaller').replace('more', 'larger')}).")
    c_h, c_a = cost["H"], cost.get("AdamW")
    if c_a and c_a["cpu_ms_per_step"] > 0:
        parts.append(f"Cost: each step takes {c_h['cpu_ms_per_step'] / c_a['cpu_ms_per_step']:.2f}× AdamW's CPU "
                     f"time ({c_h['cpu_ms_per_step']:.0f} vs {c_a['cpu_ms_per_step']:.0f} ms) and the optimizer keeps "
                     f"{c_h['optimizer_state_mb'] - c_a['optimizer_state_mb']:+.1f} MB more state; steps, not "
                     f"seconds, are compared above, so in wall-clock time the hybrid's ratios are that much worse.")
    return " ".join(parts)


def targets_table(rows: list[dict]) -> list[str]:
    lines = ["| target | bar | measured (median ratio [95 % paired bootstrap]) | met |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['bar']} | {r['measured']} | {'**yes**' if r['met'] else '**no**'} |")
    return lines


def render(b: TrackBudget, env: dict, workload: dict, result: dict, status: str | None = None) -> str:
    a = result["analysis"]
    ex, st = a["external"], a["selftune"]
    n = len(b.seeds)
    lines = [f"# The hybrid against its baselines — both AlgoPerf tracks ({b.mode} mode)", ""]
    if status:
        lines += [f"> **{status}**", ""]
    lines += ["## Verdict", "", verdict(a, b), "", "## Targets (issue 10; W2 ternary QAT)", "",
              *targets_table(result["targets"]), "",
              "A target whose bar is not met stays here with its numbers; no bar is loosened. Ratios are of "
              "medians over seeds (steps to target; a miss is infinite), intervals are 95 % paired bootstrap over "
              "seeds.", ""]
    sanity = [t for t in result["targets"] if t["target"].startswith("sanity")]
    if sanity:
        lines += ["Budget check: " + ("the tuned cosine reference **beats** a tuned constant LR at this budget, "
                                      "so the reference is a reference." if sanity[0]["met"] else
                                      "the tuned cosine reference does **not** beat a tuned constant LR at this "
                                      "budget: **the budget is too short** for an AlgoPerf-style comparison, and "
                                      "every ratio below must be read with that in mind."), ""]
    lines += robustness_section(result, b)
    tokens = b.steps * b.batch_size * workload.get("seq_len", 0)
    lines += ["## Setup", "",
              f"- Workload: {workload.get('description', b.workload)}; {workload.get('train_tokens', 0):,} training "
              f"tokens, {workload.get('val_tokens', 0):,} held-out tokens ({workload.get('eval_windows', 0)} fixed "
              f"held-out windows of {workload.get('seq_len', 0)} tokens per evaluation); student "
              f"{workload.get('student_params', 0) / 1e6:.2f} M parameters, "
              f"{workload.get('linear_params', 0) / 1e6:.2f} M of them in Linear layers (ternary QAT).",
              f"- Budget: {b.steps} steps × batch {b.batch_size} = {tokens:,} tokens per run; an evaluation every "
              f"{b.eval_every} steps (steps-to-target resolution {100 * b.resolution:.1f} % of the budget).",
              f"- LR grid {', '.join(f'{x:g}' for x in b.grid)} ({b.grid[-1] / b.grid[0]:.0f}×); tuning seed "
              f"{b.tuning_seed}; {n} evaluation seeds {list(b.seeds)}; {len(result['rows'])} runs.",
              f"- Target: median over the evaluation seeds of tuned {REFERENCE}'s best validation loss = "
              f"{a['target']:.4f} (tuned LR {a['tuned_lr'][REFERENCE]:g}).",
              f"- Run: `{env.get('command', '')}` · {env.get('date', '')} · {env.get('machine', '')} · device "
              f"{env.get('device', '')} · {env.get('jobs', '')} jobs × {env.get('threads_per_job', env.get('threads', ''))} thread · load "
              f"{env.get('load_average_start', '')} · torch {env.get('torch', '')} · commit "
              f"{env.get('git_commit', '')} · {env.get('total_seconds', 0) / 60:.1f} min for this invocation"
              + (f", which reused {result['reused_runs']} finished runs from runs.jsonl (run by an earlier "
                 f"invocation of this protocol; their time is not in that figure)" if result.get("reused_runs") else "")
              + (f" · the runs' training CPU time, all runs: {result['run_cpu_seconds'] / 3600:.2f} CPU-h"
                 if result.get("run_cpu_seconds") else "") + ".", "",
              "Methods:", ""]
    lines += [f"- **{k}**: {ALL_TRACK[k].label}" for k in (*b.methods, *b.ablations)] + [""]

    lines += ["## External tuning track", "",
              "| method | tuned LR | steps to target (median) | hits | ×AdamW-cos [95 % CI] | ×Muon [95 % CI] | "
              "final val loss | \\|gap\\| | \\|gap\\| ×AdamW |", "|---|---|---|---|---|---|---|---|---|"]
    for m in b.methods:
        e = ex[m]
        lines.append(f"| **{m}** | {e['tuned_lr']:g} | {_steps(e['median_steps'])} | {e['hits']}/{n} | "
                     f"{fmt_ci(e['vs'].get(REFERENCE))} | {fmt_ci(e['vs'].get('Muon'))} | {_f(e['final_val'], 4)} | "
                     f"{_f(e['abs_gap'], 3)} | {fmt_ci(e['gap_vs'].get('AdamW'))} |")
    lines += ["", "## Self-tuning track", "",
              "Score = median over the LR grid of the median over seeds of steps to target (∞ when the method misses "
              "at more than half the grid).", "",
              "| method | score | ×AdamW [95 % CI] | ×SF-AdamW [95 % CI] | ×AdamW-cos [95 % CI] | divergences |",
              "|---|---|---|---|---|---|"]
    for m in b.methods:
        s = st[m]
        lines.append(f"| **{m}** | {_steps(s['score'])} | {fmt_ci(s['vs'].get('AdamW'))} | "
                     f"{fmt_ci(s['vs'].get('SF-AdamW'))} | {fmt_ci(s['vs'].get(REFERENCE))} | {s['divergences']} |")
    lines += ["", "The same grid score of the final validation loss (median over the grid of the median over seeds; "
              "lower is better) — it ranks the methods even where steps to target cannot:", "",
              "| method | final loss, grid median | ×AdamW [95 % CI] | ×SF-AdamW [95 % CI] | ×AdamW-cos [95 % CI] "
              "| ×Muon [95 % CI] |", "|---|---|---|---|---|---|"]
    for m in b.methods:
        s = st[m]
        lines.append(f"| **{m}** | {s['final_score']:.4f} | " + " | ".join(
            fmt_ci(s["final_vs"].get(ref), 3) for ref in ("AdamW", "SF-AdamW", REFERENCE, "Muon")) + " |")
    head = " | ".join(f"lr {lr:g}" for lr in b.grid)
    lines += ["", "Median steps to target (hits / seeds) and median final validation loss at each LR:", "",
              f"| method | {head} |", "|---|" + "---|" * len(b.grid)]
    for m in b.methods:
        cells = [f"{_steps(v['median_steps'])} ({v['hits']}/{n}) · {_f(v['median_final'], 3)}"
                 for v in st[m]["per_lr"].values()]
        lines.append(f"| **{m}** | " + " | ".join(cells) + " |")
    taus = a["profile"]["taus"]
    lines += ["", "Performance profile (problems = LR × seed; ρ(τ) = share solved within τ× the best method's steps; "
              "figure in figures.html):", "",
              "| method | " + " | ".join(f"τ={'∞' if math.isinf(t) else f'{t:g}'}" for t in taus) + " |",
              "|---|" + "---|" * len(taus)]
    for m, rho in a["profile"]["rho"].items():
        lines.append(f"| **{m}** | " + " | ".join(f"{x:.2f}" for x in rho) + " |")
    if a["ablations"]:
        whose = ", the guide's" if b.ablation_lr == 1e-3 else ""
        lines += ["", f"## Ablations of H (lr {b.ablation_lr:g}{whose}; each row one change to H, paired over the "
                  f"same seeds)", "",
                  "| method | what changes | steps to target (median) | ×H [95 % CI] | final val loss (median) | "
                  "final ×H [95 % CI] | seeds better than H | diverged |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, v in a["ablations"].items():
            lines.append(f"| **{m}** | {ALL_TRACK[m].label} | {_steps(v['median_steps'])} | {fmt_ci(v['vs_H'])} | "
                         f"{_f(v['final_val'], 4)} | {fmt_ci(v.get('final_vs_H'), 3)} | "
                         f"{v.get('better_seeds', '–')}/{len(b.seeds)} | {v['diverged']} |")
        at = a["selftune"].get("H", {}).get("per_lr", {}).get(f"{b.ablation_lr:g}")
        if at:
            lines += ["", f"H itself at lr {b.ablation_lr:g}: final val loss (median) {_f(at['median_final'], 4)}."]
    lines += ["", "## Cost per step", "", "| method | CPU ms / step (median) | ×AdamW | optimizer state (MB) |",
              "|---|---|---|---|"]
    base = a["cost"].get("AdamW", {}).get("cpu_ms_per_step", math.nan)
    for m, c in a["cost"].items():
        lines.append(f"| **{m}** | {c['cpu_ms_per_step']:.1f} | {c['cpu_ms_per_step'] / base:.2f} | "
                     f"{c['optimizer_state_mb']:.2f} |")
    for note in result.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def figures_html(b: TrackBudget, a: dict, robust: dict | None = None) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=("Performance profile (self-tuning problems)",
                                                        "Median steps to target over the LR grid (miss = top)",
                                                        "Final validation loss against LR (median over seeds)"))
    taus = [t for t in a["profile"]["taus"] if math.isfinite(t)]
    for m, rho in a["profile"]["rho"].items():
        fig.add_trace(go.Scatter(x=taus, y=rho[:len(taus)], mode="lines+markers", name=m, legendgroup=m,
                                 line_shape="hv"), row=1, col=1)
        steps = [v["median_steps"] for v in a["selftune"][m]["per_lr"].values()]
        fig.add_trace(go.Scatter(x=list(b.grid), y=[s if math.isfinite(s) else b.steps * 1.1 for s in steps],
                                 mode="lines+markers", name=m, legendgroup=m, showlegend=False), row=1, col=2)
        ce = ((robust or {}).get("val_loss") or {}).get("methods", {}).get(m)
        if ce:          # one line per method: where the LR robustness claim is visible at a glance
            fig.add_trace(go.Scatter(x=list(b.grid), y=[v if math.isfinite(v) else None for v in ce["per_lr"].values()],
                                     mode="lines+markers", name=m, legendgroup=m, showlegend=False), row=1, col=3)
    fig.update_xaxes(type="log", title_text="τ", row=1, col=1)
    fig.update_yaxes(title_text="ρ(τ)", range=[0, 1.05], row=1, col=1)
    fig.update_xaxes(type="log", title_text="base LR", row=1, col=2)
    fig.update_yaxes(title_text="steps", row=1, col=2)
    fig.update_xaxes(type="log", title_text="base LR", row=1, col=3)
    fig.update_yaxes(title_text="final validation loss", row=1, col=3)
    fig.update_layout(height=450, width=1600, title=f"Hybrid benchmark, {b.mode} mode")
    return fig.to_html(include_plotlyjs="cdn", full_html=True)


def write(out: Path, b: TrackBudget, env: dict, workload: dict, result: dict, status: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if "robustness" not in result:
        result["robustness"] = {key: robustness(result["rows"], b, b.n_boot, key) for key in ("val_loss", "kl_teacher")}
    (out / "report.md").write_text(render(b, env, workload, result, status))
    with open(out / "runs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "lr", "seed", "steps", "diverged", "train_cpu_s", "cpu_ms_per_step",
                         "optimizer_state_mb", "mean_multiplier", "eval_steps", "val_losses", "final_val_loss_fp"])
        for r in result["rows"]:
            writer.writerow([r["method"], r["lr"], r["seed"], r["steps"], r["diverged"], f"{r['train_cpu_s']:.2f}",
                             f"{r['cpu_ms_per_step']:.2f}", f"{r['optimizer_state_mb']:.3f}",
                             f"{r['mean_multiplier']:.4f}", " ".join(str(e["step"]) for e in r["evals"]),
                             " ".join(f"{e['val_loss']:.5f}" for e in r["evals"]),
                             f"{r['evals'][-1].get('val_loss_fp', math.nan):.5f}" if r["evals"] else ""])
    (out / "results.json").write_text(json.dumps({"budget": b.__dict__, "env": env, "workload": workload,
                                                  "analysis": result["analysis"], "targets": result["targets"],
                                                  "robustness": result["robustness"], "status": status,
                                                  "methods": method_labels((*b.methods, *b.ablations))},
                                                 indent=1, default=str,
                                                 allow_nan=True))
    try:
        (out / "figures.html").write_text(figures_html(b, result["analysis"], result["robustness"]))
    except ImportError:              # plotly is a workbench dependency; the report stands without the figure
        pass
    return out / "report.md"


def method_labels(keys) -> dict[str, str]:
    """Method code -> label, as the benchmark defines them (tracks.ALL_TRACK): written into every report's
    results.json, where the workbench's Benchmarks page reads them (issue 18: no second label set in the app)."""
    return {k: ALL_TRACK[k].label for k in keys if k in ALL_TRACK}


def label_methods(folder: Path) -> dict[str, str]:
    """Write the method labels into a committed report's results.json (reports written before they travelled
    there): codes from its runs.csv, labels from the benchmark's registries (tracks.ALL_TRACK for the two-track
    reports, methods.ALL for the quick protocol's). `python -m benchmarks.tracks_report --labels DIR`."""
    from benchmarks.methods import ALL
    folder = Path(folder)
    data = json.loads((folder / "results.json").read_text())
    with open(folder / "runs.csv", newline="") as handle:
        codes = list(dict.fromkeys(row["method"] for row in csv.DictReader(handle)))
    registry = {k: m.label for k, m in (ALL_TRACK if "analysis" in data else ALL).items()}
    data["methods"] = {k: registry[k] for k in codes if k in registry}
    (folder / "results.json").write_text(json.dumps(data, indent=1 if "analysis" in data else 2, default=str))
    return data["methods"]


def regenerate(folder: Path, n_boot: int | None = None) -> Path:
    """Rewrite a protocol's report from its committed runs.jsonl and results.json (budget, environment, workload):
    today's analysis of the same runs, no training. `python -m benchmarks.tracks_report --regenerate DIR`."""
    import datetime
    import re

    from benchmarks.tracks import _row_key, analyse, read_journal, specs_for, targets
    folder = Path(folder)
    saved = json.loads((folder / "results.json").read_text())
    budget = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["budget"].items()}
    b = TrackBudget(**budget)
    if n_boot:
        b.n_boot = n_boot
    wanted = {_row_key(s.method.key, s.lr, s.seed, s.steps) for s in specs_for(b, "cpu")}
    rows = [row for key, row in read_journal(folder / "runs.jsonl").items() if key in wanted]   # the protocol's runs
    old = (folder / "report.md").read_text() if (folder / "report.md").exists() else ""
    reused = re.search(r"which reused (\d+) finished runs", old)
    analysis = analyse(rows, b, b.n_boot)
    result = {"rows": rows, "analysis": analysis, "targets": targets(analysis, b),
              "reused_runs": int(reused.group(1)) if reused else 0,
              "run_cpu_seconds": float(sum(r["train_cpu_s"] for r in rows)),
              "notes": [f"Regenerated on {datetime.date.today().isoformat()} from this folder's runs.jsonl "
                        f"({len(rows)} runs, no new training) by `python -m benchmarks.tracks_report --regenerate "
                        f"{folder}`: the analysis (including the LR robustness section) is today's code, the runs and "
                        f"the run command above are the original ones."]}
    return write(folder, b, saved["env"], saved["workload"], result, saved.get("status"))


def main(mode: str, out, device: str = "cpu", jobs: int = 2, threads: int = 1, seeds: int | None = None,
         steps: int | None = None, env: dict | None = None, status: str | None = None, log=print,
         ablation_lr: float | None = None, reuse=None, extra_methods: tuple[str, ...] = ()):
    """Run both tracks in `mode` (smoke | medium | full) and write the report to `out`; returns its path. (Here, not
    in tracks.py, so that the report imports the protocol and never the other way round.)"""
    from benchmarks.tracks import ALL_TRACK, prepare_workload, protocol, track_budget, workload_info
    started = time.perf_counter()
    b = track_budget(mode)
    if seeds:
        b.seeds = tuple(range(seeds))
    if steps:
        b.steps, b.eval_every = steps, max(1, steps // 20)
    if ablation_lr:
        b.ablation_lr = ablation_lr
    unknown = [k for k in extra_methods if k not in ALL_TRACK]
    if unknown:
        raise ValueError(f"unknown method {', '.join(unknown)}: use one of {', '.join(ALL_TRACK)}")
    # a candidate promoted to the full grid (both tracks, the profile) beside H, no longer an ablation
    b.methods = (*b.methods, *(k for k in extra_methods if k not in b.methods))
    b.ablations = tuple(k for k in b.ablations if k not in extra_methods)
    prepared = prepare_workload(b.workload, device, log)        # builds the caches before the workers load them
    info = workload_info(prepared, b)
    log(f"workload: {info['train_tokens']:,} training tokens, student {info['student_params'] / 1e6:.2f} M "
        f"({info['linear_params'] / 1e6:.2f} M in Linear layers); {b.n_runs} runs of {b.steps} steps")
    Path(out).mkdir(parents=True, exist_ok=True)
    journal = Path(out) / "runs.jsonl"
    if reuse is not None and not journal.exists() and Path(reuse).is_file():
        import shutil
        shutil.copyfile(reuse, journal)       # same specs → the same rows; only the missing runs will run
        log(f"reusing the finished runs of {reuse}")
    # runs.jsonl: every finished run's row, written as it finishes; a re-run of the same command resumes from it
    result = protocol(b, device, jobs, threads, log, journal=journal)
    env = dict(env or {})
    env["total_seconds"] = time.perf_counter() - started
    path = write(Path(out), b, env, info, result, status)
    log(f"tracks report written to {path} ({env['total_seconds']:.0f} s)")
    return path


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Both AlgoPerf tracks for the hybrid (issue 10), or rewrite a "
                                                 "report from its runs (--regenerate)")
    parser.add_argument("--mode", choices=("smoke", "medium", "variants", "full", "horizon"), default="smoke")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--ablation-lr", type=float, default=None, help="LR of the ablations / variants")
    parser.add_argument("--add-method", action="append", default=[], metavar="KEY",
                        help="also run this method (e.g. a variant) on the whole grid, in both tracks")
    parser.add_argument("--reuse", default=None, help="a runs.jsonl whose finished runs this invocation reuses "
                                                      "(variants: benchmarks/results/medium/runs.jsonl)")
    parser.add_argument("--probe", type=int, default=None, metavar="STEPS",
                        help="timing probe: STEPS steps of each method, then the mode's estimated total time")
    parser.add_argument("--regenerate", default=None, metavar="DIR",
                        help="rewrite the report of a results folder (runs.jsonl, results.json) without training, "
                             "e.g. benchmarks/results/medium")
    parser.add_argument("--labels", default=None, metavar="DIR",
                        help="write the benchmark's method labels into DIR/results.json (for the workbench)")
    ns = parser.parse_args()
    if ns.labels:
        print(label_methods(Path(ns.labels)))
        raise SystemExit(0)
    if ns.regenerate and (Path(ns.regenerate) / "results.json").is_file() and json.loads(
            (Path(ns.regenerate) / "results.json").read_text()).get("protocol") == "robustness":
        from benchmarks.robustness import report as robustness_report   # issue 16's two-workload report
        print(robustness_report(Path(ns.regenerate)))
        raise SystemExit(0)
    if ns.regenerate:
        print(regenerate(Path(ns.regenerate)))
        raise SystemExit(0)
    if ns.out is None:
        parser.error("--out DIR is required (except with --regenerate)")
    if ns.probe:
        from benchmarks.tracks import probe
        estimate = probe(ns.mode, ns.probe, ns.device, max(ns.jobs, 2))
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "probe.json").write_text(json.dumps(estimate, indent=1))
        raise SystemExit(0)
    main(ns.mode, ns.out, ns.device, ns.jobs, 1, ns.seeds, ns.steps,
         env={"command": "python -m benchmarks.tracks_report"}, ablation_lr=ns.ablation_lr, reuse=ns.reuse,
         extra_methods=tuple(ns.add_method))
