"""napari writer: an image layer (a result or a burst) to TIFF, with its napari-nir provenance.

Thin: ``napari_nir.io.write_tiff`` (atomic, JSON provenance in the TIFF description).
"""
from __future__ import annotations

import numpy as np


def write_image(path: str, data, meta: dict) -> list[str]:
    """npe2 single-layer writer: ``data`` (any shape napari holds) to ``path`` (.tif/.tiff); returns [path].

    The layer's ``metadata["napari_nir"]`` (provenance) is stored in the file and read back by the reader.
    napari has already asked before replacing a file, so this overwrites.
    """
    from .io import write_tiff

    provenance = (meta.get("metadata") or {}).get("napari_nir", {})
    record = {**provenance, "layer_name": meta.get("name")} if isinstance(provenance, dict) else {}
    array = np.asarray(data)
    write_tiff(path, array, record, overwrite=True, channels=bool(meta.get("rgb")))
    return [path]
