"""Reading runs for the workbench: store rows as DataFrames, incremental reads, smoothing, downsampling and the
derived numbers pages show.

Everything here is plain pandas/numpy on top of `hybrid_optimization.tracking.RunStore` — no Streamlit — so it
is unit-tested directly and shared by every page. The store returns rows (the core has no pandas); the
`list_runs` / `read_*` adapters below are the one place where rows become DataFrames. The store is the source of truth; the `RunCache` below only
remembers what a session has already read, so each live refresh asks SQLite for the new rows alone.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hybrid_optimization.tracking import ACTIVE_STATUSES, LAYER_COLUMNS, STEP_COLUMNS, Rows, RunStore

MAX_POINTS = 2000          # per series, after downsampling (stated in the UI)
DEFAULT_SMOOTHING = 0.6    # EMA weight, as TensorBoard / W&B users expect
RATE_WINDOW = 100          # steps in the running constraint-activation rate
DEFAULT_REFRESH_S = 1      # live refresh: with the trainer's 1 s batched commits a new point shows within ~2 s

# What each live chart plots: title -> step columns (several columns share one chart).
LIVE_CHARTS: dict[str, tuple[str, ...]] = {
    "Loss": ("loss",),
    "Learning rate": ("learning_rate",),
    "LR multiplier": ("lr_multiplier",),
    "Trust radius": ("trust_radius",),
    "Constraint activation (running rate)": ("constraint_rate",),
    "Update magnitude ‖ΔΘ‖": ("update_magnitude",),
    "Gradient magnitude ‖g‖": ("gradient_magnitude",),
    "Quantization error": ("quantization_error",),
    "Flip rate": ("flip_rate",),
    "Tokens/s": ("tokens_per_s",),
}
# Evaluation charts: title -> eval keys (the trainer's log_eval names). Per-cluster losses live on the Clusters page.
EVAL_CHARTS: dict[str, tuple[str, ...]] = {
    "Validation loss": ("val_loss", "val_loss_fp"),
    "Validation perplexity": ("val_ppl",),
    "KL to the teacher": ("kl_teacher",),
    "Top-1 agreement with the teacher": ("top1_agreement",),
    "Quantized vs full-precision logits": ("qdiff_max", "qdiff_mean"),
}
OTHER_EVALS = "Other evaluation metrics"
# Six charts by default: drawing every chart on every refresh is what makes dashboards slow.
DEFAULT_LIVE_CHARTS = ("Loss", "Learning rate", "LR multiplier", "Trust radius",
                       "Constraint activation (running rate)", "Validation loss")


def other_eval_keys(keys) -> list[str]:
    """Eval keys no named chart shows (and that are not per-cluster losses)."""
    named = {k for members in EVAL_CHARTS.values() for k in members}
    return sorted(k for k in keys if k not in named and not str(k).startswith("val_loss_cluster_"))


# -- store rows -> DataFrames ---------------------------------------------------------------------------------------
def frame(rows: Rows, numeric=()) -> pd.DataFrame:
    """Rows as a DataFrame; `numeric` columns become float64 with NaN for NULL (an all-NULL column would
    otherwise come back as object dtype full of None)."""
    out = pd.DataFrame.from_records(rows.values, columns=list(rows.columns))
    for column in numeric:
        if column in out.columns and out[column].dtype == object:
            out[column] = pd.to_numeric(out[column], errors="coerce").astype("float64")
    return out


def list_runs(store: RunStore, include_archived: bool = False) -> pd.DataFrame:
    """One row per run (newest first) with `cfg.*` and `final.*` columns (see RunStore.list_runs)."""
    records = store.list_runs(include_archived=include_archived)
    return pd.DataFrame.from_records(records, columns=None if records else list(RUN_COLUMNS))


RUN_COLUMNS = ("run_id", "name", "status", "preset", "created_at", "started_at", "ended_at", "step",
               "total_steps", "device", "pid", "host", "heartbeat", "tags", "notes", "archived")


def read_steps(store: RunStore, run_id: str, after_step: int = -1, columns=None, every: int = 1) -> pd.DataFrame:
    """Step rows as one float frame (NULL -> NaN; step as int64): one array conversion, ~3x faster than row by
    row."""
    return steps_frame(store.read_steps(run_id, after_step=after_step, columns=columns, every=every))


def steps_frame(rows: Rows) -> pd.DataFrame:
    """RunStore.read_steps rows as read_steps' frame."""
    values = np.array(rows.values, dtype=np.float64).reshape(len(rows), len(rows.columns))
    out = pd.DataFrame(values, columns=list(rows.columns))
    out["step"] = out["step"].astype(np.int64)
    return out


def read_evals(store: RunStore, run_id: str, after_step: int = -1) -> pd.DataFrame:
    """Evaluation rows (step, wall_time, key, value): built column by column, key as plain Python strings (arrow
    strings per row cost more than the read on a 100-run comparison)."""
    return evals_frame(store.read_evals(run_id, after_step=after_step))


def evals_frame(rows: Rows) -> pd.DataFrame:
    """RunStore.read_evals rows as read_evals' frame."""
    if not len(rows):
        return frame(rows, numeric=["wall_time", "value"])
    steps, walls, keys, values = zip(*rows.values)
    return pd.DataFrame({"step": np.asarray(steps, dtype=np.int64),
                         "wall_time": np.asarray(walls, dtype="float64"),
                         "key": pd.Series(keys, dtype=object),
                         "value": np.array([np.nan if v is None else v for v in values], dtype="float64")})


def read_layers(store: RunStore, run_id: str, step: int | None = None, all_steps: bool = False) -> pd.DataFrame:
    numeric = [c for c in LAYER_COLUMNS if c not in ("layer", "module_type")]
    return frame(store.read_layers(run_id, step=step, all_steps=all_steps), numeric=numeric)


def read_plan(store: RunStore, run_id: str) -> pd.DataFrame:
    return frame(store.read_plan(run_id), numeric=["bits", "n_params"])


def read_samples(store: RunStore, run_id: str, features: bool = False) -> pd.DataFrame:
    return frame(store.read_samples(run_id, features=features), numeric=["x", "y"])


def read_cluster_batches(store: RunStore, run_id: str) -> pd.DataFrame:
    return frame(store.read_cluster_batches(run_id))


def read_logs(store: RunStore, run_id: str, after_seq: int = 0, limit: int | None = None,
              tail: bool = False) -> pd.DataFrame:
    return frame(store.read_logs(run_id, after_seq=after_seq, limit=limit, tail=tail))


# -- series maths ---------------------------------------------------------------------------------------------------
def ema(values: pd.Series, weight: float) -> pd.Series:
    """Debiased exponential moving average with TensorBoard's weight convention (0 = raw, 0.99 = very smooth).

    pandas' `ewm(adjust=True)` normalises by the sum of weights, which is exactly TensorBoard's debiasing, so the
    first points are not pulled towards zero. NaNs (skipped steps) are ignored, not propagated."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight {weight!r} is invalid: it must be in [0, 1)")
    values = pd.to_numeric(values, errors="coerce").astype("float64")
    if weight == 0 or values.empty:
        return values
    return values.ewm(alpha=1 - weight, adjust=True, ignore_na=True).mean().where(values.notna())


def running_rate(active: pd.Series, window: int = RATE_WINDOW) -> pd.Series:
    """Fraction of the last `window` steps whose update hit the trust region (NaN-aware)."""
    return pd.to_numeric(active, errors="coerce").rolling(window, min_periods=1).mean()


def downsample_indices(values: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most `max_points` points that keep the shape of a series: the series is cut into
    max_points/2 - 1 equal buckets and each bucket keeps its minimum and its maximum (spikes survive, unlike
    striding); the first and last points are always kept. Vectorised: ~2 ms for 100,000 points."""
    n = len(values)
    if n <= max_points:
        return np.arange(n)
    buckets = max(1, (max_points - 2) // 2)
    size = -(-n // buckets)                      # ceil: the last bucket may be shorter
    padded = np.full(buckets * size, np.nan)
    padded[:n] = values
    grid = padded.reshape(buckets, size)
    missing = np.isnan(grid)
    offsets = np.arange(buckets) * size
    lows = np.where(missing, np.inf, grid).argmin(axis=1) + offsets
    highs = np.where(missing, -np.inf, grid).argmax(axis=1) + offsets
    keep = np.concatenate([[0, n - 1], lows, highs])
    return np.unique(keep[keep < n])


def columns_for(charts: list[str]) -> tuple[str, ...]:
    """Step columns the given live charts need (plus tokens/s for the progress line)."""
    needed = {"tokens_per_s"}
    for title in charts:
        for col in LIVE_CHARTS.get(title, ()):
            needed.add("constraint_active" if col == "constraint_rate" else col)
    return tuple(c for c in STEP_COLUMNS if c in needed)


def with_derived(steps: pd.DataFrame) -> pd.DataFrame:
    """Add columns the charts need that the trainer does not log: the running constraint-activation rate and the
    time since the run's first step."""
    out = steps.copy()
    if "constraint_active" in out:
        out["constraint_rate"] = running_rate(out["constraint_active"])
    if "wall_time" in out and len(out):
        out["time_s"] = out["wall_time"] - out["wall_time"].iloc[0]
    return out


def chart_series(steps: pd.DataFrame, y: str, x: str = "step", smoothing: float = DEFAULT_SMOOTHING,
                 max_points: int = MAX_POINTS, run: str = "") -> pd.DataFrame:
    """One series ready to plot: columns run, series, x, raw, smooth — smoothed on every point, then downsampled.

    Empty when the column is missing or has no values (e.g. quantization error of a full-precision run). numpy
    throughout: Compare builds one per run and metric (100 runs × 2 charts per render)."""
    if y not in steps or x not in steps:
        return _series_frame()
    return _series_of(steps[x].to_numpy(), steps[y].to_numpy(dtype="float64", na_value=np.nan), y, smoothing,
                      max_points, run)


def _series_of(xs: np.ndarray, raw: np.ndarray, name: str, smoothing: float, max_points: int,
               run: str) -> pd.DataFrame:
    """chart_series on arrays: NaNs dropped, smoothed on every point, then downsampled."""
    keep = ~np.isnan(raw)
    if not keep.any():
        return _series_frame()
    raw, xs = raw[keep], xs[keep]
    smooth = _ema_dense(raw, smoothing)
    idx = downsample_indices(raw, max_points)
    return _series_frame(run, name, xs[idx], raw[idx], smooth[idx])


EMA_EXPONENT = 300.0     # a block's largest scale factor w^-(block-1) stays below e^300 (float64 reaches e^709)


def _ema_dense(values: np.ndarray, weight: float) -> np.ndarray:
    """`ema` of a series without NaNs in numpy alone (~50× faster than pandas' ewm on 2,000 points, and no
    scipy.signal import: that import alone cost a fresh server ~1 CPU-second on its first Compare render).

    The running sum s_t = w·s_{t-1} + (1−w)·x_t, debiased by 1 − w^(t+1) — TensorBoard's smoothing, the same
    numbers as ema() (tested). Within a block, s_j = w^j·(w·s_before + (1−w)·Σ_{i≤j} w^-i·x_i) is one cumsum;
    blocks are as long as w^-i stays finite (30,000 points at w = 0.99, 3,000 at 0.9), so the loop is short."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight {weight!r} is invalid: it must be in [0, 1)")
    values = np.asarray(values, dtype="float64")
    n = len(values)
    if weight == 0 or n == 0:
        return values.copy()
    block = max(1, min(n, int(EMA_EXPONENT / -math.log(weight))))
    inverse = weight ** -np.arange(block, dtype="float64")          # w^-i for i in [0, block)
    running = np.empty(n)
    before = 0.0
    for start in range(0, n, block):
        chunk = values[start:start + block]
        scale = inverse[:len(chunk)]
        running[start:start + len(chunk)] = (weight * before + (1 - weight) * np.cumsum(chunk * scale)) / scale
        before = running[start + len(chunk) - 1]
    with np.errstate(under="ignore"):
        return running / (1 - weight ** np.arange(1, n + 1))


def _series_frame(run: str = "", name: str = "", x=(), raw=(), smooth=()) -> pd.DataFrame:
    """The chart-series frame; run and series as object columns (building arrow strings for every point of every
    run costs more than the maths)."""
    n = len(x)
    return pd.DataFrame({"run": pd.Series(np.full(n, run, dtype=object), dtype=object),
                         "series": pd.Series(np.full(n, name, dtype=object), dtype=object),
                         "x": np.asarray(x), "raw": np.asarray(raw, dtype="float64"),
                         "smooth": np.asarray(smooth, dtype="float64")})


def eval_series(evals: pd.DataFrame, keys: list[str] | None = None, run: str = "",
                smoothing: float = 0.0, max_points: int = MAX_POINTS, x: str = "step",
                t0: float | None = None) -> pd.DataFrame:
    """Long eval rows (step, key, value) -> chart series (run, series=key, x, raw, smooth). x="time_s" puts
    them on the wall-time axis of the step charts: seconds since `t0` (the run's first step)."""
    if evals.empty:
        return _series_frame()
    all_keys = evals.key.to_numpy(dtype=object)
    steps = evals.step.to_numpy()
    values = evals.value.to_numpy(dtype="float64", na_value=np.nan)
    walls = evals.wall_time.to_numpy(dtype="float64", na_value=np.nan) if x == "time_s" else None
    parts = []
    for key in keys if keys is not None else sorted(set(all_keys)):
        mask = all_keys == key
        if not mask.any():
            continue
        order = np.argsort(steps[mask], kind="stable")
        xs = steps[mask][order]
        if x == "time_s":
            origin = t0 if t0 is not None else float(np.nanmin(walls[mask]))
            xs = walls[mask][order] - origin
        parts.append(_series_of(xs, values[mask][order], key, smoothing, max_points, run))
    if len(parts) == 1:
        return parts[0]
    return pd.concat(parts, ignore_index=True) if parts else _series_frame()


# -- live progress --------------------------------------------------------------------------------------------------
def progress(run: dict, steps: pd.DataFrame, window: int = 50) -> dict:
    """Step, fraction done, tokens/s and ETA from the last `window` steps' wall times. Steps count completed
    optimizer steps (the trainer logs step n after its n-th update), so step == total_steps means done."""
    step = run.get("step")
    total = run.get("total_steps")
    out = {"step": step, "total": total, "fraction": None, "tokens_per_s": None, "steps_per_s": None,
           "eta_s": None}
    if step is not None and total:
        out["fraction"] = min(1.0, max(0.0, step / total))
    if len(steps) >= 2:
        tail = steps.tail(window)
        dt = float(tail.wall_time.iloc[-1] - tail.wall_time.iloc[0])
        ds = float(tail.step.iloc[-1] - tail.step.iloc[0])
        if dt > 0 and ds > 0:
            out["steps_per_s"] = ds / dt
            if total and step is not None and run.get("status") in ACTIVE_STATUSES:
                out["eta_s"] = max(0.0, (total - step) / out["steps_per_s"])
    if "tokens_per_s" in steps and steps.tokens_per_s.notna().any():
        out["tokens_per_s"] = float(steps.tokens_per_s.dropna().iloc[-1])
    return out


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


@dataclass
class RunCache:
    """What one session has read of one run so far; `refresh` appends only rows newer than the last seen.

    A resumed run may rewrite the steps logged after its last checkpoint, so when a run goes from a finished
    state back to queued/running (a new attempt), the cache starts over."""
    run_id: str
    steps: pd.DataFrame = field(default_factory=pd.DataFrame)
    evals: pd.DataFrame = field(default_factory=pd.DataFrame)
    logs: pd.DataFrame = field(default_factory=pd.DataFrame)
    last_step: int = -1
    last_eval_step: int = -1
    last_seq: int = 0
    status: str | None = None
    reads: int = 0
    columns: tuple[str, ...] = ()
    memo: dict = field(default_factory=dict)      # run_series results, valid while nothing new was read

    def reset(self) -> None:
        self.steps, self.evals, self.logs = pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
        self.last_step, self.last_eval_step, self.last_seq = -1, -1, 0
        self.memo = {}

    def refresh(self, store: RunStore, run: dict, columns: tuple[str, ...] | None = None,
                log_lines: int = 200) -> int:
        """Read new rows (of `columns` only: the charts on screen; None = all); returns how many step rows were
        new. Asking for a column not read so far re-reads the run once with it. log_lines=0 reads no logs."""
        status = run.get("status")
        if self.status is not None and self.status not in ACTIVE_STATUSES and status in ACTIVE_STATUSES:
            self.reset()
        wanted = tuple(STEP_COLUMNS) if columns is None else tuple(c for c in STEP_COLUMNS if c in set(columns))
        if not set(wanted) <= set(self.columns):
            self.columns = tuple(c for c in STEP_COLUMNS if c in set(wanted) | set(self.columns))
            self.steps, self.last_step = pd.DataFrame(), -1
        self.status = status
        self.reads += 1
        # A tick usually brings a few steps and no evaluation: only rows that came become (small) frames.
        step_rows = store.read_steps(self.run_id, after_step=self.last_step, columns=self.columns)
        if len(step_rows):
            new_steps = steps_frame(step_rows)
            self.steps = new_steps if self.steps.empty else pd.concat([self.steps, new_steps], ignore_index=True)
            self.last_step = int(new_steps.step.iloc[-1])
        eval_rows = store.read_evals(self.run_id, after_step=self.last_eval_step)
        if len(eval_rows):
            new_evals = evals_frame(eval_rows)
            self.evals = new_evals if self.evals.empty else pd.concat([self.evals, new_evals], ignore_index=True)
            self.last_eval_step = int(new_evals.step.max())
        if log_lines <= 0:            # Compare: no log lines wanted
            return len(step_rows)
        # Only the newest `log_lines` lines matter to the view; older new lines are skipped, not queued.
        new_logs = read_logs(store, self.run_id, after_seq=self.last_seq, limit=log_lines, tail=True)
        if len(new_logs):
            self.logs = (pd.concat([self.logs, new_logs], ignore_index=True).tail(log_lines).reset_index(drop=True)
                         if len(self.logs) else new_logs)
            self.last_seq = int(new_logs.seq.iloc[-1])
        return len(step_rows)


EVAL_PREFIX = "eval:"     # a metric name "eval:val_loss" is an evaluation key; any other is a step column


def step_columns_for(metrics) -> tuple[str, ...]:
    """Step columns the given metrics need (constraint_rate is derived from constraint_active)."""
    needed = {"constraint_active" if m == "constraint_rate" else m for m in metrics if not m.startswith(EVAL_PREFIX)}
    return tuple(c for c in STEP_COLUMNS if c in needed)


def logged_eval_keys(cache: RunCache) -> frozenset:
    """The evaluation keys a run has logged so far, remembered until it logs another evaluation (a 100-run page
    asks on every rerun)."""
    version = (cache.last_eval_step, len(cache.evals))
    hit = cache.memo.get("eval_keys")
    if hit is not None and hit[0] == version:
        return hit[1]
    keys = frozenset(cache.evals.key.unique()) if len(cache.evals) else frozenset()
    cache.memo["eval_keys"] = (version, keys)
    return keys


def run_series(cache: RunCache, metric: str, x: str = "step", smoothing: float = DEFAULT_SMOOTHING,
               max_points: int = MAX_POINTS) -> pd.DataFrame:
    """One run's chart series of `metric` from what its RunCache holds (step metric smoothed then downsampled;
    an evaluation metric as logged), remembered until the cache reads something new for it — so a live tick
    recomputes only the runs that moved, and an evaluation chart only when an evaluation came (the same object
    comes back until then: group_series and the page's figure memo rely on that)."""
    steps = cache.steps
    if metric.startswith(EVAL_PREFIX):
        t0 = float(steps.wall_time.iat[0]) if x == "time_s" and len(steps) and "wall_time" in steps else None
        version = (cache.last_eval_step, len(cache.evals), t0)
    else:
        version = (cache.last_step, len(steps), cache.columns)
    key = (metric, x, smoothing, max_points)
    hit = cache.memo.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    if metric.startswith(EVAL_PREFIX):
        # Evaluations as logged (smoothing 0: smooth is raw), not smoothed.
        out = eval_series(cache.evals, [metric[len(EVAL_PREFIX):]], run=cache.run_id, x=x, t0=t0,
                          max_points=max_points)
    else:
        derived = steps
        if metric == "constraint_rate" or x == "time_s":
            derived = with_derived(steps)
        out = chart_series(derived, metric, x, smoothing, max_points, run=cache.run_id)
    cache.memo[key] = (version, out)
    return out


# -- run summary, sizes, diffs, exports -----------------------------------------------------------------------------
def plan_size(plan: pd.DataFrame) -> dict:
    """Parameter-weighted average bits of the quantized layers, their packed size and compression vs FP32."""
    if plan.empty or "bits" not in plan or "n_params" not in plan:
        return {"layers": 0, "params": 0, "avg_bits": None, "bytes": None, "fp32_bytes": None, "compression": None}
    rows = plan.dropna(subset=["bits", "n_params"])
    params = float(rows.n_params.sum())
    total_bits = float((rows.bits * rows.n_params).sum())
    avg = total_bits / params if params else None
    return {"layers": int(len(rows)), "params": int(params), "avg_bits": avg, "bytes": total_bits / 8,
            "fp32_bytes": params * 4, "compression": (32 / avg) if avg else None}


def sensitivity_table(plan: pd.DataFrame) -> pd.DataFrame:
    """The plan's per-layer sensitivity features (features_json) as numeric columns indexed by layer."""
    if plan.empty or "features_json" not in plan:
        return pd.DataFrame()
    rows = []
    for layer, text in zip(plan.layer, plan.features_json):
        try:
            features = json.loads(text) if isinstance(text, str) else {}
        except json.JSONDecodeError:
            features = {}
        rows.append({"layer": layer, **{k: v for k, v in features.items() if isinstance(v, (int, float))}})
    return pd.DataFrame(rows).set_index("layer") if rows else pd.DataFrame()


def config_diff(runs: dict[str, dict]) -> pd.DataFrame:
    """Config fields (and preset) whose values differ between the given runs: one row per field, a column per run."""
    if not runs:
        return pd.DataFrame()
    keys = sorted({k for run in runs.values() for k in (run.get("config") or {})})
    table = {label: {"preset": run.get("preset"), **{k: (run.get("config") or {}).get(k) for k in keys}}
             for label, run in runs.items()}
    frame = pd.DataFrame(table)
    if len(runs) < 2:
        return frame
    differs = frame.apply(lambda row: len({json.dumps(v, sort_keys=True, default=str) for v in row}) > 1, axis=1)
    return frame[differs]


def metrics_csv(store: RunStore, run_ids: list[str]) -> bytes:
    """Every step row of the given runs and their evaluations (val_loss, val_ppl, ... as columns on the step they
    were logged at), one CSV (run_id first), for download. A value that was not logged is an empty cell."""
    frames, eval_keys = [], set()
    for run_id in run_ids:
        steps = read_steps(store, run_id)
        evals = read_evals(store, run_id)
        if len(evals):
            wide = evals.pivot_table(index="step", columns="key", values="value", aggfunc="last")
            eval_keys.update(wide.columns)
            steps = steps.merge(wide.reset_index(), on="step", how="outer").sort_values("step")
        steps.insert(0, "run_id", run_id)
        frames.append(steps)
    columns = ["run_id", "step", "wall_time", *STEP_COLUMNS, *sorted(eval_keys)]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    out = out.reindex(columns=columns)
    out["step"] = pd.to_numeric(out["step"], errors="coerce").astype("Int64")
    buffer = io.StringIO()
    out.to_csv(buffer, index=False, na_rep="")
    return buffer.getvalue().encode()


def run_label(row: dict | pd.Series) -> str:
    name = row.get("name") or row.get("run_id")
    return name if name == row.get("run_id") else f"{name} ({row.get('run_id')})"


# -- benchmark reports (benchmarks/results/<mode>/) -------------------------------------------------------------------
def benchmark_results_root() -> "Path":
    """`$HYBRID_BENCHMARK_RESULTS`, else the repository's benchmarks/results/."""
    import os
    from pathlib import Path
    env = os.environ.get("HYBRID_BENCHMARK_RESULTS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def benchmark_reports(root) -> list:
    """Report folders under `root` (those holding a report.md): the two-workload robustness report (issue 16) and
    the two-track reports (full, medium) first, since they decide whether the hybrid earns its place, then the
    quick one, then the rest by name."""
    from pathlib import Path
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in sorted(root.iterdir()) if (p / "report.md").is_file()]
    order = {"robustness": 0, "full": 1, "medium": 2, "quick": 3}
    return sorted(found, key=lambda p: (order.get(p.name, len(order)), p.name))


# -- grouping runs (W&B-style bands over seeds / configs / sweeps) --------------------------------------------------
NO_GROUP = "(none)"
GROUP_SPECIAL = ("sweep", "tag", "kind", "preset")       # beside every cfg.<field>
GROUP_STATS = ("median", "mean")
GROUP_BANDS = ("min–max", "± std")
GROUP_GRID = 600       # points per group line (the x grid its runs are interpolated onto): enough for a
                       # smoothed curve, and it keeps a 10-group chart small to send on every live tick


def group_labels(runs: pd.DataFrame, by: str, kinds: dict[str, str] | None = None) -> dict[str, str]:
    """run_id -> the label of its group under `by`: "sweep" (its sweep:NAME tag), "tag" (its tags), "kind"
    (hybrid / baseline, from `kinds`), "preset", or a config field as "cfg.<name>". A run without the value gets
    "(no sweep)", "(no tag)", "(unset)"."""
    out: dict[str, str] = {}
    ids = runs.run_id.tolist()
    tags = runs.tags.tolist() if "tags" in runs else [[]] * len(ids)
    values = runs[by].tolist() if by in runs.columns else [None] * len(ids)
    name = by[4:] if by.startswith("cfg.") else by
    for run_id, run_tags, value in zip(ids, tags, values):
        if by == "sweep":
            names = [t.split(":", 1)[1] for t in (run_tags or []) if str(t).startswith("sweep:")]
            out[run_id] = names[0] if names else "(no sweep)"
        elif by == "tag":
            plain = sorted(t for t in (run_tags or []) if not str(t).startswith("sweep:"))
            out[run_id] = ", ".join(plain) if plain else "(no tag)"
        elif by == "kind":
            out[run_id] = (kinds or {}).get(run_id, "—")
        else:
            out[run_id] = "(unset)" if _missing(value) else f"{name} = {_short_number(value)}"
    return out


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _short_number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return str(value)
    return f"{float(value):.4g}"


GROUP_COLUMNS = ["group", "series", "x", "center", "low", "high", "n"]


def group_series(series, groups: dict[str, str], stat: str = "median", band: str = "min–max",
                 grid_points: int = GROUP_GRID, memo: dict | None = None) -> pd.DataFrame:
    """Per-run chart series (run, series, x, raw, smooth) -> one line per (group, series): columns group, series,
    x, center, low, high, n (runs with a value at that x); group and series are plain-object columns.

    `series` is one frame, or a list of frames that each hold one run's one series (run_series' results). With
    a list and a `memo` dict kept between calls (a live page's session), a group whose frames are the very same
    objects as last time is not recomputed, and when no group changed the previous result itself comes back —
    so a live tick redraws only the groups of the runs that moved (run_series returns the same object until
    its run has new rows).

    Each run's smoothed values are interpolated onto the group's x grid (the union of its runs' x, thinned to
    `grid_points` when longer), inside that run's own x range only — a run that stopped early does not pretend
    to go on. center is the median or mean over the runs; the band is their min–max or mean ± std."""
    if stat not in GROUP_STATS:
        raise ValueError(f"group statistic {stat!r} is invalid: it must be one of {', '.join(GROUP_STATS)}")
    if band not in GROUP_BANDS:
        raise ValueError(f"group band {band!r} is invalid: it must be one of {', '.join(GROUP_BANDS)}")
    # (group, series) -> [(source frame or None, x, y)], in the order the runs come.
    members: dict[tuple, list[tuple]] = {}
    if isinstance(series, pd.DataFrame):
        if series.empty:
            return pd.DataFrame(columns=GROUP_COLUMNS)
        x_all = series.x.to_numpy(dtype="float64")
        y_all = series.smooth.to_numpy(dtype="float64", na_value=np.nan)
        for (run, name), idx in series.groupby(["run", "series"], sort=False).indices.items():
            members.setdefault((groups.get(run, "(other)"), name), []).append((None, x_all[idx], y_all[idx]))
        memo = None
    else:
        for part in series:
            if part is None or part.empty:
                continue
            run, name = part["run"].array[0], part["series"].array[0]
            members.setdefault((groups.get(run, "(other)"), name), []).append((part, None, None))
    lines = []
    for (group, name), runs in members.items():
        key = (group, name, stat, band, grid_points)
        sources = tuple(source for source, _, _ in runs)
        hit = memo.get(key) if memo is not None else None
        if hit is not None and len(hit[0]) == len(sources) and all(a is b for a, b in zip(hit[0], sources)):
            lines.append(hit[1])
            continue
        arrays = [(x, y) if source is None else (source.x.to_numpy(dtype="float64"),
                                                 source.smooth.to_numpy(dtype="float64", na_value=np.nan))
                  for source, x, y in runs]
        line = _group_line(group, name, arrays, stat, band, grid_points)
        if memo is not None:
            memo[key] = (sources, line)     # holding the sources keeps their identity meaningful
        lines.append(line)
    if not lines:
        return pd.DataFrame(columns=GROUP_COLUMNS)
    if memo is not None:
        previous = memo.get("result")
        if previous is not None and len(previous[0]) == len(lines) and all(a is b for a, b in zip(previous[0], lines)):
            return previous[1]
    out = pd.concat(lines, ignore_index=True)
    if memo is not None:
        memo["result"] = (tuple(lines), out)
    return out


def _group_line(group: str, name: str, runs: list[tuple[np.ndarray, np.ndarray]], stat: str, band: str,
                grid_points: int) -> pd.DataFrame:
    """One group's line over its runs' (x, y) arrays (see group_series)."""
    xs = np.unique(np.concatenate([x for x, _ in runs]))
    if len(xs) > grid_points:
        xs = np.unique(np.round(np.linspace(xs[0], xs[-1], grid_points), 6))
    matrix = np.full((len(runs), len(xs)), np.nan)
    for row, (rx, ry) in enumerate(runs):
        if len(rx) > 1 and np.any(rx[1:] < rx[:-1]):
            order = np.argsort(rx, kind="stable")
            rx, ry = rx[order], ry[order]
        ok = np.isfinite(ry)
        rx, ry = rx[ok], ry[ok]
        if len(rx):
            inside = (xs >= rx[0]) & (xs <= rx[-1])
            matrix[row, inside] = np.interp(xs[inside], rx, ry)
    n = np.isfinite(matrix).sum(axis=0)
    keep = n > 0
    matrix, xs, n = matrix[:, keep], xs[keep], n[keep]
    # Runs of one length (the usual case) have no gaps: numpy's plain reductions, several times faster than the
    # NaN-aware ones, give the same numbers.
    full = bool((n == len(runs)).all())
    median, mean, std, low_of, high_of = ((np.median, np.mean, np.std, np.min, np.max) if full else
                                          (np.nanmedian, np.nanmean, np.nanstd, np.nanmin, np.nanmax))
    with np.errstate(all="ignore"):
        center = median(matrix, axis=0) if stat == "median" else mean(matrix, axis=0)
        if band == "min–max":
            low, high = low_of(matrix, axis=0), high_of(matrix, axis=0)
        else:
            spread, average = std(matrix, axis=0), mean(matrix, axis=0)
            low, high = average - spread, average + spread
    size = len(xs)
    return pd.DataFrame({"group": pd.Series(np.full(size, group, dtype=object), dtype=object),
                         "series": pd.Series(np.full(size, name, dtype=object), dtype=object),
                         "x": xs, "center": center, "low": low, "high": high, "n": n})


def group_table(table: pd.DataFrame, groups: dict[str, str], numeric: list[str], stat: str = "median") -> pd.DataFrame:
    """The run table with groups as rows: `runs` (count) and the median (or mean) of each numeric column over the
    group's runs, plus its spread (min–max) for the first one. `table` needs a `run id` column."""
    frame = table.assign(group=table["run id"].map(groups))
    agg = frame.groupby("group", sort=True)
    out = pd.DataFrame({"runs": agg.size()})
    for col in numeric:
        if col not in frame:
            continue
        values = pd.to_numeric(frame[col], errors="coerce")
        grouped = values.groupby(frame.group)
        out[col] = grouped.median() if stat == "median" else grouped.mean()
    return out.reset_index()


# -- run-table query (pandas DataFrame.query) -------------------------------------------------------------------------
class QueryError(ValueError):
    """A run-table query that does not parse or names an unknown column (one line for the user)."""


def query_frame(runs: pd.DataFrame, kinds: dict[str, str] | None = None) -> pd.DataFrame:
    """The run list with the names a query uses: config fields and results by their own names (val_loss,
    base_learning_rate, trust_region_mode), plus name, status, step, preset, kind, tags (text) and run_id. A
    result that shares a config field's name is `final_<name>`."""
    out = pd.DataFrame({"run_id": runs.run_id.to_numpy(), "name": runs.name.fillna(runs.run_id).to_numpy(),
                        "status": runs.status.to_numpy()}, index=runs.index)
    for col in ("step", "preset"):
        if col in runs:
            out[col] = runs[col].to_numpy()
    out["kind"] = runs.run_id.map(kinds or {}).fillna("—").to_numpy()
    out["tags"] = runs.tags.apply(lambda t: ", ".join(t or [])).to_numpy() if "tags" in runs else ""
    for col in runs.columns:
        if col.startswith("cfg."):
            out[col[4:]] = runs[col].to_numpy()
    for col in runs.columns:
        if col.startswith("final."):
            key = col[6:]
            name = key if key not in out.columns else f"final_{key}"
            out[name] = pd.to_numeric(runs[col], errors="coerce").to_numpy() if runs[col].map(
                lambda v: v is None or isinstance(v, (int, float))).all() else runs[col].to_numpy()
    return out


_SINGLE_EQUALS = __import__("re").compile(r"(?<![<>=!])=(?!=)")
# What a query may hold: column names, numbers, text, comparisons, and / or / not, + - * /. pandas' python engine
# also evaluates attribute access and method calls (`a.__class__.__mro__[-1].__subclasses__()…` reaches any loaded
# module's functions), and a query also arrives in a link (?q=): anything else is refused before pandas sees it.
_QUERY_NODES = tuple(getattr(__import__("ast"), name) for name in (
    "Expression", "BoolOp", "And", "Or", "UnaryOp", "Not", "USub", "UAdd", "Compare", "Eq", "NotEq", "Lt", "LtE",
    "Gt", "GtE", "In", "NotIn", "BinOp", "Add", "Sub", "Mult", "Div", "Name", "Constant", "List", "Tuple", "Load"))


def _query_problem(expression: str) -> str | None:
    """Why `expression` is not a plain query (None when it is)."""
    import ast
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        return exc.msg or "invalid syntax"
    for node in ast.walk(tree):
        if not isinstance(node, _QUERY_NODES):
            return (f"{type(node).__name__.lower()} is not allowed: a query compares columns with numbers or text "
                    "(no attributes, calls or indexing)")
    return None


def query_runs(frame: pd.DataFrame, text: str) -> pd.Series:
    """Boolean mask over `frame` (query_frame's) for a pandas query such as
    `val_loss < 4.1 and trust_region_mode == "relative"`. A single `=` is read as `==`. Raises QueryError with
    one line naming the problem and what is allowed."""
    text = (text or "").strip()
    if not text:
        return pd.Series(True, index=frame.index)
    expression = _SINGLE_EQUALS.sub("==", text)
    shown = text if len(text) <= 200 else f"{text[:200]}… ({len(text):,} characters)"   # a 100 kB link: one line
    problem = _query_problem(expression)
    if problem:
        raise QueryError(f"query {shown!r} is invalid ({problem}); write e.g. val_loss < 4.1 and "
                         "trust_region_mode == \"relative\" (text in quotes; and / or / not)")
    try:
        result = frame.query(expression, engine="python", local_dict={}, global_dict={})
    except pd.errors.UndefinedVariableError as exc:
        name = str(exc).split("'")[1] if "'" in str(exc) else str(exc)
        raise QueryError(f"query {shown!r} is invalid: no column {name[:80]!r}; columns are the run's config fields "
                         "and results, e.g. val_loss, base_learning_rate, trust_region_mode, kind, status, "
                         "name, tags") from None
    except Exception as exc:          # a syntax error, a type mismatch ("abc" < 3), ...: one line, no traceback
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise QueryError(f"query {shown!r} is invalid ({detail}); write e.g. val_loss < 4.1 and "
                         "trust_region_mode == \"relative\" (text in quotes; and / or / not)") from None
    return frame.index.isin(result.index)


# -- one number format (headline.VALUE_LABELS) as a table column format -----------------------------------------------
def column_format(fmt: str) -> tuple[float, str]:
    """A headline format ("{:.4f}", "{:+.4f}", "{:.1%}", "{:,.0f}", "{:.2f}×", "{:.4g}") -> (scale, printf format) for a
    sortable numeric table column that reads exactly as Summary prints the number. "{:,.0f}" is (1, "localized")
    after rounding: the browser adds the thousands separators, and no decimals show ("294", not "294.137")."""
    import re
    match = re.fullmatch(r"\{:(\+?)(,?)\.(\d+)([fg%])\}(.*)", fmt or "")
    if not match:
        return 1.0, "%.4g"
    sign, comma, digits, kind, suffix = match.groups()      # sign: "{:+.4f}" (a gap) keeps its + as "%+.4f"
    suffix = suffix.replace("%", "%%")
    if kind == "%":
        return 100.0, f"%{sign}.{digits}f%%{suffix}"
    if comma:
        return 1.0, "localized" if digits == "0" and not suffix and not sign else f"%{sign}.{digits}f{suffix}"
    return 1.0, f"%{sign}.{digits}{kind}{suffix}"


def display_text(value) -> str:
    """A config or diff cell as text: empty for a missing value (never "None" / "nan"), numbers short."""
    if _missing(value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)
