"""The Sweep page (workbench/pages/sweep.py) under AppTest: Optuna's own figures, the ?sweep= link, the running
panel after Start, and "Launch with this config" carrying the trial's options and evaluation cadence."""
from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest
from streamlit.testing.v1 import AppTest

from hybrid_optimization import sweep
from hybrid_optimization.tracking import RunStore
from tests.fixtures.workbench_runs import write_synthetic_run
from workbench import sweeps

APP = str(Path(__file__).resolve().parents[1] / "app.py")
DISTRIBUTIONS = {"base_learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                 "data_clusters": optuna.distributions.IntDistribution(2, 8)}


@pytest.fixture
def runs_root() -> Path:
    return Path(os.environ["HYBRID_RUNS_ROOT"])


def _study(runs_root: Path, name: str, trials: list[tuple[float, int, float | None]], options: dict | None = None):
    """A sweep whose trials are recorded directly in its Optuna study (with intermediate values, pruned ones
    included), each trial an ordinary run in the store."""
    store = RunStore(runs_root)
    spec = sweep.SweepSpec(name=name, params=[sweep.parse_param("base_learning_rate=1e-4:1e-2:log"),
                                              sweep.parse_param("data_clusters=2:8")], eval_every=2)
    study, _ = sweep.open_study(spec, sweep.default_storage(runs_root), name)
    ids = []
    for i, (lr, k, value) in enumerate(trials):
        run_id = write_synthetic_run(store, 60, "finished", name=f"{name}-{i}", seed=i, tags=[f"sweep:{name}"],
                                     config={"base_learning_rate": lr, "data_clusters": k}, eval_every=20,
                                     n_samples=4)
        if options is not None:
            run = store.get_run(run_id)
            store.update_run(run_id, args={"options": {**options, "hybrid_config": run["config"]}})
        ids.append(run_id)
        state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.PRUNED
        study.add_trial(optuna.trial.create_trial(
            params={"base_learning_rate": lr, "data_clusters": k}, value=value, state=state,
            intermediate_values={20: 5.0 - 0.1 * i, 40: 4.8 - 0.1 * i}, user_attrs={"run_id": run_id},
            distributions=DISTRIBUTIONS))
    return ids


def _open(**params) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    at.switch_page("workbench/pages/sweep.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _figures(at: AppTest) -> dict[str, dict]:
    out = {}
    for chart in at.get("plotly_chart"):
        fig = json.loads(chart.proto.spec)
        out[(fig["layout"].get("title") or {}).get("text", "")] = fig
    return out


def test_sweep_link_opens_it_with_optunas_history_and_intermediate_values(runs_root):
    _study(runs_root, "first", [(1e-3, 4, 4.5)])
    _study(runs_root, "lr-search", [(1e-3, 4, 4.2), (3e-3, 2, 4.6), (2e-4, 8, None), (5e-4, 3, 4.1)])
    at = _open(sweep="first")
    assert at.selectbox(key="sweep_pick").value == "first"
    at = _open(sweep="lr-search")
    assert at.selectbox(key="sweep_pick").value == "lr-search"
    assert at.query_params["sweep"] in ("lr-search", ["lr-search"])
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["complete"] == "3" and metrics["pruned"] == "1" and metrics["Trial"] == "#3"
    figures = _figures(at)
    history = figures["History: final validation loss per trial, best so far"]
    names = [t.get("name") for t in history["data"]]
    assert "Best Value" in names                                    # Optuna's best-so-far line
    best = next(t for t in history["data"] if t.get("name") == "Best Value")
    assert best["y"][-1] == pytest.approx(4.1)
    intermediate = figures["Intermediate values (the evaluations the pruner compared)"]
    assert len([t for t in intermediate["data"] if t.get("x")]) == 4   # every trial, the pruned one too
    # Importance from 3 completed trials is marked unreliable, in its title and beside it.
    importance = next(f for t, f in figures.items() if t.startswith("Parameter importance"))
    assert "unreliable: 3 completed trials" in importance["layout"]["title"]["text"]
    assert any("unreliable under 10" in w.value for w in at.warning)
    for kind in ("parallel coordinates", "slice", "contour"):
        at.get("button_group")[0].set_value(kind).run()
        assert not at.exception
        titles = list(_figures(at))
        assert any(t.lower().startswith(kind.split()[0]) for t in titles), titles


def test_searched_values_are_shown_one_way(runs_root):
    _study(runs_root, "fmt", [(0.000325789, 4, 4.2), (3e-3, 2, 4.6)])
    at = _open(sweep="fmt")
    best = " ".join(m.value for m in at.markdown if "base_learning_rate" in m.value)
    assert "`base_learning_rate` = 0.000326" in best and "0.000325789" not in best
    assert sweeps.format_param(0.000325789) == "0.000326" and sweeps.format_param(4) == "4"
    assert sweeps.format_param(None) == ""


def test_launch_with_this_config_carries_options_and_evaluation_cadence(runs_root):
    options = {"preset": "tiny", "hybrid": True, "seq_len": 32, "alpha": 0.3, "cluster_batches": "single",
               "max_steps": 60, "epochs": 3, "export": "packed", "optimizer": None, "schedule": None,
               "warmup_steps": None}
    _study(runs_root, "opts", [(1e-3, 4, 4.2), (3e-3, 2, 4.6)], options=options)
    at = _open(sweep="opts")
    at.button(key="sweep_launch_best").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Configure & launch"
    state = at.session_state
    assert state["cfg.base_learning_rate"] == "0.001" and state["cfg.data_clusters"] == 4
    assert state["cfg.eval_interval"] == 20                  # the trial evaluated every 20 steps
    assert state["opt.seq_len"] == "32" and state["opt.alpha"] == "0.3"
    assert state["opt.cluster_batches"] == "single" and state["opt.run_name"] == "opts-best"
    assert state["opt.epochs"] == ""                         # its length is its max_steps, not 3 epochs
    # the optimizer menu unset = its defaults (with --hybrid: the hybrid's own schedule), not what the form showed
    assert (state["opt.optimizer"], state["opt.schedule"], state["opt.warmup_steps"]) == ("default", "default", None)
    menu = sweeps.launch_values({"run_id": "x", "args": {"options": {"schedule": None, "seed": None}}, "config": {}},
                                None, "n")["options"]
    assert "schedule" in menu and menu["schedule"] is None and "seed" not in menu
    values = sweeps.launch_values({"run_id": "x", "args": {"options": {"eval_every_steps": 7}}, "config": {}},
                                  None, "n")
    assert values["config"]["eval_interval"] == 7


def test_start_shows_a_running_panel_and_disables_start_while_it_runs(runs_root, monkeypatch):
    calls = []

    class Proc:
        pid = os.getpid()

        def poll(self):
            return None

    monkeypatch.setattr(sweeps.subprocess, "Popen", lambda argv, **kw: calls.append(argv) or Proc())
    monkeypatch.setattr(sweeps, "_is_sweep", lambda pid, name: True)     # this test process stands in for it
    at = _open()
    at.text_input(key="sweep_name").input("live-sweep").run()
    at.number_input(key="sweep_trials").set_value(4).run()
    at.button(key="sweep_start").click().run()
    assert len(calls) == 1
    panel = " ".join(m.value for m in at.markdown if "live-sweep" in m.value)
    assert ":blue-badge[running]" in panel and "trials 0/4" in panel and "/sweep?sweep=live-sweep" in panel
    assert at.button(key="sweep_start").disabled                # a second click would add trials
    # Two trials of this start are over: n/N moves.
    _study(runs_root, "live-sweep", [(1e-3, 4, 4.2), (3e-3, 2, None)])
    at.run()
    panel = " ".join(m.value for m in at.markdown if "live-sweep" in m.value)
    assert "trials 2/4" in panel
    monkeypatch.setattr(sweeps, "_is_sweep", lambda pid, name: False)   # the sweep process ended
    at.run()
    panel = " ".join(m.value for m in at.markdown if "live-sweep" in m.value)
    assert ":green-badge[finished]" in panel and not at.button(key="sweep_start").disabled
    sweeps._CHILDREN.clear()


def test_start_types_fixed_values_as_the_sweep_cli_does(tmp_path, monkeypatch):
    """The page's 'hybrid off' start (`--set hybrid=false`) passes the check; a bad fixed config value is refused
    before anything starts, with the sweep CLI's own line."""
    calls = []

    class Proc:
        pid = os.getpid()

    monkeypatch.setattr(sweeps.subprocess, "Popen", lambda argv, **kw: calls.append(argv) or Proc())
    common = dict(trials=2, params=["base_learning_rate=1e-4:1e-2:log"], objective="final_val_loss", target=None,
                  preset="tiny", max_steps=10, eval_every=1, workers=1, pruning=True)
    argv = sweeps.start(tmp_path, "off", fixed=["hybrid=false"], **common)
    assert calls == [argv] and argv[argv.index("--set") + 1] == "hybrid=false"
    with pytest.raises(sweep.SweepError, match="batch_size"):
        sweeps.start(tmp_path, "bad", fixed=["batch_size=0"], **common)
    with pytest.raises(sweep.SweepError, match="given twice"):
        sweeps.start(tmp_path, "twice", fixed=["hybrid=false", "hybrid=true"], **common)
    assert len(calls) == 1
    sweeps._CHILDREN.clear()


def test_prefilled_choices_are_the_whole_menu_and_each_one_is_valid():
    """A choice field picked on the page is pre-filled with every value the pipeline accepts (the new optimizer
    menu included), and the sweep's own check accepts each of them."""
    for name in ("optimizer", "schedule", "base_optimizer", "trust_region_mode", "cluster_batches", "embedder",
                 "student_size", "target_bits", "hybrid"):
        param = sweep.parse_param(f"{name}={sweeps.default_range(name)['choices']}")
        sweep.SweepSpec(name="menu", params=[param], base_options={"hybrid": False}).validate()
        assert len(param.choices) >= 2, name
    assert sweep.parse_param(f"optimizer={sweeps.default_range('optimizer')['choices']}").choices == \
        ("adamw", "sgd", "muon", "schedule-free", "prodigy")
