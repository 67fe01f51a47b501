"""napari writer: an image layer (a result or a burst) to TIFF, with its napari-nir provenance.

Thin: ``napari_nir.io.write_tiff`` (atomic, JSON provenance in the TIFF description).
"""
from __future__ import annotations

import numpy as np


def _output_role(record: dict) -> str | None:
    """The artefact role recorded in a provenance record: a layer's ``{"output": {"role": ...}}`` or a CLI
    TIFF's ``{"output": role}``."""
    output = record.get("output")
    if isinstance(output, dict):
        output = output.get("role")
    return output if isinstance(output, str) else None


def write_image(path: str, data, meta: dict) -> list[str]:
    """npe2 single-layer writer: ``data`` (any shape napari holds) to ``path`` (.tif/.tiff); returns [path].

    The layer's ``metadata["napari_nir"]`` (provenance) is stored in the file and read back by the reader. For
    a result layer (its provenance names an output role of ``core.result.ARTEFACTS``) the record also gets that
    artefact's ``convention``, and the last axis is stored as channels only where the artefact has a channel
    axis ("[C]") and the layer shows it as colour. napari has already asked before replacing a file, so this
    overwrites.
    """
    from .io import write_tiff

    provenance = (meta.get("metadata") or {}).get("napari_nir", {})
    record = {**provenance, "layer_name": meta.get("name")} if isinstance(provenance, dict) else {}
    channels = bool(meta.get("rgb"))
    role = _output_role(record)
    if role is not None:
        from .core.result import ARTEFACTS

        spec = ARTEFACTS.get(role)
        if spec is not None:
            record["convention"] = spec.description
            channels = channels and spec.axes.endswith("[C]")
    array = np.asarray(data)
    write_tiff(path, array, record, overwrite=True, channels=channels)
    return [path]
