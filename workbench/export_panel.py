"""The Summary page's "Model exports" panel: the run's student as packed safetensors, GGUF (llama.cpp) and a
Hugging Face folder (zipped for download), each made on demand from the packed student (`--export`)."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import streamlit as st

from hybrid_optimization.distill.export import ExportError
from hybrid_optimization.schema import EXPORT_LABELS
from hybrid_optimization.distill.run_export import EXPORT_FORMATS, EXPORT_NAMES, export_packed_student
from workbench import ui

LABELS = EXPORT_LABELS       # one definition of the export names (hybrid_optimization/schema.py)


@st.cache_data(max_entries=8, show_spinner=False)
def _read(path_text: str, stamp: tuple) -> bytes:
    """The file's bytes, or the folder zipped; `stamp` (sizes and mtimes) makes a changed file a new entry."""
    path = Path(path_text)
    return zipped(path) if path.is_dir() else path.read_bytes()


def file_bytes(path: Path) -> bytes:
    """What a download button hands over, built BEFORE the button renders. A deferred `data=callable` is dropped
    when the script reruns, so a click within about a second of a rerun delivered nothing (MediaFileStorageError:
    Deferred file ... not found). Bytes get a content-addressed id that the rerun registers again, so the link a
    browser already holds stays valid; the cache keeps reruns from re-reading or re-zipping an unchanged file."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _read(str(path), stamp)


def download(where, path: Path, key: str, file_name: str | None = None) -> None:
    """A Download button for a file or folder (zipped) that always delivers: the bytes exist when it renders, and
    clicking it does not rerun the page (on_click="ignore"), so the charts and forms around it stay as they are."""
    where.download_button("Download", data=file_bytes(path), file_name=file_name or path.name, key=key,
                          icon=":material/download:", on_click="ignore")


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
            col1.markdown(f"**{LABELS[fmt]}** — {ui.plain(target.name)} ({size / 2**20:.2f} MiB)")
            download(col2, target, key=f"export_download.{fmt}",
                     file_name=target.name + (".zip" if target.is_dir() else ""))
        else:
            col1.markdown(f"**{LABELS[fmt]}** — not made yet")
            if col2.button("Export", key=f"export_make.{fmt}", icon=":material/file_export:"):
                try:
                    with st.spinner(f"Writing {EXPORT_NAMES[fmt]}…"):
                        result = export_packed_student(packed, fmt)
                    st.session_state["export_message"] = ui.plain(result.line)
                except ExportError as exc:
                    st.session_state["export_message"] = f"error: {ui.plain(exc)}"
                st.rerun()
    message = st.session_state.pop("export_message", None)
    if message:
        (st.error if message.startswith("error:") else st.success)(message)
