"""Sweep: search the hybrid config with Optuna (TPE sampler, median pruner on the runs' evaluations). Choose the
fields and their ranges, the number of trials, the objective and the parallel workers; every trial is an ordinary
run (tagged `sweep:<name>`) that every other page shows. Results (`/sweep?sweep=NAME`): Optuna's own figures —
history with the best so far, intermediate values, parallel coordinates, slice, contour, importance — the trials and
the best trial, whose config and options "Launch with this config" puts into the Configure form. A sweep started
here shows a running panel (trials n/N) until it ends."""
from __future__ import annotations

import re
import time
from urllib.parse import quote

import pandas as pd
import streamlit as st

from hybrid_optimization import sweep as core
from hybrid_optimization.tracking import RunStore, StoreError
from workbench import config_form, sweeps, ui

ui.page_header("Sweep", "Optuna searches the config for you: TPE picks each trial's values from the trials so far, "
                        "the median pruner stops trials whose validation loss trails the others at the same step.")
root = ui.runs_root()
storage_text = st.text_input(
    "Optuna storage", key="sweep_storage", placeholder=f"default: {core.default_storage(root)}",
    help="An RDB URL shared by every worker (PostgreSQL / MySQL), so sweeps can span machines; empty: the SQLite "
         "file in the runs root. On a second machine: python -m hybrid_optimization.sweep --name NAME --trials N "
         "--storage URL")
storage = sweeps.storage_url(root, storage_text.strip() or None)

try:
    names = sweeps.list_sweeps(storage)
    storage_problem = None
except Exception as exc:            # an unreachable database: say which and why, show nothing else
    names, storage_problem = [], f"Cannot open the Optuna storage {storage}: {exc}"
# Results first once there is a sweep to show (and right after starting one).


linked = st.query_params.get("sweep")        # ?sweep=NAME links to a sweep's results
if linked in names and linked != st.session_state.get("_sweep_in_url"):
    st.session_state["sweep_selected"] = linked
elif linked is not None and linked not in names and not storage_problem:
    ui.ignored_link("sweep", linked, "no sweep of this name in this storage")
running = st.session_state.get("sweep_running")
if running:
    # Started from this page: a panel that stays (unlike a toast) with trials n/N and a link; it refreshes while
    # the sweep's process lives and then says "finished" until dismissed.
    @st.fragment(run_every=2 if sweeps.process_info(root, running).get("alive") else None)
    def running_panel() -> None:
        info = sweeps.process_info(root, running)
        try:
            frame = sweeps.trials_frame(sweeps.load(storage, running)) if running in sweeps.list_sweeps(storage) \
                else pd.DataFrame(columns=["state"])
        except Exception as exc:            # the storage went away: say so, keep the panel
            frame = pd.DataFrame(columns=["state"])
            st.caption(f"cannot read the study: {ui.plain(exc)}")
        done, total = sweeps.progress(info, frame)
        with st.container(border=True, key="sweep_running_panel"):
            alive = info.get("alive")
            badge = ":blue-badge[running]" if alive else ":green-badge[finished]"
            st.markdown(f"{badge} **Sweep {ui.plain(running)}**: trials {done}/{total if total else '?'} · "
                        f"[link to this sweep](/sweep?sweep={quote(running)})")
            if total:
                st.progress(min(1.0, done / total), text=f"{done}/{total} trials over")
            if not alive and st.button("Dismiss", key="sweep_dismiss"):
                st.session_state.pop("sweep_running", None)
                st.rerun()
        if not alive and st.session_state.get("_sweep_was_alive"):
            st.session_state["_sweep_was_alive"] = False
            st.rerun()                      # a full rerun: stops this timer, enables Start again
        st.session_state["_sweep_was_alive"] = bool(alive)

    running_panel()
new_tab, results_tab = st.tabs(["New sweep", "Results"], default="Results" if names else "New sweep")

with new_tab:
    c1, c2, c3, c4 = st.columns(4)
    name = c1.text_input("Sweep name", value=time.strftime("sweep-%m%d-%H%M"), key="sweep_name",
                         help="Letters, digits, - _ . (an existing name adds trials to that sweep)")
    trials = c2.number_input("Trials", min_value=1, max_value=500, value=10, step=1, key="sweep_trials")
    workers = c3.number_input("Parallel workers", min_value=1, max_value=16, value=1, step=1, key="sweep_workers",
                              help="Trials trained at the same time on this machine (each is one process).")
    preset = c4.selectbox("Preset", ("tiny", "smollm2"), key="sweep_preset")
    d1, d2, d3, d4 = st.columns(4)
    objective = d1.selectbox("Objective (minimised)", core.OBJECTIVES, key="sweep_objective",
                             format_func=core.OBJECTIVE_LABELS.get)
    target = None
    if objective == "steps_to_target":
        target = d1.number_input("Target validation loss", value=5.0, key="sweep_target",
                                 help="A trial that never reaches it counts as 2 × its steps.")
    max_steps = d2.number_input("Steps per trial", min_value=1, value=30, step=10, key="sweep_max_steps")
    eval_every = d3.number_input("Evaluate every (epochs)", min_value=1, value=1, step=1, key="sweep_eval_every",
                                 help="Each evaluation is a point where the pruner may stop a trial "
                                      "(tiny: an epoch is 10 steps).")
    with d4:
        hybrid = st.toggle("Hybrid optimizer", value=True, key="sweep_hybrid",
                           help="Off: every trial is the AdamW baseline at constant LR (search its LR, say).")
        pruning = st.toggle("Prune (median)", value=True, key="sweep_pruning")

    st.markdown("**Search space**")
    fields = list(core.searchable_fields())
    ordered = [f for f in sweeps.SUGGESTED if f in fields] + [f for f in fields if f not in sweeps.SUGGESTED]
    chosen = st.multiselect("Fields to search", ordered, default=["base_learning_rate", "initial_trust_radius"],
                            key="sweep_fields", help="HybridTrainingConfig fields and pipeline options.")
    params, errors = [], {}
    for field_name in chosen:
        default = sweeps.default_range(field_name)
        cols = st.columns([1.6, 1, 1, 0.8])
        cols[0].markdown(f"`{field_name}`")
        if "choices" in default:
            text = cols[1].text_input("values (comma-separated)", value=default["choices"],
                                      key=f"sweep_choices.{field_name}")
            spec = f"{field_name}={text}"
        else:
            low = cols[1].text_input("low", value=config_form.format_number(default["low"]),
                                     key=f"sweep_low.{field_name}")
            high = cols[2].text_input("high", value=config_form.format_number(default["high"]),
                                      key=f"sweep_high.{field_name}")
            log = cols[3].checkbox("log", value=default["log"], key=f"sweep_log.{field_name}",
                                   help="Log-uniform: right for rates, which matter by their order of magnitude.")
            spec = f"{field_name}={low}:{high}" + (":log" if log else "")
        try:
            param = core.parse_param(spec)          # then both ends against the CLI's bounds, as the sweep will
            core.SweepSpec(name="form", params=[param], preset=preset,
                           base_options={"hybrid": hybrid}).check_param(param)
            params.append(spec)
        except core.SweepError as exc:
            message = re.sub(r"^--param '[^']*' is invalid: ", "", str(exc))
            st.error(f"{field_name}: {ui.plain(message)}", icon=":material/error:")
            errors[field_name] = message
    fixed = [] if hybrid else ["hybrid=false"]
    running_here = sweeps.process_info(root, name.strip()).get("alive", False) if name.strip() else False
    if st.button("Start sweep", type="primary", key="sweep_start", icon=":material/play_arrow:",
                 disabled=bool(errors) or not chosen or running_here,
                 help=f"Sweep {name.strip()} is running: stop it (Results tab) or wait, or give a new name."
                 if running_here else None):
        try:
            sweeps.start(root, name.strip(), int(trials), params, objective, target, preset, int(max_steps),
                         int(eval_every), int(workers), pruning, fixed, storage_text.strip() or None)
        except core.SweepError as exc:
            st.error(f"Not started: {ui.plain(exc)}")
        else:
            st.session_state["sweep_selected"] = name.strip()
            st.session_state["sweep_running"] = name.strip()
            st.rerun()
    st.caption("The sweep runs as `python -m hybrid_optimization.sweep` in the background (it survives this page); "
               "its trials appear on every other page as runs tagged `sweep:<name>`.")

with results_tab:
    if storage_problem:
        st.error(ui.plain(storage_problem))
    wanted = st.session_state.get("sweep_selected")
    if wanted and wanted not in names and sweeps.process_info(root, wanted).get("alive"):
        # Just started: its process has not created the study yet. Look again every 2 s, then redraw the page.
        @st.fragment(run_every=2)
        def wait_for_study() -> None:
            if wanted in sweeps.list_sweeps(storage):
                st.rerun()
            st.info(f"Sweep {ui.plain(wanted)} is starting (its first trial sets up a training run)…")

        wait_for_study()
    elif not names:
        st.info("No sweeps in this storage yet. Start one on the **New sweep** tab.")
    else:
        wanted = st.session_state.get("sweep_selected")
        if wanted in names and st.session_state.get("sweep_pick") != wanted:
            st.session_state["sweep_pick"] = wanted
        picked = st.selectbox("Sweep", names, key="sweep_pick")
        st.session_state["sweep_selected"] = picked
        st.query_params["sweep"] = picked          # the sweep's own URL: bookmark it, send it
        st.session_state["_sweep_in_url"] = picked
        process = sweeps.process_info(root, picked)

        @st.cache_data(max_entries=64, show_spinner=False)
        def figure_of(storage: str, name: str, kind: str, signature: tuple, objective_label: str):
            """Optuna's figure, rebuilt only when the trials changed (signature: trials per state, reported
            intermediate values)."""
            return sweeps.figure(sweeps.load(storage, name), kind, objective_label)

        @st.fragment(run_every=2 if process.get("alive") else None)
        def results() -> None:
            info = sweeps.process_info(root, picked)
            study = sweeps.load(storage, picked)
            spec = sweeps.spec_of(study)
            frame = sweeps.trials_frame(study)
            counts = frame.state.value_counts().to_dict() if len(frame) else {}
            head = st.columns([1.2, 1, 1, 1, 1])
            head[0].markdown("### " + (":blue-badge[running]" if info.get("alive") else ":gray-badge[idle]"))
            for i, state in enumerate(("complete", "running", "pruned", "fail")):
                head[i + 1].metric(state if state != "fail" else "failed", counts.get(state, 0))
            if info.get("alive") and st.button("Stop sweep", key="sweep_stop", icon=":material/stop_circle:"):
                sweeps.stop(root, picked)
                st.toast("Stopping: no new trials; running trials were asked to stop.")
            if spec is not None:
                st.caption(f"Objective: {core.OBJECTIVE_LABELS[spec.objective]} (minimised) · search space: "
                           + "; ".join(f"`{p.spec()}`" for p in spec.params)
                           + f" · {spec.max_steps} steps per trial, evaluated every {spec.eval_every} epoch(s), "
                             f"preset {spec.preset} · link: [/sweep?sweep={ui.plain(picked)}](/sweep?sweep={quote(picked)})")
            if frame.empty:
                st.caption("No trial yet: the first one is setting up.")
                return
            param_cols = [c for c in frame.columns if c.startswith("p.")]
            objective_label = core.OBJECTIVE_LABELS[spec.objective] if spec else "value"
            reported = sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False))
            signature = (tuple(sorted(counts.items())), reported, len(frame))

            def draw(kind: str, where) -> None:
                fig, why = figure_of(storage, picked, kind, signature, objective_label)
                with where:
                    if fig is None:
                        st.caption(f"{kind}: {ui.plain(why)}.")
                    else:
                        st.plotly_chart(fig, key=f"sweep_fig.{kind}", config={"displaylogo": False})

            left, right = st.columns(2)
            draw("history", left)
            draw("intermediate values", right)
            more = st.segmented_control("More of Optuna's plots", sweeps.FIGURES[2:], key="sweep_more",
                                        default="importance")
            if more:
                draw(more, st.container())
                done = int(counts.get("complete", 0))
                if more == "importance" and done < sweeps.RELIABLE_IMPORTANCE_TRIALS:
                    st.warning(f"Only {done} completed trial(s): parameter importance is unreliable under "
                               f"{sweeps.RELIABLE_IMPORTANCE_TRIALS} (it ranks noise). Run more trials before "
                               "trusting it.", icon=":material/warning:")
            _best_panel(study, objective_label)
            shown = frame.rename(columns={c: c[2:] for c in param_cols})
            shown["open"] = [f"/live?run={r}" if r else None for r in frame.run_id]
            config = {"value": st.column_config.NumberColumn(objective_label, format="%.4f"),
                      "seconds": st.column_config.NumberColumn(format="%.0f"),
                      "open": st.column_config.LinkColumn("run", display_text="open run")}
            for col in param_cols:     # searched values: the one format of this page (3 significant digits)
                if pd.api.types.is_float_dtype(frame[col]):
                    config[col[2:]] = st.column_config.NumberColumn(format="%.3g")
            st.dataframe(shown, hide_index=True, width="stretch", column_config=config)
            tail = sweeps.log_tail(root, picked)
            if tail:
                with st.expander("Sweep output"):
                    st.code(tail, language="text", wrap_lines=True)

        def _best_panel(study, objective_label: str) -> None:
            trial = sweeps.best(study)
            with st.container(border=True):
                st.markdown("**Best trial**")
                if trial is None:
                    st.caption("No trial has completed yet.")
                    return
                run_id = trial.user_attrs.get("run_id")
                cols = st.columns([1, 1, 2])
                cols[0].metric(objective_label, f"{trial.value:.4f}")
                cols[1].metric("Trial", f"#{trial.number}")
                cols[2].markdown(f"run [`{run_id}`](/live?run={quote(str(run_id))}) · "
                                 + ", ".join(f"`{k}` = {ui.plain(sweeps.format_param(v))}"
                                             for k, v in trial.params.items()))
                try:
                    store = RunStore(root, create=False)
                    run = store.get_run(run_id)
                except StoreError:
                    st.caption("Its run is in another machine's run store (a shared-storage sweep).")
                    return
                load = sweeps.launch_values(run, store, name=f"{study.study_name}-best")
                with st.expander("Its config"):
                    st.json(load["config"], expanded=False)
                if st.button("Launch with this config", key="sweep_launch_best", icon=":material/rocket_launch:",
                             help="Opens Configure & launch with this trial's config and options (its evaluation "
                                  "cadence included) filled in."):
                    st.session_state["configure_load"] = load
                    st.switch_page(ui.PAGES["configure"])

        results()
