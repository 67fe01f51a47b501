"""Rendering a fitted model: per-frame reconstructions, the canonical view, alignment.

All rendering is chunked (``CHUNK`` points at a time, no autograd) so that memory is bounded by the output,
not by a full coordinate grid.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .config import FitConfig
from .geometry import Normaliser, apply_homography, frame_bounds, grid_shape, pixel_grid
from .motions import get_motion

CHUNK = 1 << 17  # points per forward pass when rendering


def _to_unit(values: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = value_range
    return (values - lo) / (hi - lo)


@torch.no_grad()
def render_points(model, frame_index: int | None, xy: np.ndarray | torch.Tensor, value_range, device) -> np.ndarray:
    """Evaluate the model at (N, 2) normalised coordinates -> (N, C) float32 in [0, 1] working units.

    frame_index None: ``xy`` are canonical coordinates (field only); otherwise frame coordinates of that frame.
    """
    xy = torch.as_tensor(xy, dtype=torch.float32)
    out = []
    for start in range(0, len(xy), CHUNK):
        chunk = xy[start:start + CHUNK].to(device)
        if frame_index is None:
            values = model.field(chunk)
        else:
            values = model(torch.full((len(chunk),), frame_index, dtype=torch.long, device=device), chunk)
        out.append(_to_unit(values, value_range).float().cpu())
    return torch.cat(out).numpy()


def render_frame(model, t: int, height: int, width: int, value_range, device, scale: float = 1.0) -> np.ndarray:
    """Frame t's reconstruction at (height, width) pixels (times ``scale``): (h, w, C) float32 working units."""
    norm = Normaliser(height, width)
    xy = pixel_grid(height, width, norm, scale)
    rows, cols = max(1, round(height * scale)), max(1, round(width * scale))
    return render_points(model, t, xy, value_range, device).reshape(rows, cols, -1)


def union_bounds(matrices: np.ndarray, norm: Normaliser, domain) -> tuple[float, float, float, float]:
    """Normalised (xmin, xmax, ymin, ymax) covering every frame's outline, clipped to the field's domain."""
    xmin, xmax, ymin, ymax = frame_bounds(matrices, norm)
    dx0, dx1, dy0, dy1 = domain
    return max(xmin, dx0), min(xmax, dx1), max(ymin, dy0), min(ymax, dy1)


def canonical_grid(matrices: np.ndarray, norm: Normaliser, domain, extent: str, scale: float):
    """The canonical view's sampling: (to_normalised 3x3 for its pixels, (rows, cols)).

    extent "union": a grid of the input's pixel size / scale covering all frames; "first": frame 0's pixels.
    """
    if extent == "first":
        rows, cols = max(1, round(norm.height * scale)), max(1, round(norm.width * scale))
        # output pixel (c, r) -> frame-0 pixel ((c + .5) / k - .5) -> frame-0 normalised -> canonical
        k_c, k_r = cols / norm.width, rows / norm.height
        sub = np.array([[1 / k_c, 0, 0.5 / k_c - 0.5], [0, 1 / k_r, 0.5 / k_r - 0.5], [0, 0, 1.0]])
        return matrices[0] @ norm.matrix @ sub, (rows, cols)
    xmin, xmax, ymin, ymax = union_bounds(matrices, norm, domain)
    step = 1.0 / (norm.s * scale)  # normalised units per output pixel
    rows, cols = grid_shape(xmin, xmax, ymin, ymax, step)
    to_norm = np.array([[step, 0, xmin + step / 2], [0, step, ymin + step / 2], [0, 0, 1.0]])
    return to_norm, (rows, cols)


def _check_size(rows: int, cols: int, scale: float, max_pixels: int) -> None:
    if rows * cols > max_pixels:
        raise ValueError(f"canonical view of {rows}x{cols} pixels is too large (limit {max_pixels} pixels); "
                         f"use a smaller scale (e.g. scale={scale * math.sqrt(max_pixels / (rows * cols)):.2f})")


@torch.no_grad()
def render_canonical(model, matrices: np.ndarray, norm: Normaliser, value_range, device, *, extent="union",
                     scale=1.0, fill=0.0, max_pixels=1 << 26) -> np.ndarray:
    """The canonical view (rows, cols, C) float32 in working units; pixels no frame saw are ``fill``.

    matrices: (T, 3, 3) normalised frame -> canonical homographies; norm: normaliser of the input frames.
    Rendered in row bands so memory stays proportional to the output.
    """
    to_norm, (rows, cols) = canonical_grid(matrices, norm, model.domain, extent, scale)
    _check_size(rows, cols, scale, max_pixels)
    inverse = torch.as_tensor(np.linalg.inv(matrices), dtype=torch.float64)
    hx, hy = norm.half_extent()
    band = max(1, CHUNK // cols)
    out = None
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        cc, rr = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(r0, r1, dtype=np.float64))
        pts = np.stack([cc.ravel(), rr.ravel(), np.ones(cc.size)], 0)
        xyh = to_norm @ pts
        xy = torch.as_tensor((xyh[:2] / xyh[2]).T)
        values = render_points(model, None, xy, value_range, device)
        if extent == "union":
            covered = np.zeros(len(values), dtype=bool)
            for inv in inverse:
                fx = apply_homography(inv[None], torch.zeros(len(xy), dtype=torch.long), xy).numpy()
                covered |= (np.abs(fx[:, 0]) <= hx) & (np.abs(fx[:, 1]) <= hy)
            values[~covered] = fill
        if out is None:
            out = np.empty((rows, cols, values.shape[1]), dtype=np.float32)
        out[r0:r1] = values.reshape(r1 - r0, cols, -1)
    return out


@torch.no_grad()
def preview_canonical(model, config: FitConfig, device, max_side: int = 192) -> np.ndarray:
    """A small canonical view (union extent) in [0, 1] working units for live previews."""
    norm = model.normaliser
    scale = min(1.0, max_side / max(norm.height, norm.width))
    motion = get_motion(config.motion.model)
    if motion.alignment == "flow":
        return render_canonical_flow(model, norm, config.value_range, device, depth=motion.depth, extent="union",
                                     scale=scale)
    matrices = model.motion.matrices().detach().cpu().numpy()
    return render_canonical(model, matrices, norm, config.value_range, device, extent="union", scale=scale)


# -- flow models -----------------------------------------------------------------------------------
def border_points(norm: Normaliser, step: float = 4.0) -> np.ndarray:
    """(N, 2) normalised coordinates of points every ``step`` pixels along a frame's outer edge."""
    hx, hy = norm.half_extent()
    nx = max(2, int(norm.width / step) + 1)
    ny = max(2, int(norm.height / step) + 1)
    xs, ys = np.linspace(-hx, hx, nx), np.linspace(-hy, hy, ny)
    pts = np.concatenate([np.stack([xs, np.full(nx, -hy)], 1), np.stack([xs, np.full(nx, hy)], 1),
                          np.stack([np.full(ny, -hx), ys], 1), np.stack([np.full(ny, hx), ys], 1)])
    return pts.astype(np.float32)


@torch.no_grad()
def warp_points(model, t: int, xy: torch.Tensor, device) -> torch.Tensor:
    """W_t at (N, 2) normalised frame coordinates -> (N, 2|3) canonical coordinates, chunked, on CPU."""
    out = []
    for start in range(0, len(xy), CHUNK):
        chunk = xy[start:start + CHUNK].to(device)
        out.append(model.motion(torch.full((len(chunk),), t, dtype=torch.long, device=device), chunk).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def unwarp_points(model, t: int, canonical_xy: torch.Tensor, device, iterations: int = 6,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """Solve W_t(x) = p for frame coordinates x, given (N, 2) canonical points p.

    Newton's method with a finite-difference 2x2 Jacobian per point, started from ``start`` (default: the
    homography part's inverse): converges in a few iterations wherever the warp is locally invertible;
    where a learned flow folds, it finds the preimage nearest the start.
    """
    if start is None:
        inv = torch.linalg.inv(model.motion.matrices()[t:t + 1].cpu())
        zeros = torch.zeros(len(canonical_xy), dtype=torch.long)
        x = apply_homography(inv, zeros, canonical_xy.double()).float()
    else:
        x = start.float().clone()
    eps = 1e-3
    for _ in range(iterations):
        fx = warp_points(model, t, x, device)[:, :2]
        residual = fx - canonical_xy
        jx = (warp_points(model, t, x + torch.tensor([eps, 0.0]), device)[:, :2] - fx) / eps
        jy = (warp_points(model, t, x + torch.tensor([0.0, eps]), device)[:, :2] - fx) / eps
        a, b, c, d = jx[:, 0], jy[:, 0], jx[:, 1], jy[:, 1]
        det = a * d - b * c
        ok = det.abs() > 1e-6
        det = torch.where(ok, det, torch.ones_like(det))
        step_x = torch.where(ok, (d * residual[:, 0] - b * residual[:, 1]) / det, residual[:, 0])
        step_y = torch.where(ok, (-c * residual[:, 0] + a * residual[:, 1]) / det, residual[:, 1])
        x = x - torch.stack([step_x, step_y], 1)
    return x


def flow_bounds(model, norm: Normaliser, device, frames=None) -> tuple[float, float, float, float]:
    """Normalised (xmin, xmax, ymin, ymax) of the mapped outlines of ``frames`` (default: all), in the domain."""
    pts = torch.as_tensor(border_points(norm))
    frames = range(model.motion.n_frames) if frames is None else frames
    mapped = torch.cat([warp_points(model, t, pts, device)[:, :2] for t in frames])
    xmin, ymin = mapped.min(0).values.tolist()
    xmax, ymax = mapped.max(0).values.tolist()
    dx0, dx1, dy0, dy1 = model.domain
    return max(xmin, dx0), min(xmax, dx1), max(ymin, dy0), min(ymax, dy1)


def flow_canonical_grid(model, norm: Normaliser, device, extent: str, scale: float):
    """A flow model's canonical view sampling, like ``canonical_grid``: (to_normalised 3x3 for its pixels,
    (rows, cols)); an axis-aligned grid of the input's pixel size / scale over the mapped outlines of every
    frame ("union") or of frame 0 ("first")."""
    xmin, xmax, ymin, ymax = flow_bounds(model, norm, device, None if extent == "union" else [0])
    step = 1.0 / (norm.s * scale)
    to_norm = np.array([[step, 0, xmin + step / 2], [0, step, ymin + step / 2], [0, 0, 1.0]])
    return to_norm, grid_shape(xmin, xmax, ymin, ymax, step)


@torch.no_grad()
def render_canonical_flow(model, norm: Normaliser, value_range, device, *, depth: bool = False, extent="union",
                          scale=1.0, fill=0.0, w: float | None = None, max_pixels=1 << 26) -> np.ndarray:
    """Canonical view (rows, cols, C) of a flow / occlusion model, working units, axis-aligned canonical grid.

    depth: the motion maps to (x, y, w) (the motion table's ``depth``: occlusion).
    extent "union": all frames' mapped outlines; "first": frame 0's. w (occlusion model): the depth slice
    to render, in [-1, 1]; None: the burst's dominant w (its median over all frames), i.e. the background.
    """
    to_norm, (rows, cols) = flow_canonical_grid(model, norm, device, extent, scale)
    _check_size(rows, cols, scale, max_pixels)
    if depth and w is None:
        w = dominant_w(model, norm, device)
    hx, hy = norm.half_extent()
    band = max(1, CHUNK // cols)
    out = None
    step, x0, y0 = to_norm[0, 0], to_norm[0, 2], to_norm[1, 2]
    xs = x0 + step * np.arange(cols)
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        ys = y0 + step * np.arange(r0, r1)
        xx, yy = np.meshgrid(xs, ys)
        p = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], 1), dtype=torch.float32)
        q = torch.cat([p, torch.full((len(p), 1), float(w))], 1) if depth else p
        values = render_points(model, None, q, value_range, device)
        covered = np.zeros(len(p), dtype=bool)
        for t in range(model.motion.n_frames):
            x = unwarp_points(model, t, p, device).numpy()
            covered |= (np.abs(x[:, 0]) <= hx) & (np.abs(x[:, 1]) <= hy)
        values[~covered] = fill
        if out is None:
            out = np.empty((rows, cols, values.shape[1]), dtype=np.float32)
        out[r0:r1] = values.reshape(r1 - r0, cols, -1)
    return out


@torch.no_grad()
def dominant_w(model, norm: Normaliser, device, samples: int = 4096) -> float:
    """Median of the occlusion coordinate w over a regular subsample of every frame's pixels."""
    n = max(2, int(math.sqrt(samples)))
    hx, hy = norm.half_extent()
    xx, yy = np.meshgrid(np.linspace(-hx, hx, n), np.linspace(-hy, hy, n))
    xy = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], 1), dtype=torch.float32)
    ws = torch.cat([warp_points(model, t, xy, device)[:, 2] for t in range(model.motion.n_frames)])
    return float(ws.median())


def flow_to_rgb(flow: np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """Colour-code a (H, W, 2) (d_row, d_col) flow with the standard optical-flow colour wheel -> (H, W, 3) uint8.

    Hue is the direction (right = red, down = yellow-green, left = cyan, up = purple), saturation the
    magnitude relative to ``max_magnitude`` (default: the largest in the field); zero flow is white.
    """
    from skimage.color import hsv2rgb  # here: scikit-image's import is slow

    d_row, d_col = np.asarray(flow[..., 0], np.float64), np.asarray(flow[..., 1], np.float64)
    magnitude = np.hypot(d_row, d_col)
    top = float(max_magnitude) if max_magnitude else max(float(magnitude.max()), 1e-9)
    hue = (np.arctan2(d_row, d_col) / (2 * np.pi)) % 1.0
    hsv = np.stack([hue, np.clip(magnitude / top, 0, 1), np.ones_like(hue)], -1)
    return (hsv2rgb(hsv) * 255).round().astype(np.uint8)
