"""core/tiles.py: the block-mean copy, the full-resolution grid and tiles that agree with an untiled computation."""
from __future__ import annotations

import numpy as np
import pytest

from napari_nir.core import tiles
from napari_nir.core.registration import ReferenceGrid, matrices_grid, resample_stack


def _textured(shape, seed=0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.random(shape), 1.5)


def _small_homographies(n: int, seed: int = 1) -> np.ndarray:
    """(n, 3, 3) frame pixel -> reference pixel: shifts of a few px, rotations of a few degrees, mild perspective."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        angle = np.deg2rad(rng.uniform(-4, 4))
        m = np.array([[np.cos(angle), -np.sin(angle), rng.uniform(-6, 6)],
                      [np.sin(angle), np.cos(angle), rng.uniform(-6, 6)],
                      [rng.uniform(-2e-4, 2e-4), rng.uniform(-2e-4, 2e-4), 1.0]])
        out.append(m)
    return np.stack(out)


def _assemble(read, grid, frame_shape, n_frames, tile, dtype, fill=0.0) -> np.ndarray:
    out = np.empty(grid.shape + tuple(frame_shape[2:]), dtype=dtype)
    for r0, r1, c0, c1 in tiles.tile_bounds(grid.shape, tile):
        out[r0:r1, c0:c1] = tiles.fuse_tile(read, grid, (r0, r1, c0, c1), n_frames, frame_shape, dtype, fill)
    return out


def test_block_means_are_area_averages_centred_where_the_grid_says():
    """A linear ramp's block means equal the ramp at (i + 0.5) k - 0.5: the pixel-centre map upscale_transforms
    uses; partial blocks at the right and bottom are left out; reading in bands changes nothing."""
    k = 3
    rows, cols = np.mgrid[0:50, 0:40].astype(np.float64)
    ramp = 2.0 * rows + 5.0 * cols + 7.0
    small = tiles.downsample_frame(lambda r0, r1: ramp[r0:r1], ramp.shape, k, rows_per_read=7)
    assert small.shape == tiles.downsampled_shape(ramp.shape, k) == (16, 13)
    i, j = np.mgrid[0:16, 0:13].astype(np.float64)
    expected = 2.0 * ((i + 0.5) * k - 0.5) + 5.0 * ((j + 0.5) * k - 0.5) + 7.0
    np.testing.assert_allclose(small, expected, rtol=1e-6)
    np.testing.assert_allclose(small, tiles.block_mean(ramp[:48], k), rtol=1e-7)
    rgb = np.stack([ramp, 2 * ramp, 3 * ramp], -1).astype(np.uint16)
    assert tiles.block_mean(rgb[:6], k).shape == (2, 13, 3)


def test_block_factor_keeps_the_longer_side_within_the_working_size():
    assert tiles.block_factor((8192, 8192), 1024) == 8
    assert tiles.block_factor((3000, 2000), 1024) == 3
    assert tiles.block_factor((512, 300), 1024) == 1
    assert tiles.block_factor((5000, 300), 0) == 1
    with pytest.raises(ValueError, match="working_size"):
        tiles.block_factor((64, 64), -1)


def test_full_resolution_grid_is_the_fitted_grid_scaled_on_the_same_pixel_lattice():
    """For frames exactly k times the fit's, the grid equals ReferenceGrid.scaled's up to a whole-pixel shift of
    the union (the full-resolution union is recomputed, so it may be tighter): the same resampling lattice."""
    small = _small_homographies(4)
    k, h, w = 2, 40, 56
    grid = tiles.full_resolution_grid(small, k, (h * k, w * k))
    scaled = matrices_grid(small, (h, w), "union").scaled(k, (h * k, w * k))
    for t in range(4):
        shift = scaled.transforms[t] @ np.linalg.inv(grid.transforms[t])
        shift /= shift[2, 2]
        np.testing.assert_allclose(shift[:2, :2], np.eye(2), atol=1e-9)
        np.testing.assert_allclose(shift[2, :2], 0, atol=1e-12)
        np.testing.assert_allclose(shift[:2, 2], np.round(shift[:2, 2]), atol=1e-8)
    assert grid.shape[0] <= scaled.shape[0] and grid.shape[1] <= scaled.shape[1]
    # a pure shift of d fitted pixels is k d input pixels
    moved = np.stack([np.eye(3), np.array([[1, 0, 2.5], [0, 1, -1.0], [0, 0, 1]])])
    up = tiles.upscale_transforms(moved, 4)
    np.testing.assert_allclose(up[1], [[1, 0, 10.0], [0, 1, -4.0], [0, 0, 1]], atol=1e-12)


@pytest.mark.parametrize("channels", [None, 3])
def test_many_tiles_agree_with_one_tile_to_float_precision(channels):
    """Every output pixel is computed from its own position only: the tiling changes nothing (no seams)."""
    frames = _textured((3, 60, 70) + ((channels,) if channels else ()))
    grid = matrices_grid(_small_homographies(3), (60, 70), "union")
    frame_shape = frames.shape[1:]

    def read(t, y0, y1, x0, x1):
        return frames[t, y0:y1, x0:x1]

    whole = tiles.fuse_tile(read, grid, (0, grid.shape[0], 0, grid.shape[1]), 3, frame_shape, np.float64)
    tiled = _assemble(read, grid, frame_shape, 3, 17, np.float64)
    assert tiled.shape == grid.shape + (() if channels is None else (channels,))
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-12)


def test_tiles_equal_the_untiled_mean_of_the_registered_frames():
    """Independent computation: registration.resample_stack of whole frames (fill NaN), averaged where covered."""
    frames = _textured((4, 48, 64), seed=2) * 1000
    grid = matrices_grid(_small_homographies(4, seed=5), (48, 64), "union")
    registered = resample_stack(frames, "TYX", grid, order=1, fill=np.nan)
    valid = np.isfinite(registered)
    counts = valid.sum(0)
    covered = counts > 0
    expected = np.where(covered, np.where(valid, registered, 0).sum(0) / np.maximum(counts, 1), -1.0)
    tiled = _assemble(lambda t, y0, y1, x0, x1: frames[t, y0:y1, x0:x1], grid, (48, 64), 4, 20, np.float64, fill=-1.0)
    assert (~covered).any() and covered.mean() > 0.5
    np.testing.assert_allclose(tiled, expected, rtol=0, atol=1e-9)


def test_a_tile_reads_only_the_windows_it_needs():
    """Translation by (3, -5) px: each window is the tile's footprint plus the interpolation neighbour and 1 px
    margin; a tile outside a frame reads nothing of it."""
    frames = _textured((2, 100, 100))
    shifts = np.stack([np.eye(3), np.array([[1, 0, 3.0], [0, 1, -5.0], [0, 0, 1]])])
    grid = matrices_grid(shifts, (100, 100), "union")
    reads = []

    def read(t, y0, y1, x0, x1):
        reads.append((t, y1 - y0, x1 - x0))
        return frames[t, y0:y1, x0:x1]

    tiles.fuse_tile(read, grid, (10, 42, 20, 52), 2, (100, 100), np.float32)
    assert [r[0] for r in reads] == [0, 1]
    assert all(rows <= 32 + 3 and cols <= 32 + 3 for _, rows, cols in reads)
    reads.clear()
    tiles.fuse_tile(read, grid, (0, 4, 90, 100), 2, (100, 100), np.float32)
    assert [r[0] for r in reads] == [1]  # the union's top rows are frame 1's alone
    reads.clear()
    corner = tiles.fuse_tile(read, grid, (0, 4, 0, 3), 2, (100, 100), np.float32, fill=7.0)
    assert reads == [] and corner.shape == (4, 3) and (corner == 7.0).all()  # no frame covers it


def test_frame_window_and_cast():
    positions = np.array([[np.nan, 3.0], [np.inf, 2.0], [-0.5, 0.0], [9.5, 4.2], [10.0, 1.0]])
    inside, window = tiles.frame_window(positions, (5, 10))
    assert inside.tolist() == [False, False, True, True, False]
    assert window == (0, 5, 0, 10)
    assert tiles.frame_window(np.array([[20.0, 20.0]]), (5, 10))[1] is None
    values = np.array([-3.2, 0.5, 1.5, 254.6, 300.0, np.nan])
    assert tiles.cast_to(values, np.uint8).tolist() == [0, 0, 2, 255, 255, 0]
    assert np.isnan(tiles.cast_to(values, np.float32)[-1])
    assert tiles.cast_to(np.array([1e6]), np.float16)[0] == np.finfo(np.float16).max


def test_tile_bounds_cover_the_grid_once():
    bounds = tiles.tile_bounds((250, 130), 96)
    covered = np.zeros((250, 130), int)
    for r0, r1, c0, c1 in bounds:
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all() and len(bounds) == 3 * 2
    assert tiles.tile_memory(1024, 1, 2) < 200 << 20


def test_the_grid_type_is_the_registration_grid():
    grid = tiles.full_resolution_grid(np.stack([np.eye(3)] * 2), 2, (64, 64, 3))
    assert isinstance(grid, ReferenceGrid) and grid.shape == (64, 64)
    np.testing.assert_allclose(grid.transforms, np.stack([np.eye(3)] * 2), atol=1e-12)
