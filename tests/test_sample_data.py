"""Generated sample bursts: shapes, and that the ground-truth homographies really align the frames."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import ProjectiveTransform, warp

from napari_nir._sample_data import corner_error, homography_burst


def test_shapes_and_ranges():
    s = homography_burst(4, (48, 64), seed=1)
    assert s.frames.shape == (4, 48, 64, 3) and s.frames.dtype == np.float32
    assert s.homographies.shape == (4, 3, 3)
    assert 0 <= s.clean.min() and s.clean.max() <= 1
    g = homography_burst(3, (32, 32), grey=True, noise=0.05, seed=1)
    assert g.frames.shape == (3, 32, 32)
    assert 0.03 < np.std(g.frames - g.clean) < 0.07


def test_ground_truth_homographies_align_the_frames():
    s = homography_burst(3, (96, 96), seed=2)
    m = np.linalg.inv(s.homographies[0]) @ s.homographies[1]  # frame 1 px -> frame 0 px
    # warp frame 0 into frame 1's pixel grid: output pixel x (frame 1) reads frame 0 at m @ x
    inner = (slice(24, 72), slice(24, 72))

    def misfit(matrix):
        warped = warp(s.frames[0], ProjectiveTransform(matrix=matrix), order=3)
        return np.abs(warped[inner] - s.frames[1][inner]).mean()

    half_pixel_off = np.array([[1, 0, 0.5], [0, 1, 0], [0, 0, 1.0]]) @ m
    # the truth aligns far better than a homography only half a pixel away from it
    assert misfit(m) < 0.5 * misfit(half_pixel_off)
    assert misfit(m) < 0.02
    assert corner_error(s.homographies, s.homographies, (96, 96)).max() == pytest.approx(0)


def test_unknown_image_is_explained():
    with pytest.raises(ValueError, match="unknown sample image"):
        homography_burst(2, (16, 16), image="nope")
