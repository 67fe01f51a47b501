"""Shared fixtures: small generated bursts and one cached small fit (fits are the slow part)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def small_sample():
    from napari_nir._sample_data import homography_burst

    return homography_burst(5, (64, 64), seed=3, translation=0.06, rotation_deg=4, scale=0.04, perspective=0.03)


@pytest.fixture(scope="session")
def small_fit(small_sample):
    import napari_nir as nir

    return nir.fuse(small_sample.frames, "homography", steps=200, device="cpu", seed=0, init="identity")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the checkout as ../shared/data)")
    return SHARED_DATA
