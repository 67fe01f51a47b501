"""Coordinates: the one place each conversion lives (docs/architecture.md, "Coordinates").

* pixel (col, row): pixel centres at integer coordinates, (0, 0) the centre of the top-left pixel;
* normalised (x, y): ``x = (col - (W - 1) / 2) / s``, ``y = (row - (H - 1) / 2) / s``, ``s = max(H, W) / 2``:
  isotropic, the longer side spanning [-1, 1] (``Normaliser``);
* time t in [-1, 1] over the burst (``time_coordinate``);
* canonical: where the motion model maps normalised frame coordinates to (the field's domain);
* napari's (row, col) order appears only in the adapters (``_layers.py``) and in ``outlines()``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["Normaliser", "pixel_grid", "frame_corners", "frame_bounds", "apply_homography", "time_coordinate",
           "grid_shape"]


class Normaliser:
    """Pixel (col, row) <-> normalised (x, y) for an image of (height, width) pixels.

    x = (col - (W - 1) / 2) / s, y = (row - (H - 1) / 2) / s, s = max(H, W) / 2.
    """

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.s = max(height, width) / 2
        self.cx, self.cy = (width - 1) / 2, (height - 1) / 2

    @property
    def matrix(self) -> np.ndarray:
        """3x3: pixel (col, row, 1) -> normalised (x, y, 1)."""
        return np.array([[1 / self.s, 0, -self.cx / self.s], [0, 1 / self.s, -self.cy / self.s], [0, 0, 1.0]])

    def half_extent(self) -> tuple[float, float]:
        """(x, y) half sizes of the frame in normalised units (to the outer pixel edges)."""
        return self.width / 2 / self.s, self.height / 2 / self.s

    def flat_pixels(self, pix: torch.Tensor) -> torch.Tensor:
        """(N,) flat pixel indices (row * W + col) -> (N, 2) float32 normalised (x, y)."""
        return torch.stack([((pix % self.width).float() - self.cx) / self.s,
                            ((pix // self.width).float() - self.cy) / self.s], 1)


def pixel_grid(height: int, width: int, norm: Normaliser, scale: float = 1.0) -> np.ndarray:
    """(height*scale * width*scale, 2) normalised coordinates of a frame's pixel centres sampled ``scale`` x finer."""
    rows = max(1, round(height * scale))
    cols = max(1, round(width * scale))
    c = (np.arange(cols) + 0.5) / (cols / width) - 0.5
    r = (np.arange(rows) + 0.5) / (rows / height) - 0.5
    x = (c - norm.cx) / norm.s
    y = (r - norm.cy) / norm.s
    xx, yy = np.meshgrid(x, y)
    return np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)


def frame_corners(norm: Normaliser) -> np.ndarray:
    """(3, 4) homogeneous normalised corners of a frame (outer pixel edges), clockwise from the top left."""
    hx, hy = norm.half_extent()
    return np.array([[-hx, -hy, 1], [hx, -hy, 1], [hx, hy, 1], [-hx, hy, 1]]).T


def frame_bounds(matrices: np.ndarray, norm: Normaliser) -> tuple[float, float, float, float]:
    """(xmin, xmax, ymin, ymax) of every frame's outline mapped by (T, 3, 3) normalised homographies."""
    pts = np.einsum("tij,jk->tik", matrices, frame_corners(norm))
    pts = pts[:, :2] / pts[:, 2:3]
    return float(pts[:, 0].min()), float(pts[:, 0].max()), float(pts[:, 1].min()), float(pts[:, 1].max())


def apply_homography(matrices: torch.Tensor, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Apply per-point homographies: matrices (T, 3, 3), frame_index (N,), xy (N, 2) -> (N, 2)."""
    m = matrices[frame_index].to(xy.dtype)
    x, y = xy[:, 0:1], xy[:, 1:2]
    num = m[:, :2, 0] * x + m[:, :2, 1] * y + m[:, :2, 2]
    den = m[:, 2, 0:1] * x + m[:, 2, 1:2] * y + m[:, 2, 2:3]
    return num / den


def time_coordinate(frame_index: torch.Tensor, n_frames: int) -> torch.Tensor:
    """(N,) frame indices -> (N,) float32 time in [-1, 1] over the burst (frame 0 at -1, the last at 1)."""
    return frame_index.float() / max(n_frames - 1, 1) * 2 - 1


def grid_shape(xmin: float, xmax: float, ymin: float, ymax: float, step: float) -> tuple[int, int]:
    """(rows, cols) of a grid with ``step`` normalised units per pixel covering the box."""
    return (max(1, int(math.ceil((ymax - ymin) / step - 1e-6))), max(1, int(math.ceil((xmax - xmin) / step - 1e-6))))
