"""The npe2 manifest: valid, and offering a sample for every motion model and every task of the table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import napari_nir
from napari_nir import _sample_data
from napari_nir.core.motions import MOTIONS

MANIFEST = Path(napari_nir.__file__).with_name("napari.yaml")


def test_manifest_is_valid_and_imports():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManifest.from_file(MANIFEST)
    pm.validate_imports()


def test_a_sample_for_every_motion_and_task():
    manifest = yaml.safe_load(MANIFEST.read_text())
    keys = {s["key"] for s in manifest["contributions"]["sample_data"]}
    wanted = {m.sample for m in MOTIONS.values()} | {f"{t}_burst" for t in napari_nir.TASKS}
    assert all(m.sample for m in MOTIONS.values())
    assert wanted <= keys


@pytest.mark.parametrize("maker", ["make_rain_sample", "make_occlusion_sample"])
def test_sample_layers_are_valid_layer_data(maker):
    layers = getattr(_sample_data, maker)()
    data, kwargs, kind = layers[0]
    assert kind == "image" and kwargs["rgb"] is True and data.ndim == 4 and data.shape[-1] == 3
    assert all(not kw.get("visible", True) for _, kw, _ in layers[1:])  # ground truth hidden by default
    assert all(np.isfinite(d).all() for d, _, _ in layers)
