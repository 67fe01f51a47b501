"""Rendering: chunking does not change results; canonical grids."""
from __future__ import annotations

import numpy as np

from napari_nir.core import render


def test_chunked_rendering_matches_one_pass(small_fit, monkeypatch):
    whole = small_fit.canonical(extent="union", dtype="float32")
    frames = small_fit.frames(dtype="float32")
    monkeypatch.setattr(render, "CHUNK", 97)
    np.testing.assert_allclose(small_fit.canonical(extent="union", dtype="float32"), whole, atol=1e-6)
    np.testing.assert_allclose(small_fit.frames(dtype="float32"), frames, atol=1e-6)


def test_union_pixels_outside_every_frame_are_filled(small_fit):
    union = small_fit.canonical(extent="union", dtype="float32")
    fill = small_fit._burst.restore(np.zeros((1, 3), np.float32), dtype="float32")[0]
    # the union's bounding box is larger than the rotated frames: some corner pixels no frame saw
    corners = [union[0, 0], union[0, -1], union[-1, 0], union[-1, -1]]
    assert any(np.all(c == fill) for c in corners)
    assert not np.all(union[union.shape[0] // 2, union.shape[1] // 2] == fill)


def test_pixel_grid_scale():
    from napari_nir.core.geometry import Normaliser, pixel_grid

    n = Normaliser(4, 6)
    g1 = pixel_grid(4, 6, n, 1.0)
    g2 = pixel_grid(4, 6, n, 2.0)
    assert g1.shape == (24, 2) and g2.shape == (96, 2)
    np.testing.assert_allclose(g1.reshape(4, 6, 2).mean((0, 1)), [0, 0], atol=1e-6)
    np.testing.assert_allclose(g2.reshape(8, 12, 2).mean((0, 1)), [0, 0], atol=1e-6)
