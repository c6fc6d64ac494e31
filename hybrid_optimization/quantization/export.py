"""Export a quantized model to one safetensors file with packed codes, and load it back exactly.

File layout (safetensors, so it is memory-mappable and readable by any safetensors tool):
  "<layer>.weight.qcodes"  uint8   packed codes of each quantized Linear (packing.py)
  "<layer>.weight.qscale"  float16 its scales (quantizers round scales to fp16, so this is lossless)
  every other state_dict entry (embeddings, norms, biases, the full-precision head) in its own dtype
  header metadata "hybrid_optimization": JSON with the format version, the bit map of all Linear layers, the
  settings of each QuantLinear, tied-weight aliases, a CRC-32 of every tensor, and the caller's metadata; and
  "header_crc32", a CRC-32 of the rest of the header (canonical JSON), so an edited setting (say `act_bits`) is
  refused on load instead of silently changing the logits. Version-1 files (no header checksum) still load.

`load_quantized(path, model)` converts a freshly built model of the same architecture with the stored bit map,
loads the dequantized weights and pins each layer's stored scale (QuantLinear.fixed_scale), so the loaded model's
outputs equal the exported model's outputs bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from hybrid_optimization.quantization.convert import linear_layers, quantize_model
from hybrid_optimization.quantization.packing import pack_codes, packed_size, unpack_codes
from hybrid_optimization.quantization.qlinear import QuantLinear
from hybrid_optimization.quantization.quantizers import FULL_PRECISION, QuantizedTensor, normalize_bits, scale_shape

FORMAT_NAME = "hybrid-optimization-quantized"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)       # 1: before the header checksum
METADATA_KEY = "hybrid_optimization"
CODES_SUFFIX = ".qcodes"
SCALE_SUFFIX = ".qscale"


class QuantizedExportError(ValueError):
    """An export file is missing, corrupt, of another format, or does not match the model."""


@dataclass
class ExportReport:
    path: str
    file_bytes: int
    n_params_total: int                  # all parameters of the model (tied ones once)
    n_params_linear: int                 # weights of the quantized Linear layers
    linear_bits_per_weight: float        # (packed codes + scales) * 8 / n_params_linear; NaN without any
    file_bits_per_weight: float          # file_bytes * 8 / n_params_total
    fp32_bytes: int                      # 4 * n_params_total
    fp16_bytes: int
    compression_vs_fp32_linear: float    # 32 / linear_bits_per_weight
    compression_vs_fp32_file: float      # fp32_bytes / file_bytes
    layers: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def export_quantized(model: nn.Module, path, metadata: dict | None = None) -> ExportReport:
    user_metadata = {} if metadata is None else metadata
    try:
        json.dumps(user_metadata)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"export metadata must be JSON-serialisable (plain dicts, lists, str, numbers): {exc}") \
            from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    linears = linear_layers(model)
    qlayers = {name: m for name, m in linears.items() if isinstance(m, QuantLinear)}
    packed_names = [name for name, m in qlayers.items() if m.is_quantized]
    state = model.state_dict()
    _refuse_tied_quantized_weights(state, packed_names)

    tensors: dict[str, torch.Tensor] = {}
    layer_settings: dict[str, dict] = {}
    report_layers: list[dict] = []
    for name, layer in qlayers.items():
        layer_settings[name] = {"bits": layer.bits, "group_size": layer.group_size, "act_bits": layer.act_bits,
                                "scale_factor": layer.scale_factor, "shape": list(layer.weight.shape),
                                "dtype": str(layer.weight.dtype).removeprefix("torch."), "packed": layer.is_quantized}
        if not layer.is_quantized:
            continue
        q = layer.quantized_weight()
        tensors[name + ".weight" + CODES_SUFFIX] = torch.from_numpy(pack_codes(q.codes, q.bits))
        tensors[name + ".weight" + SCALE_SUFFIX] = q.scale.to(torch.float16).cpu().contiguous()

    # Everything else as it is; a tensor that appears under several keys (tied weights) is stored once.
    skip = {name + ".weight" for name in packed_names}
    aliases: dict[str, str] = {}
    first_key_of: dict[tuple, str] = {}
    for key, tensor in state.items():
        if key in skip:
            continue
        identity = _storage_identity(tensor)
        if identity in first_key_of:
            aliases[key] = first_key_of[identity]
            continue
        first_key_of[identity] = key
        tensors[key] = tensor.detach().cpu().contiguous().clone()

    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "bit_map": {name: (m.bits if isinstance(m, QuantLinear) else FULL_PRECISION) for name, m in linears.items()},
        "layers": layer_settings, "aliases": aliases,
        "checksums": {key: _crc32(t) for key, t in tensors.items()},
        "user": user_metadata,
    }
    header["header_crc32"] = _header_crc32(header)
    # A temporary name, then a rename: an interrupted export never leaves a half-written file under `path`.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header)})
        umask = os.umask(0o022)                 # (reading the umask means setting it)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)           # safetensors creates files 0600: the ordinary mode, like every export
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

    # -- the report ---------------------------------------------------------------------------------------------------
    n_params_total = sum(p.numel() for p in model.parameters())
    n_params_linear = linear_bytes = 0
    for name, m in linears.items():
        n = m.weight.numel()
        if name in packed_names:
            codes, scales = tensors[name + ".weight" + CODES_SUFFIX], tensors[name + ".weight" + SCALE_SUFFIX]
            stored = codes.numel() + scales.numel() * scales.element_size()
            n_params_linear += n
            linear_bytes += stored
            bits = m.bits
        else:
            stored = n * m.weight.element_size()
            bits = FULL_PRECISION
        report_layers.append({"name": name, "bits": bits, "shape": list(m.weight.shape), "n_params": n,
                              "stored_bytes": stored, "bits_per_weight": stored * 8 / n if n else math.nan})
    file_bytes = os.path.getsize(path)
    linear_bpw = linear_bytes * 8 / n_params_linear if n_params_linear else math.nan
    return ExportReport(
        path=str(path), file_bytes=file_bytes, n_params_total=n_params_total, n_params_linear=n_params_linear,
        linear_bits_per_weight=linear_bpw, file_bits_per_weight=file_bytes * 8 / max(n_params_total, 1),
        fp32_bytes=4 * n_params_total, fp16_bytes=2 * n_params_total,
        compression_vs_fp32_linear=32 / linear_bpw if n_params_linear else math.nan,
        compression_vs_fp32_file=4 * n_params_total / file_bytes, layers=report_layers)


def read_export(path) -> tuple[dict[str, torch.Tensor], dict[str, float], dict]:
    """(state_dict with dequantized Linear weights, bit map {layer: bits}, the caller's metadata)."""
    state, header, _ = _read(path)
    return state, dict(header["bit_map"]), header["user"]


def load_quantized(path, model: nn.Module | None = None) -> tuple[nn.Module | None, dict]:
    """Read an export; with `model` (same architecture), convert and load it so its outputs match exactly."""
    state, header, scales = _read(path)
    if model is None:
        return None, header["user"]
    linears = linear_layers(model)
    missing = [name for name in header["bit_map"] if name not in linears]
    if missing:
        raise QuantizedExportError(f"the model does not match the export {path}: it has no Linear layer(s) "
                                   f"{', '.join(missing[:8])} (the export was made from another architecture)")
    quantize_model(model, header["bit_map"])
    layers = linear_layers(model)
    for name, settings in header["layers"].items():
        layer = layers[name]
        if not isinstance(layer, QuantLinear):   # exported as a full-precision QuantLinear: recreate it
            layer = _convert_passthrough(model, name, layer)
        try:
            layer.group_size = settings["group_size"]
            layer.act_bits = settings["act_bits"]
            layer.scale_factor = settings["scale_factor"]
        except ValueError as exc:
            raise QuantizedExportError(f"layer '{name}' of the model does not match the export {path}: {exc}") \
                from None
    _check_state_matches(model, state, path)
    model.load_state_dict(state, strict=True)
    for name, scale in scales.items():
        layers[name].fixed_scale = scale.to(layers[name].weight.device)
    return model, header["user"]


# -- reading and checking ---------------------------------------------------------------------------------------------
def _read(path):
    path = Path(path)
    if not path.is_file():
        raise QuantizedExportError(f"no quantized export at {path}: the file does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            file_metadata = handle.metadata() or {}
            raw = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:   # safetensors raises its own error types for a bad header or a truncated file
        raise QuantizedExportError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") \
            from None
    if METADATA_KEY not in file_metadata:
        raise QuantizedExportError(f"{path} is a safetensors file but not a quantized export: its header has no "
                                   f"'{METADATA_KEY}' metadata (write it with export_quantized)")
    try:
        header = json.loads(file_metadata[METADATA_KEY])
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"format {header.get('format')!r}")
        for key in ("bit_map", "layers", "aliases", "checksums", "user"):
            header[key]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise QuantizedExportError(f"{path} has an invalid '{METADATA_KEY}' header ({exc})") from None
    if header.get("version") not in READABLE_VERSIONS:
        raise QuantizedExportError(f"{path} has export format version {header.get('version')!r}; this code reads "
                                   f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    if header["version"] >= 2 and header.get("header_crc32") != _header_crc32(header):
        raise QuantizedExportError(f"{path} is corrupt: its '{METADATA_KEY}' header does not match its checksum "
                                   "(the header was edited or damaged); export the model again")

    expected, present = set(header["checksums"]), set(raw)
    if expected != present:
        raise QuantizedExportError(f"{path} is corrupt: tensors missing {sorted(expected - present)[:5]}, "
                                   f"unexpected {sorted(present - expected)[:5]}")
    bad = [key for key, crc in header["checksums"].items() if _crc32(raw[key]) != crc]
    if bad:
        raise QuantizedExportError(f"{path} is corrupt: checksum mismatch in {len(bad)} tensor(s) "
                                   f"({', '.join(bad[:5])})")

    state = {key: t for key, t in raw.items() if not key.endswith((CODES_SUFFIX, SCALE_SUFFIX))}
    scales: dict[str, torch.Tensor] = {}
    for name, settings in header["layers"].items():
        if not settings.get("packed"):
            continue
        try:
            q = _quantized_tensor(raw, name, settings)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QuantizedExportError(f"{path}: layer '{name}' cannot be unpacked: {exc}") from None
        state[name + ".weight"] = q.dequantize()
        scales[name] = q.scale
    for alias, target in header["aliases"].items():
        if target not in state:
            raise QuantizedExportError(f"{path} is corrupt: '{alias}' is stored as an alias of missing '{target}'")
        state[alias] = state[target]
    return state, header, scales


def _quantized_tensor(raw: dict, name: str, settings: dict) -> QuantizedTensor:
    bits = normalize_bits(settings["bits"])
    shape = tuple(int(d) for d in settings["shape"])
    group_size = settings["group_size"]
    numel = math.prod(shape)
    packed = raw[name + ".weight" + CODES_SUFFIX]
    scale = raw[name + ".weight" + SCALE_SUFFIX]
    if packed.numel() != packed_size(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes, but {numel} {bits:g}-bit codes need "
                         f"{packed_size(numel, bits)}")
    expected_scale = scale_shape(shape, bits, group_size)
    if tuple(scale.shape) != expected_scale:
        raise ValueError(f"scale shape {tuple(scale.shape)}, expected {expected_scale}")
    codes = unpack_codes(packed.numpy(), bits, numel)
    dtype = getattr(torch, settings["dtype"])
    return QuantizedTensor(codes=torch.from_numpy(codes).reshape(shape), scale=scale.to(torch.float32), bits=bits,
                           group_size=group_size, shape=shape, dtype=dtype)


def _check_state_matches(model: nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """One readable error (a few examples of each problem) instead of load_state_dict's list of every tensor."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: export {list(state[k].shape)} vs model {list(t.shape)}"
                  for k, t in expected.items() if k in state and state[k].shape != t.shape]
    problems = []
    for label, items in (("shape mismatch", mismatched), ("missing from the export", missing),
                         ("in the export but not in the model", unexpected)):
        if items:
            problems.append(f"{len(items)} {label} ({'; '.join(items[:3])}{'; …' if len(items) > 3 else ''})")
    if problems:
        raise QuantizedExportError(f"the model does not match the export {path}: " + ", ".join(problems) +
                                   "; build the model with the architecture the export was made from")


def _convert_passthrough(model: nn.Module, name: str, linear: nn.Linear) -> QuantLinear:
    layer = QuantLinear.from_linear(linear, FULL_PRECISION)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return layer


def _refuse_tied_quantized_weights(state: dict[str, torch.Tensor], packed_names: list[str]) -> None:
    packed_keys = {name + ".weight" for name in packed_names}
    owners: dict[tuple, list[str]] = {}
    for key, tensor in state.items():
        owners.setdefault(_storage_identity(tensor), []).append(key)
    for keys in owners.values():
        if len(keys) > 1 and any(k in packed_keys for k in keys) and not all(k in packed_keys for k in keys):
            raise ValueError(f"tied weights {', '.join(keys)} are quantized in one place and full precision in "
                             "another; keep the tied layer (usually the head) at full precision or untie them")


def _storage_identity(tensor: torch.Tensor) -> tuple:
    if tensor.numel() == 0:   # empty tensors may all report data_ptr 0: never treat them as tied
        return ("empty", id(tensor))
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def _header_crc32(header: dict) -> int:
    body = {k: v for k, v in header.items() if k != "header_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _crc32(tensor: torch.Tensor) -> int:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(np.ascontiguousarray(data))
