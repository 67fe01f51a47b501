"""Tiled fusion at full resolution: the pure numpy part (no dask, zarr or torch).

A burst whose frames are too large to hold as float32 copies is fused in three steps (``napari_nir.tiled`` runs
them): the motion is fitted on a block-mean copy of the frames (``downsample_frame``), the fit's matrices are
carried to the full-resolution pixel grid (``full_resolution_grid``), and the fused view is computed tile by tile
(``fuse_tile``), each tile reading only the windows of the frames it needs.

Conventions are ``core.registration``'s: pixel (col, row) with pixel centres at integers; transforms (T, 3, 3)
map frame pixels to grid pixels ("napari-nir"); positions are (row, col) only where they meet
``scipy.ndimage.map_coordinates``. A position is inside a frame when it lies within the frame's outer pixel edges
([-0.5, H - 0.5] x [-0.5, W - 0.5]); between the outer pixel centres and the edges the nearest pixel is extended,
as ``registration.resample_frame`` does.

The fused view is the mean, over the frames that cover each output pixel, of the input frames resampled
linearly (order 1) onto the canonical grid, in the input's units. No seams: every output pixel is computed
from the global motion (one matrix per frame) and the input pixels around its own position in each frame,
independently of the tile it falls in, so tiling changes which pixels are computed together but never their
values; no overlap or blending is needed. Limitation: a motion fitted per tile (local motion) would give
neighbouring tiles different alignments and would need overlapping tiles and blending; that is not done here.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np
from scipy.ndimage import map_coordinates

from .registration import ReferenceGrid, grid_points, matrices_grid

__all__ = ["block_factor", "downsampled_shape", "block_mean", "downsample_frame", "upscale_transforms",
           "full_resolution_grid", "tile_bounds", "frame_window", "fuse_tile", "tile_memory",
           "cast_to"]

# read_window(t, y0, y1, x0, x1) -> frame t's pixels rows y0:y1, cols x0:x1: (y1 - y0, x1 - x0[, C])
WindowReader = Callable[[int, int, int, int, int], np.ndarray]


# -- the downsampled copy that the motion is fitted on -------------------------------------------------------
def block_factor(frame_shape: tuple[int, ...], working_size: int) -> int:
    """The integer block size k (input pixels per fitted pixel, per side) that brings the longer side of frames
    (H, W[, C]) to at most ``working_size`` px: ceil(max(H, W) / working_size); 1 when working_size is 0 (no
    limit) or the frames are already small enough."""
    if isinstance(working_size, bool) or not isinstance(working_size, numbers.Integral) or working_size < 0:
        raise ValueError(f"working_size must be a non-negative integer number of pixels (0: no limit), "
                         f"got {working_size!r}")
    longest = max(int(frame_shape[0]), int(frame_shape[1]))
    if working_size == 0 or longest <= working_size:
        return 1
    return math.ceil(longest / int(working_size))


def downsampled_shape(frame_shape: tuple[int, ...], factor: int) -> tuple[int, int]:
    """(h, w) = (H // k, W // k): whole blocks only; the last H % k rows and W % k columns are left out of the
    fit (never out of the fused view), so that fitted pixel i is exactly the block of input pixels
    [i k, (i + 1) k) and its centre is input pixel (i + 0.5) k - 0.5 on both axes."""
    return int(frame_shape[0]) // factor, int(frame_shape[1]) // factor


def block_mean(rows: np.ndarray, factor: int) -> np.ndarray:
    """Area averaging: (r, W[, C]) input rows, r a multiple of k -> (r // k, W // k[, C]) float32 means of
    k x k blocks in the input's units (the partial block of the last W % k columns is dropped)."""
    rows = np.asarray(rows)
    r, width = rows.shape[:2]
    if r % factor:
        raise ValueError(f"block_mean needs a multiple of {factor} rows, got {r}")
    w = width // factor
    block = rows[:, :w * factor].astype(np.float64)
    block = block.reshape((r // factor, factor, w, factor) + rows.shape[2:])
    return block.mean(axis=(1, 3)).astype(np.float32)


def downsample_frame(read_rows: Callable[[int, int], np.ndarray], frame_shape: tuple[int, ...], factor: int,
                     rows_per_read: int) -> np.ndarray:
    """One frame reduced by k x k block means, read a band of rows at a time: read_rows(r0, r1) -> (r1 - r0, W[, C])
    in any real dtype; frame_shape (H, W[, C]); rows_per_read: rows read at once (rounded down to a multiple of
    k, at least k). Returns (H // k, W // k[, C]) float32 in the input's units."""
    h, w = downsampled_shape(frame_shape, factor)
    step = max(factor, rows_per_read - rows_per_read % factor)
    out = np.empty((h, w) + tuple(frame_shape[2:]), dtype=np.float32)
    for r0 in range(0, h * factor, step):
        r1 = min(h * factor, r0 + step)
        out[r0 // factor:r1 // factor] = block_mean(read_rows(r0, r1), factor)
    return out


# -- the fitted motion at full resolution ------------------------------------------------------------------
def upscale_transforms(transforms: np.ndarray, factor: int) -> np.ndarray:
    """(T, 3, 3) frame pixel -> reference pixel maps of the block-mean copy -> the same maps in input pixels:
    S m S^-1 with S the pixel-centre map i -> (i + 0.5) k - 0.5 (exact for ``block_mean``'s blocks)."""
    k = float(factor)
    s = np.array([[k, 0.0, 0.5 * k - 0.5], [0.0, k, 0.5 * k - 0.5], [0.0, 0.0, 1.0]])
    m = np.einsum("ij,tjk,kl->til", s, np.asarray(transforms, dtype=np.float64), np.linalg.inv(s))
    return m / m[:, 2:3, 2:3]


def full_resolution_grid(transforms: np.ndarray, factor: int, frame_shape: tuple[int, ...]) -> ReferenceGrid:
    """The canonical "union" grid of the input frames (H, W[, C]) at full resolution.

    transforms: (T, 3, 3) frame pixel -> canonical pixel of the block-mean copy (what
    ``FusionResult.transforms(reference="canonical", extent="frame")`` gives for a fit of that copy); factor: its
    block size k. The union is grown in whole input pixels to hold every full frame, as
    ``registration.matrices_grid`` does at the fit's resolution."""
    return matrices_grid(upscale_transforms(transforms, factor), (int(frame_shape[0]), int(frame_shape[1])),
                         "union")


# -- tiles -------------------------------------------------------------------------------------------------
def tile_bounds(grid_shape: tuple[int, int], tile: int) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) of every tile of a (rows, cols) grid, row-major, ``tile`` x ``tile`` px (smaller at the
    bottom and right edges): the chunks of the output."""
    rows, cols = grid_shape
    return [(r0, min(rows, r0 + tile), c0, min(cols, c0 + tile))
            for r0 in range(0, rows, tile) for c0 in range(0, cols, tile)]


def frame_window(positions: np.ndarray, frame_shape: tuple[int, ...],
                 margin: int = 1) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """Which of (N, 2) (col, row) frame positions fall inside the frame (H, W[, C]), and the window
    (y0, y1, x0, x1) of frame pixels that linear interpolation at those positions reads: their bounding box
    plus ``margin`` px, clipped to the frame; None when no position is inside. Non-finite positions (a
    homography's points beyond the horizon) are outside."""
    height, width = int(frame_shape[0]), int(frame_shape[1])
    col, row = positions[:, 0], positions[:, 1]
    inside = (row >= -0.5) & (row <= height - 0.5) & (col >= -0.5) & (col <= width - 0.5)
    if not inside.any():
        return inside, None
    rows, cols = row[inside], col[inside]
    y0 = max(0, int(np.floor(rows.min())) - margin)
    y1 = min(height, int(np.floor(rows.max())) + 2 + margin)
    x0 = max(0, int(np.floor(cols.min())) - margin)
    x1 = min(width, int(np.floor(cols.max())) + 2 + margin)
    return inside, (y0, y1, x0, x1)


def fuse_tile(read_window: WindowReader, grid: ReferenceGrid, bounds: tuple[int, int, int, int], n_frames: int,
              frame_shape: tuple[int, ...], dtype, fill: float = 0.0) -> np.ndarray:
    """One tile (r0, r1, c0, c1) of the fused view on ``grid``: (r1 - r0, c1 - c0) for grey frames (H, W), or
    (r1 - r0, c1 - c0, C) for frames (H, W, C), in ``dtype``.

    For every frame t: the tile's pixel centres are mapped into the frame (``grid.positions``), only the window of
    frame pixels around the positions inside it is read (``read_window``), and the window is sampled linearly
    (``scipy.ndimage.map_coordinates``, order 1, the nearest pixel extended up to the outer pixel edges); each
    output pixel is the mean over the frames that cover it, in float64, then cast to ``dtype`` (``cast_to``).
    Pixels no frame covers are ``fill``. The result does not depend on the tiling (module docstring)."""
    r0, r1, c0, c1 = bounds
    channels = int(frame_shape[2]) if len(frame_shape) > 2 else 1
    xy = grid_points((r1, c1), r0, r1, c0)  # the tile's pixel centres, (col, row)
    total = np.zeros((len(xy), channels), dtype=np.float64)
    count = np.zeros(len(xy), dtype=np.int32)
    for t in range(n_frames):
        positions = grid.positions(t, xy)
        inside, window = frame_window(positions, frame_shape)
        if window is None:
            continue
        y0, y1, x0, x1 = window
        pixels = np.asarray(read_window(t, y0, y1, x0, x1))
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if pixels.shape != (y1 - y0, x1 - x0, channels):
            raise ValueError(f"frame {t}'s window rows {y0}:{y1}, cols {x0}:{x1} came back with shape "
                             f"{pixels.shape}, not {(y1 - y0, x1 - x0, channels)}")
        local = positions[inside]
        coords = np.stack([local[:, 1] - y0, local[:, 0] - x0])   # (row, col) in the window, for scipy
        for c in range(channels):
            total[inside, c] += map_coordinates(pixels[..., c], coords, output=np.float64, order=1, mode="nearest")
        count[inside] += 1
    covered = count > 0
    total[covered] /= count[covered, None]
    total[~covered] = fill
    out = cast_to(total, dtype).reshape(r1 - r0, c1 - c0, channels)
    return out if len(frame_shape) > 2 else out[..., 0]


def cast_to(values: np.ndarray, dtype) -> np.ndarray:
    """float64 values in the input's units -> ``dtype``: integers rounded half to even and clipped to the dtype's
    limits (non-finite values, e.g. a NaN fill, become 0); floats cast (clipped to the dtype's finite range)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        info = np.finfo(dtype)
        finite = np.isfinite(values)
        clipped = np.where(finite, np.clip(values, float(info.min), float(info.max)), values)
        return clipped.astype(dtype)
    info = np.iinfo(dtype)
    rounded = np.rint(np.where(np.isfinite(values), values, 0.0))
    return np.clip(rounded, float(info.min), float(info.max)).astype(dtype)


def tile_memory(tile: int, channels: int, itemsize: int) -> int:
    """Bytes that ``fuse_tile`` holds at once for a ``tile`` x ``tile`` tile of ``channels`` channels of an input
    of ``itemsize`` bytes per value: the float64 point lists, positions and sums, and the frame's window (at
    most about the tile's size for motions that do not zoom in). An estimate, for choosing how many tiles run at
    once."""
    n = tile * tile
    return n * (128 + 16 * channels + 2 * channels * itemsize)
