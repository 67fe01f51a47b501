"""Do no harm in a separated scene: rules applied after the fit, where the layers are not believed (numpy/scipy).

A separation's scene is the networks' scene plus, where the interference leaves the scene visible, what the fit
leaves unexplained (``detail_transfer``, in ``SeparationResult.layers``). This module holds the two other rules:

**scene consensus** (``scene_consensus``): interference does not move with the scene, so what every other frame
also removes at the same scene point is scene detail the interference soaked up, and is given back.

**thick alpha** (fence, rain): obstructions and rain streaks are thin. Where an alpha above 1/2 forms a blob much
thicker than the burst's typical wire or streak, the fit has most likely used the interference to explain
something else, an object moving by itself or a scene the motion model does not hold (the interference layer
soaks it up: it can brighten or cover anything). Those pixels keep the frame's own values: the interference
there stays, and nothing of the scene is lost. The typical thickness is measured on the burst itself (the
median of the distance transform over its alpha > 1/2 pixels), so a fence of wide wires at full resolution is
still removed; only blobs well beyond it are kept.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

from .diagnostics import warp_into

__all__ = ["thick_alpha", "scene_consensus", "THICKNESS_FACTOR", "MIN_RADIUS"]

THICKNESS_FACTOR = 2.0  # blobs are what survives an opening this many typical half-widths wide (radius) ...
MIN_RADIUS = 2          # ... and at least this many pixels
MARGIN = 2              # the kept region grows by this many pixels (a blob's soft edge)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return yy ** 2 + xx ** 2 <= radius ** 2


def thick_alpha(alpha: np.ndarray) -> tuple[np.ndarray, int]:
    """(T, H, W) alpha in [0, 1] -> ((T, H, W) bool, radius): pixels of alpha blobs thicker than the burst's wires
    or streaks (module docstring), grown by ``MARGIN``, and the opening radius used (pixels; 0: no alpha > 1/2)."""
    covered = np.asarray(alpha) > 0.5
    if not covered.any():
        return np.zeros(covered.shape, bool), 0
    depth = np.concatenate([ndimage.distance_transform_edt(frame)[frame] for frame in covered])
    radius = max(MIN_RADIUS, int(np.ceil(THICKNESS_FACTOR * np.median(depth))))
    disk, grow = _disk(radius), _disk(MARGIN)
    out = np.empty(covered.shape, bool)
    for t, frame in enumerate(covered):
        out[t] = ndimage.binary_dilation(ndimage.binary_opening(frame, structure=disk), structure=grow)
    return out, radius


def scene_consensus(removed: np.ndarray, to_reference: np.ndarray) -> np.ndarray:
    """(T, H, W, C) the part of what a separation removed from each frame that the other frames remove at the same
    scene point: scene detail the interference soaked up, to be given back.

    removed: (T, H, W, C) frame - scene, working units; to_reference: (T, 3, 3) frame-t pixel (col, row, 1) ->
    common reference pixel homographies of the scene's motion. Interference does not move with the scene (rain is
    new in every frame, a fence or a reflection moves differently, moire changes with the view): at one scene
    point, the other frames remove something else. Detail of the scene itself is removed alike in every frame. Per
    pixel, the other frames' removals warped onto frame t give a median m (pixels no other frame covers give 0);
    where m and frame t's removal d have the same sign, min(|d|, |m|) of it is scene, returned with d's sign."""
    t_count = len(removed)
    out = np.zeros_like(removed)
    for t in range(t_count):
        others = []
        for s in range(t_count):
            if s == t:
                continue
            warped, inside = warp_into(removed[s], np.linalg.inv(to_reference[s]) @ to_reference[t])
            warped[~inside] = np.nan
            others.append(warped)
        if not others:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: no other frame covers them
            median = np.nan_to_num(np.nanmedian(np.stack(others), axis=0))
        d = removed[t]
        same = np.sign(d) == np.sign(median)
        out[t] = np.where(same, np.sign(d) * np.minimum(np.abs(d), np.abs(median)), 0.0)
    return out
