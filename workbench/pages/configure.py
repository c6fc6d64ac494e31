"""Configure & launch: every HybridTrainingConfig field, grouped as the guide groups them, with the guide's
defaults and help, the core's validation messages inline, the pipeline's options, presets, and Launch."""
from __future__ import annotations

import streamlit as st

from hybrid_optimization.config import ConfigError, HybridTrainingConfig
from hybrid_optimization.distill.reporting import REPORT_TO
from hybrid_optimization.schema import BASE_OPTIMIZERS, HYBRID_DEFAULT_SCHEDULE, SCHEDULES, WARMUP_WORDS
from hybrid_optimization.tracking import RunStore, StoreError, StoreMissing
from workbench import config_form, datasets, launcher, presets, ui
from workbench.launcher import LaunchError

FORM = "form_values"          # non-widget copy of every field: survives page switches (widget state does not)
DATA_SOURCES = ("chatterbot-corpus (default)", "Upload a file", "Path on this machine")
OPTION_DEFAULTS = launcher.form_defaults()
PRESET_DEFAULT = "preset default"
OPTIMIZER_DEFAULT = "default"       # optimizer None: AdamW for the baseline, the config's base_optimizer for --hybrid
# Options of the optimizer menu and the reporting back-ends (TrainOptions fields), with the form's starting values.
SCHEDULE_DEFAULT = "default"        # schedule None: constant for the baseline, schema.HYBRID_DEFAULT_SCHEDULE for --hybrid
MENU_DEFAULTS = {"optimizer": OPTIMIZER_DEFAULT, "schedule": SCHEDULE_DEFAULT, "warmup_steps": None, "report_to": []}   # shown for options where None means "what the preset says"


# Switches of the hybrid-only groups (the auxiliary NN, trust region and clustering, adaptation included): a
# baseline run shows and saves them off.
BASELINE_OFF = tuple(name for group in config_form.HYBRID_GROUPS for name in config_form.GROUPS.get(group, ())
                     if config_form.widget_kind(name) == "bool")


def _key(kind: str, name: str) -> str:
    return f"{kind}.{name}"


def _init_state() -> None:
    form = st.session_state.setdefault(FORM, {})
    for name, value in config_form.defaults().items():
        form.setdefault(_key("cfg", name), config_form.widget_value(name, value))
    text_options = {"epochs", "seq_len", "alpha", "temperature", "teacher", "run_name", "data_path"}
    for name, value in {**OPTION_DEFAULTS, **MENU_DEFAULTS, "data_source": DATA_SOURCES[0], "data_path": "", "tags": "",
                        "student_size": PRESET_DEFAULT}.items():
        if name in text_options:
            value = "" if value is None else str(value)
        form.setdefault(_key("opt", name), value)
    # Widgets lose their state when another page is shown; restore it from the form copy.
    for key, value in form.items():
        if key not in st.session_state:
            st.session_state[key] = value


def _remember() -> None:
    form = st.session_state[FORM]
    for key in list(form):
        if key in st.session_state:
            form[key] = st.session_state[key]


def _set_form(config: dict, options: dict) -> None:
    form = st.session_state[FORM]
    for name, value in config.items():
        form[_key("cfg", name)] = config_form.widget_value(name, value)
    for name, value in options.items():
        if name == "tags":
            value = ", ".join(value or [])
        elif name == "data":
            form[_key("opt", "data_source")] = DATA_SOURCES[2] if value else DATA_SOURCES[0]
            name, value = "data_path", value or ""
        elif name in ("epochs", "seq_len", "alpha", "temperature", "teacher", "run_name"):
            value = "" if value is None else str(value)
        elif name == "report_to":
            value = list(value or [])
        elif value is None and name in MENU_DEFAULTS:       # unset: the menu's "default" entry (warmup: empty)
            value = MENU_DEFAULTS[name]
        elif name == "student_size" and value is None:
            value = PRESET_DEFAULT
        form[_key("opt", name)] = value
    for key, value in form.items():
        st.session_state[key] = value


def _config_values() -> dict:
    raw = {name: st.session_state[_key("cfg", name)] for name in config_form.defaults()}
    values = config_form.values_from_widgets(raw)
    # The baseline saves what it runs: no auxiliary NN, no trust region, no clustering.
    if st.session_state[_key("opt", "hybrid")]:
        return values
    return {**config_form.baseline_values(values), **{name: False for name in BASELINE_OFF if name in values}}


def _options(data_path: str | None) -> tuple[dict, dict[str, str]]:
    """Launch options from the widgets, plus parse errors of the free-text ones."""
    get = lambda name: st.session_state[_key("opt", name)]  # noqa: E731
    errors = {}
    parsed = {}
    for name, kind in (("epochs", int), ("seq_len", int), ("alpha", float), ("temperature", float)):
        value = config_form.parse_number(get(name))
        if isinstance(value, str):
            errors[name] = f"{value!r} is invalid: it must be a number or empty"
            value = None
        elif value is not None and kind is float:
            value = float(value)
        parsed[name] = value
    tags = [t.strip() for t in str(get("tags")).split(",") if t.strip()]
    options = dict(preset=get("preset"), hybrid=get("hybrid"), data=data_path, teacher=get("teacher").strip() or None,
                   student_size=None if get("student_size") == PRESET_DEFAULT else get("student_size"), device=get("device"), nproc=int(get("nproc")),
                   embedder=get("embedder"), cluster_batches=get("cluster_batches"), export=get("export"), save_metrics=get("save_metrics"),
                   run_name=get("run_name").strip() or None, tags=tags,
                   optimizer=None if get("optimizer") == OPTIMIZER_DEFAULT else get("optimizer"),
                   schedule=None if get("schedule") == SCHEDULE_DEFAULT else get("schedule"), warmup_steps=None if get("warmup_steps") is None else int(get("warmup_steps")), report_to=list(get("report_to")),
                   **parsed)
    return options, errors


def _safe_config(values: dict):
    """The form's config when it is valid (its errors are shown by its fields), else None (the defaults)."""
    try:
        return HybridTrainingConfig.from_dict(values)
    except (ConfigError, TypeError):
        return None


def _field_error(errors: dict[str, str], name: str, where=st) -> None:
    if name in errors:
        where.error(ui.plain(errors[name]), icon=":material/error:")


def _config_widget(name: str, errors: dict[str, str], disabled: bool = False) -> None:
    key = _key("cfg", name)
    label = name
    help_text = config_form.HELP.get(name)
    kind = config_form.widget_kind(name)
    if kind == "bool":
        if disabled and name in BASELINE_OFF:
            # Shown as what the baseline runs (off), without touching the hybrid form's own value.
            st.checkbox(label, value=False, key=f"baseline.{name}", help=help_text, disabled=True)
        else:
            st.checkbox(label, key=key, help=help_text, disabled=disabled)
    elif kind == "choice":
        choices = config_form.CHOICES[name]
        st.selectbox(label, choices, key=key, help=help_text, format_func=lambda v: f"{v:g}" if isinstance(v, float)
                     else str(v), disabled=disabled)
    elif kind == "int":
        st.number_input(label, key=key, step=1, help=help_text, disabled=disabled)
    else:
        st.text_input(label, key=key, help=help_text, disabled=disabled,
                      placeholder="empty = none" if name in config_form.OPTIONAL else None)
    _field_error(errors, name)


# -- preset callbacks (run before the widgets are drawn, so they may set widget state) ---------------------------
def _load_preset() -> None:
    name = st.session_state.get("preset_choice")
    try:
        config, options = presets.load_preset(ui.runs_root(), name)
    except presets.PresetError as exc:
        st.session_state["preset_message"] = ("error", ui.plain(exc))
        return
    _set_form(config, options)
    st.session_state["preset_message"] = ("success", f"Loaded preset {ui.plain(repr(name))}.")


def _save_preset(config: dict, options: dict) -> None:
    name = st.session_state.get("preset_name", "").strip()
    try:
        path = presets.save_preset(ui.runs_root(), name, config, options)
    except (presets.PresetError, ConfigError, LaunchError) as exc:
        st.session_state["preset_message"] = ("error", f"Not saved: {ui.plain(exc)}")
        return
    st.session_state["preset_message"] = ("success", f"Saved preset {ui.plain(repr(name))} to {ui.plain(path)}.")


def _delete_preset() -> None:
    name = st.session_state.get("preset_choice")
    try:
        presets.delete_preset(ui.runs_root(), name)
        st.session_state["preset_message"] = ("success", f"Deleted preset {ui.plain(repr(name))}.")
    except presets.PresetError as exc:
        st.session_state["preset_message"] = ("error", ui.plain(exc))


# -- the page -----------------------------------------------------------------------------------------------------
ui.page_header("Configure & launch",
               "Every HybridTrainingConfig field with the guide's defaults; errors come from the core's own "
               "validation. Launch starts the training CLI as a background process and returns at once.")
# The store is created by the first launch, not by looking at the form; a store that cannot be used (another
# schema version, not SQLite) is reported here and blocks launching.
root = ui.runs_root()
store_problem = None
try:
    RunStore(root, create=False)
except StoreMissing:
    pass
except StoreError as exc:
    store_problem = str(exc)
    st.error(ui.plain(store_problem))
_init_state()
# "Launch with this config" (Sweep page): the best trial's config and options fill the form.
pending = st.session_state.pop("configure_load", None)
if pending:
    known = config_form.defaults()
    _set_form({k: v for k, v in (pending.get("config") or {}).items() if k in known}, pending.get("options") or {})
    st.success("The form holds the chosen sweep trial's config; check it and Launch.", icon=":material/check:")

# Data source first: its validation result decides the `data` option.
data_path: str | None = None
data_error: str | None = None

with st.container(border=True):
    st.subheader("Run")
    c1, c2, c3, c4 = st.columns(4)
    c1.selectbox("Preset", launcher.PRESETS, key="opt.preset",
                 help="tiny: a small teacher trained here on the data (CPU-friendly). smollm2: SmolLM2-135M-Instruct "
                      "as the teacher.")
    c2.toggle("Hybrid optimizer", key="opt.hybrid",
              help="On: auxiliary NN + trust region + clustering as configured below (--hybrid). "
                   "Off: the AdamW baseline at constant LR.")
    c3.selectbox("Device", launcher.DEVICES, key="opt.device",
                 help="auto: the trainer picks CUDA, then MPS, then CPU. The app itself never touches the GPU.")
    c4.number_input("Processes (torchrun)", key="opt.nproc", step=1,
                    help="More than 1 starts torchrun --nproc_per_node N (DistributedDataParallel).")

    d1, d2 = st.columns([1, 2])
    source = d1.radio("Training data", DATA_SOURCES, key="opt.data_source")
    with d2:
        if source == DATA_SOURCES[1]:
            upload = st.file_uploader("Upload .txt (plain text) or .jsonl (one chat per line)", type=["txt", "jsonl"],
                                      max_upload_size=datasets.MAX_UPLOAD_MB, key="data_upload",
                                      help=f"At most {datasets.MAX_UPLOAD_MB} MB. JSONL lines: "
                                           '{"messages": [{"role": "user", "content": "..."}, ...]}')
            if upload is not None:
                try:
                    saved = datasets.save_upload(upload.name, upload.getvalue(), root)
                    with st.spinner("Checking the file with the pipeline's reader…"):
                        count = datasets.validate_upload(saved, upload.name)
                    data_path = str(saved)
                    st.success(f"{ui.plain(upload.name)}: {count} documents.")
                except datasets.DataFileError as exc:
                    data_error = str(exc)
            else:
                data_error = "upload a data file, or choose another source"
        elif source == DATA_SOURCES[2]:
            typed = st.text_input("Data file (.txt or .jsonl)", key="opt.data_path").strip()
            if typed:
                try:
                    with st.spinner("Checking the file with the pipeline's reader…"):
                        count = datasets.validate_data_file(typed)
                    data_path = typed
                    st.caption(f"{count} documents.")
                except datasets.DataFileError as exc:
                    data_error = str(exc)
            else:
                data_error = "enter the path of a .txt or .jsonl file, or choose another source"
        else:
            st.caption("About 2,000 English conversations from the PyPI package chatterbot-corpus, rendered with the "
                       "teacher's chat template.")
        if data_error:
            st.error(ui.plain(data_error), icon=":material/error:")

    e1, e2, e3, e4 = st.columns(4)
    e1.text_input("Teacher folder (optional)", key="opt.teacher",
                  help="A local Hugging Face causal-LM folder; empty: the preset's teacher.")
    e2.selectbox("Student size", [PRESET_DEFAULT, *launcher.STUDENT_SIZES], key="opt.student_size")
    e3.text_input("Epochs (optional)", key="opt.epochs", help="Empty: train for max_steps steps.")
    e4.text_input("Sequence length (optional)", key="opt.seq_len",
                  help=f"Tokens per training window, {config_form.SEQ_LEN_RANGE[0]}–{config_form.SEQ_LEN_RANGE[1]}. "
                       "Empty: the preset's default (tiny 64, smollm2 128).")
    f1, f2, f3, f4 = st.columns(4)
    baseline_run = not st.session_state[_key("opt", "hybrid")]
    f1.selectbox("Sample embedder", launcher.EMBEDDERS, key="opt.embedder", disabled=baseline_run,
                 help="Features for data clustering: TF-IDF + SVD, or MiniLM sentence embeddings."
                      + (" Not used by the baseline (it does not cluster its data)." if baseline_run else ""))
    f1.selectbox("Cluster batches", launcher.CLUSTER_BATCHES, key="opt.cluster_batches", disabled=baseline_run,
                 help="Hybrid runs: every batch takes an equal share of each data cluster (mixed), or comes from "
                      "one cluster (single, the guide's per-cluster sampling; noisier gradients).")
    f2.text_input("Distillation α (optional)", key="opt.alpha", help="Weight of the teacher's soft targets.")
    f3.text_input("Temperature (optional)", key="opt.temperature")
    with f4:
        st.checkbox("Export the packed model", key="opt.export")
        st.checkbox("Save metrics CSV", key="opt.save_metrics")
    g1, g2 = st.columns(2)
    g1.text_input("Run name (optional)", key="opt.run_name")
    g2.text_input("Tags (comma-separated)", key="opt.tags")
    h1, h2, h3, h4 = st.columns(4)
    h1.selectbox("Optimizer", [OPTIMIZER_DEFAULT, *BASE_OPTIMIZERS], key="opt.optimizer",
                 help="The update rule (--optimizer). default: AdamW for the baseline; for a hybrid run the config's "
                      "base_optimizer below. muon: Muon on the hidden matrices + AdamW for the rest; schedule-free: "
                      "constant schedule only; prodigy: LR-free (the learning rate is a factor on its own step size, "
                      "1.0 by default). Which ones combine with --hybrid and a schedule is checked here.")
    h2.selectbox("LR schedule", [SCHEDULE_DEFAULT, *SCHEDULES], key="opt.schedule",
                 help="--schedule, after the warmup: constant, cosine decay, warmup-stable-decay (wsd), or for a "
                      "hybrid run hybrid-cosine (the cosine inside the hybrid, its meta-learning annealed with the "
                      f"LR). default: constant for the baseline, {HYBRID_DEFAULT_SCHEDULE} for a hybrid run.")
    h3.number_input("Warmup steps", key="opt.warmup_steps", step=1, value=None, placeholder="auto",
                    help=f"Linear LR warmup steps (--warmup_steps). Empty (auto): {WARMUP_WORDS}.")
    h4.multiselect("Also report to", REPORT_TO, key="opt.report_to",
                   help="Write the run's metrics to these trackers too (--report_to), besides this workbench; "
                        "each needs its package installed.")

config_values = _config_values()
config_errors = config_form.validate(config_values)
options, option_parse_errors = _options(data_path)
option_errors = {**launcher.option_errors(options, _safe_config(config_values)), **option_parse_errors}
option_errors = {name: message.split(" = ", 1)[-1] if message.startswith(f"{name} = ") else message
                 for name, message in option_errors.items()}
if data_error:
    option_errors.pop("data", None)  # already shown next to the data source
# Errors of the run options sit under their own fields (the widgets above are drawn; these slots follow them).
SLOTS = ((e3, "epochs"), (e4, "seq_len"), (f2, "alpha"), (f3, "temperature"), (e1, "teacher"), (g1, "run_name"),
         (g2, "tags"), (h1, "optimizer"), (h2, "schedule"), (h3, "warmup_steps"), (h4, "report_to"))
for slot, name in SLOTS:
    _field_error(option_errors, name, where=slot)

st.subheader("HybridTrainingConfig")
hybrid_on = bool(st.session_state[_key("opt", "hybrid")])
if not hybrid_on:
    st.info("Baseline: AdamW at constant LR. The auxiliary NN, trust region and clustering are off for this run "
            "(their settings are kept for the next hybrid run).", icon=":material/info:")
groups = list(config_form.grouped_fields().items())
columns = st.columns(3)
for i, (title, names) in enumerate(groups):
    with columns[i % 3].container(border=True):
        off = not hybrid_on and title in config_form.HYBRID_GROUPS
        st.markdown(f"**{title}**" + (" — :gray[not used by the baseline]" if off else ""))
        for name in names:
            _config_widget(name, config_errors, disabled=off)

# The process count, and any option error without a field of its own above: every counted problem is shown.
for name in sorted(option_errors.keys() - {name for _, name in SLOTS}):
    st.error(ui.plain(option_errors[name]), icon=":material/error:")

problems = len(config_errors) + len(option_errors) + (1 if data_error else 0) + (1 if store_problem else 0)
launch_col, status_col = st.columns([1, 3])
launch = launch_col.button("Launch", type="primary", key="launch", icon=":material/rocket_launch:",
                           disabled=bool(problems), help="Fix the problems above first." if problems else None)
if problems:
    status_col.warning(f"{problems} problem(s) above — fix them to launch.")
if launch:
    if problems:
        status_col.error("Not launched: the configuration has errors (see the messages above).")
    else:
        try:
            run_id = launcher.launch(RunStore(root, create=True), config_values, options)
        except (ConfigError, LaunchError, StoreError) as exc:
            status_col.error(f"Not launched: {ui.plain(exc)}")
        else:
            _remember()
            st.session_state["selected_run"] = run_id
            st.session_state["launched_run"] = run_id
            st.switch_page(ui.PAGES["live"])

with st.expander("Presets", expanded=False, icon=":material/bookmark:"):
    message = st.session_state.pop("preset_message", None)
    if message:
        getattr(st, message[0])(message[1])
    p1, p2, p3 = st.columns([2, 1, 1])
    saved = presets.list_presets(root)
    p1.selectbox("Saved presets", saved, key="preset_choice", index=0 if saved else None,
                 placeholder="none saved yet")
    p2.button("Load", key="preset_load", on_click=_load_preset, disabled=not saved)
    p3.button("Delete", key="preset_delete", on_click=_delete_preset, disabled=not saved)
    q1, q2 = st.columns([3, 1])
    q1.text_input("Save the form as", key="preset_name", placeholder="e.g. ternary-8-clusters")
    preset_options = {**options, "data": data_path}
    q2.button("Save", key="preset_save", on_click=_save_preset, args=(config_values, preset_options),
              disabled=bool(config_errors))
    st.caption(f"Presets are JSON files in {ui.plain(presets.presets_dir(root))}.")

_remember()
