"""napari reader: napari-nir's own TIFFs (``*.nir.tif``), opened with their provenance.

It claims nothing napari's own reader claims on its own, so that no "Choose reader" dialog stands between a user
and a PNG, a CSV, a plain TIFF or a folder: napari reads those itself (a multi-page TIFF or a folder of frames as
one stack, a colour TIFF as colour). Files named ``*.nir.tif`` (what the writer suggests for a result layer) are
read here, keeping ``metadata["napari_nir"]`` (the provenance); napari's reader also matches them (``*.tif``), so
napari asks once which to use and can remember the choice. From Python, ``napari_nir.io.read_tiff`` and
``read_burst`` read any TIFF or folder with its provenance.

Thin: all reading is ``napari_nir.io.read_tiff``.
"""
from __future__ import annotations

import os
from pathlib import Path

OWN_SUFFIXES = (".nir.tif", ".nir.tiff")


def get_reader(path):
    """npe2 reader contribution: a callable for one ``*.nir.tif`` / ``*.nir.tiff`` file, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(os.fspath(path))
    if p.is_file() and p.name.lower().endswith(OWN_SUFFIXES):
        return read_layers
    return None


def read_layers(path):
    """[(data, kwargs, "image")]: the array as stored, colour when its last axis has 3 or 4 samples (an RGB(A)
    image or a stack of them, as napari reads colour); metadata["napari_nir"] holds the file's provenance."""
    from .io import read_tiff

    if isinstance(path, list):
        path = path[0]
    p = Path(os.fspath(path))
    data, metadata = read_tiff(p)
    rgb = data.ndim in (3, 4) and data.shape[-1] in (3, 4)
    name = p.name[: -len(next(s for s in OWN_SUFFIXES if p.name.lower().endswith(s)))] \
        if p.name.lower().endswith(OWN_SUFFIXES) else p.stem
    kwargs = {"name": name, "rgb": rgb}
    if metadata:
        kwargs["metadata"] = {"napari_nir": metadata}
    return [(data, kwargs, "image")]
