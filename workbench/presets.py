"""Saved form presets: JSON files under <runs_root>/presets/, {"config": {...}, "options": {...}}.

A preset is checked on save and on load by the same rules as a launch (the core's config validation, the
launcher's option checks), so a preset that loads is one that can launch (data files may have moved since).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from hybrid_optimization.config import ConfigError, HybridTrainingConfig
from workbench.launcher import LaunchError, check_form

PRESETS_DIR = "presets"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
MAX_PRESET_BYTES = 256 * 1024


class PresetError(ValueError):
    """A preset name or file is invalid; the message says which and why."""


def presets_dir(runs_root: Path) -> Path:
    return Path(runs_root) / PRESETS_DIR


def _path(runs_root: Path, name: str) -> Path:
    if not NAME_PATTERN.match(name or ""):
        raise PresetError(f"preset name {name!r} is invalid: use 1–64 letters, digits, spaces, '.', '_' or '-', "
                          "starting with a letter or digit")
    return presets_dir(runs_root) / f"{name}.json"


def list_presets(runs_root: Path) -> list[str]:
    folder = presets_dir(runs_root)
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def save_preset(runs_root: Path, name: str, config: dict, options: dict) -> Path:
    path = _path(runs_root, name)
    HybridTrainingConfig.from_dict(config)       # raises ConfigError with the core's message
    check_form(options)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps({"config": config, "options": options}, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def load_preset(runs_root: Path, name: str) -> tuple[dict, dict]:
    """(config fields, launch options) of a saved preset, validated."""
    path = _path(runs_root, name)
    if not path.is_file():
        raise PresetError(f"no preset named {name!r} in {path.parent}")
    if path.stat().st_size > MAX_PRESET_BYTES:
        raise PresetError(f"preset file {path} is larger than {MAX_PRESET_BYTES // 1024} KB; it is not a preset")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PresetError(f"preset file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise PresetError(f'preset file {path} must be a JSON object with a "config" object (and "options")')
    options = data.get("options") or {}
    try:
        config = HybridTrainingConfig.from_dict(data["config"]).to_dict()
        check_form(options)
    except (ConfigError, LaunchError, TypeError) as exc:
        raise PresetError(f"preset {name!r} is invalid: {exc}") from None
    return config, options


def delete_preset(runs_root: Path, name: str) -> None:
    path = _path(runs_root, name)
    if path.is_file():
        path.unlink()
