"""Export the trained student as a packed quantized file plus a JSON manifest, and load it back.

`<run_dir>/student.safetensors` is written by the core's `export_quantized` (ternary codes 5 per byte, fp16 scales,
embeddings / norms / head as they are); its metadata carries what is needed to rebuild the student (its config and
the reduced vocabulary → tokenizer id map). `<run_dir>/student.json` is the human-readable manifest: the same plus
the measured sizes and compression. `load_exported_student` rebuilds a StudentLM whose logits equal the exported
quantized student's exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..quantization import ExportReport, export_quantized, load_quantized
from .student import StudentConfig, StudentLM

MANIFEST_FORMAT = "hybrid-distill-student"


def export_student(student: StudentLM, path: str | Path, vocab: torch.Tensor, extra: dict | None = None
                   ) -> tuple[ExportReport, Path]:
    """Write the packed student and its manifest; returns (report, manifest path)."""
    path = Path(path)
    metadata = {"format": MANIFEST_FORMAT, "student": student.config.to_dict(), "vocab": vocab.tolist(),
                **(extra or {})}
    report = export_quantized(student, path, metadata=metadata)
    manifest = {**metadata, "vocab_size": int(vocab.numel()), "file": path.name,
                "bit_map": {layer["name"]: layer["bits"] for layer in report.layers},
                "report": {k: v for k, v in report.to_dict().items() if k != "layers"}, "layers": report.layers}
    manifest.pop("vocab")
    manifest_path = path.with_suffix(".json")
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str))
    return report, manifest_path


def load_exported_student(path: str | Path) -> tuple[StudentLM, dict]:
    """A StudentLM rebuilt from an export (its outputs equal the exported model's), and the export's metadata."""
    _, metadata = load_quantized(path)
    if metadata.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is a quantized export but not a distilled student (no student config inside)")
    model = StudentLM(StudentConfig.from_dict(metadata["student"]))
    model, metadata = load_quantized(path, model)
    return model.eval(), metadata
