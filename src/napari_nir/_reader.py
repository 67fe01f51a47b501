"""napari reader: a folder of frames (PNG/JPEG/TIFF) or a napari-nir TIFF opens as one burst layer.

Thin: all reading is ``napari_nir.io.read_burst`` / ``read_tiff``.
"""
from __future__ import annotations

import os
from pathlib import Path

FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def get_reader(path):
    """npe2 reader contribution: a callable for a folder holding image frames or a single TIFF, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(os.fspath(path))
    if p.is_dir():
        if not any(f.suffix.lower() in FRAME_SUFFIXES for f in p.iterdir() if not f.name.startswith(".")):
            return None
        return read_layers
    if p.suffix.lower() in {".tif", ".tiff"}:
        return read_layers
    return None


def read_layers(path):
    """[(data, kwargs, "image")]: the burst (T, H, W[, C]); metadata["napari_nir"] holds a TIFF's provenance."""
    from .io import read_burst, read_tiff

    if isinstance(path, list):
        path = path[0]
    p = Path(os.fspath(path))
    metadata = {}
    if p.is_dir():
        data = read_burst(p)
    else:
        data, metadata = read_tiff(p)
    rgb = data.ndim == 4 and data.shape[-1] in (3, 4)
    kwargs = {"name": p.stem if p.is_file() else p.name, "rgb": rgb}
    if metadata:
        kwargs["metadata"] = {"napari_nir": metadata}
    return [(data, kwargs, "image")]
