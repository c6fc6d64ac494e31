"""The Summary page's "Model exports" panel: the run's student as packed safetensors, GGUF (llama.cpp) and a
Hugging Face folder (zipped for download), each made on demand from the packed student (`--export`)."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import streamlit as st

from hybrid_optimization.distill.export import ExportError
from hybrid_optimization.distill.run_export import EXPORT_FORMATS, EXPORT_NAMES, export_packed_student

LABELS = {"packed": "Packed safetensors (this project's loader)", "gguf": "GGUF for llama.cpp (ternary TQ1_0)",
          "hf": "Hugging Face LlamaForCausalLM folder (zip)"}


def zipped(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, Path(folder.name) / file.relative_to(folder))
    return buffer.getvalue()


def show(run: dict) -> None:
    st.subheader("Model exports")
    run_dir = Path(run["run_dir"])
    packed = Path((run.get("artifacts") or {}).get("export") or run_dir / EXPORT_NAMES["packed"])
    if run.get("status") != "finished" or not packed.is_file():
        st.caption("No trained student to export: a finished run trained with the packed export has one "
                   "(`python distillation.py --resume RUN_ID --export`).")
        return
    for fmt in EXPORT_FORMATS:
        target = packed if fmt == "packed" else packed.with_name(EXPORT_NAMES[fmt])
        col1, col2 = st.columns([3, 1])
        if target.exists():
            size = sum(f.stat().st_size for f in target.rglob("*")) if target.is_dir() else target.stat().st_size
            col1.markdown(f"**{LABELS[fmt]}** — `{target.name}` ({size / 2**20:.2f} MiB)")
            name = target.name + (".zip" if target.is_dir() else "")
            data = (lambda t=target: zipped(t)) if target.is_dir() else (lambda t=target: t.read_bytes())
            col2.download_button("Download", data=data, file_name=name, key=f"export_download.{fmt}",
                                 icon=":material/download:")
        else:
            col1.markdown(f"**{LABELS[fmt]}** — not made yet")
            if col2.button("Export", key=f"export_make.{fmt}", icon=":material/file_export:"):
                try:
                    with st.spinner(f"Writing {EXPORT_NAMES[fmt]}…"):
                        result = export_packed_student(packed, fmt)
                    st.session_state["export_message"] = result.line
                except ExportError as exc:
                    st.session_state["export_message"] = f"error: {exc}"
                st.rerun()
    message = st.session_state.pop("export_message", None)
    if message:
        (st.error if message.startswith("error:") else st.success)(message)
