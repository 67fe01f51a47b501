"""Registration: resampling stacks onto a common grid with a fitted alignment, transforms in and out, axes.

Conventions (docs/guide.md, "Drift correction"):

* a **reference grid** is where registered frames land: ``reference="canonical"`` (the frames' average pose,
  the gauge of the motion models) or a frame index k (frame k's own pixels); ``extent="frame"`` gives it the
  input's height and width, ``extent="union"`` grows it (in whole pixels) to cover every frame;
* **transforms** (T, 3, 3) float64 in the "napari-nir" convention map a pixel (col, row, 1) of input frame t to
  the pixel (col, row, w) of the reference grid (divide by w); pixel centres are at integer coordinates;
* the "pystackreg" convention is the inverse: reference-grid pixel (x=col, y=row, 1) -> frame-t pixel, on a
  grid of the input's size (what ``StackReg.transform_stack(stack, tmats=...)`` reads);
* positions are (row, col) only where they meet ``scipy.ndimage.map_coordinates``.

Resampling uses ``scipy.ndimage.map_coordinates`` (orders 0, 1, 3): a well-kept spline interpolator; what is
ours is only the grid bookkeeping. Pure numpy/scipy: no torch, napari or Qt.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

__all__ = ["CONVENTIONS", "ReferenceGrid", "convert_transforms", "check_order", "check_reference",
           "parse_axes", "parse_register_on", "select_for_fit", "resample_stack", "check_transforms",
           "transform_points"]

CONVENTIONS = ("napari-nir", "pystackreg")
EXTENTS = ("frame", "union")
ORDERS = (0, 1, 3)
ALLOWED_AXES = "TZCYX"
_MAX_GRID_PIXELS = 1 << 28  # a registered grid beyond this is a runaway alignment, not a drift


def check_order(order) -> int:
    """Interpolation order: 0 nearest (labels), 1 linear, 3 cubic spline."""
    if isinstance(order, bool) or order not in ORDERS:
        raise ValueError(f"order must be 0 (nearest: labels), 1 (linear) or 3 (cubic), got {order!r}")
    return int(order)


def check_reference(reference, n_frames: int):
    """"canonical" or a frame index in range (negative indices count from the end)."""
    if isinstance(reference, str):
        if reference != "canonical":
            raise ValueError(f"reference must be 'canonical' (the frames' average pose) or a frame index, got "
                             f"{reference!r}")
        return reference
    if isinstance(reference, bool) or not isinstance(reference, (int, np.integer)):
        raise TypeError(f"reference must be 'canonical' or an integer frame index, got {reference!r}")
    k = int(reference)
    if not -n_frames <= k < n_frames:
        raise ValueError(f"reference frame {k} is out of range for {n_frames} frames")
    return k % n_frames


def check_extent(extent) -> str:
    if extent not in EXTENTS:
        raise ValueError(f"extent must be 'frame' (the input's size) or 'union' (covers every frame), got {extent!r}")
    return extent


def check_transforms(matrices, n_frames: int, name: str = "transforms") -> np.ndarray:
    """(T, 3, 3) finite, invertible float64 matrices normalised to m[2, 2] = 1; ValueError otherwise."""
    try:
        m = np.array(matrices, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (T, 3, 3) array of numbers, got {type(matrices).__name__}") from None
    if m.shape != (n_frames, 3, 3):
        raise ValueError(f"{name} must have shape ({n_frames}, 3, 3) (one 3x3 matrix per frame), got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} contain NaN or infinite values")
    det = np.linalg.det(m)
    if np.any(np.abs(det) < 1e-12) or np.any(np.abs(m[:, 2, 2]) < 1e-12):
        bad = int(np.flatnonzero((np.abs(det) < 1e-12) | (np.abs(m[:, 2, 2]) < 1e-12))[0])
        raise ValueError(f"{name}[{bad}] is singular (not invertible) or has m[2, 2] = 0")
    return m / m[:, 2:3, 2:3]


def convert_transforms(matrices, source: str = "pystackreg", target: str = "napari-nir") -> np.ndarray:
    """Convert (T, 3, 3) transforms between conventions (module docstring): pystackreg's are the inverses of ours.

    Both describe the same reference grid of the input's size (pystackreg has no other)."""
    for name, value in (("source", source), ("target", target)):
        if value not in CONVENTIONS:
            raise ValueError(f"{name} convention must be one of {', '.join(CONVENTIONS)}, got {value!r}")
    m = np.asarray(matrices, dtype=np.float64)
    m = check_transforms(m, len(m) if m.ndim == 3 else -1)
    if source != target:
        m = np.linalg.inv(m)
    return m / m[:, 2:3, 2:3]


# -- axes ---------------------------------------------------------------------------------------------
def parse_axes(axes: str | None, shape: tuple[int, ...]) -> str:
    """An axes string for an array of ``shape``, upper case, e.g. "TCYX".

    None: "TYX" for 3-D and "TYXC" for 4-D (a burst as ``fuse`` reads it). Letters: T (frames), Y, X (rows,
    columns), and at most one C (channels) and one Z (planes); each at most once.
    """
    ndim = len(shape)
    if axes is None:
        if ndim == 3:
            return "TYX"
        if ndim == 4:
            return "TYXC"
        raise ValueError(f"an array of {ndim} axes {tuple(shape)} needs an axes string such as 'TCYX' or 'TZYX'")
    if not isinstance(axes, str):
        raise TypeError(f"axes must be a string such as 'TCYX', got {axes!r}")
    letters = axes.upper()
    if len(letters) != ndim:
        raise ValueError(f"axes {axes!r} names {len(letters)} axes but the array has {ndim}: {tuple(shape)}")
    unknown = set(letters) - set(ALLOWED_AXES)
    if unknown:
        raise ValueError(f"axes {axes!r}: unknown letter(s) {', '.join(sorted(unknown))}; use T (frames), Y, X, "
                         "C (channels) and Z (planes)")
    if len(set(letters)) != len(letters):
        raise ValueError(f"axes {axes!r} names an axis twice")
    missing = [a for a in "TYX" if a not in letters]
    if missing:
        raise ValueError(f"axes {axes!r} must contain T, Y and X (missing {', '.join(missing)})")
    return letters


def parse_register_on(text) -> int | str | None:
    """``register_on`` from text (a widget field, a command-line flag): "" -> None (the default), "max", or a
    non-negative index; ValueError otherwise."""
    text = "" if text is None else str(text).strip().lower()
    if not text:
        return None
    if text == "max":
        return "max"
    if text.isdigit():
        return int(text)
    raise ValueError(f"register on must be empty, 'max' or a channel/plane index such as 0, got {text!r}")


def select_for_fit(array, axes: str | None, register_on=None):
    """The (T, Y, X[, C]) stack a fit reads from an array with ``axes`` -> (stack, what it read: e.g.
    "channel 0", "the maximum projection over Z"; "" for a plain burst).

    Z planes: ``register_on`` "max" (default: the maximum projection) or a plane index. Channels: None (default:
    all channels jointly, as the burst's channels) or a channel index. With both, ``register_on`` is
    {"Z": ..., "C": ...}. Views stay views (numpy, dask); only a projection computes.
    """
    if axes is None:  # a burst as it is: prepare_burst checks it and says what is wrong
        if register_on is not None:
            raise ValueError(f"register_on={register_on!r} needs axes naming a C or Z axis, e.g. axes='TCYX'")
        return array, ""
    letters = parse_axes(axes, tuple(np.shape(array)))
    if letters in ("TYX", "TYXC"):
        if register_on is not None:
            raise ValueError(f"register_on={register_on!r} needs a C or Z axis in axes (got {letters!r})")
        return array, ""
    choice = register_on if isinstance(register_on, dict) else (
        {} if register_on is None else {("Z" if "Z" in letters else "C"): register_on})
    if not set(choice) <= {"C", "Z"} & set(letters):
        raise ValueError(f"register_on names axes {sorted(choice)} that are not C or Z axes of {letters!r}")
    stack, current = array, letters
    what = []
    if "Z" in current:
        pick = choice.get("Z", "max")
        axis = current.index("Z")
        if pick == "max":
            stack = stack.max(axis=axis) if hasattr(stack, "max") else np.asarray(stack).max(axis=axis)
            what.append("the maximum projection over Z")
        else:
            stack = _take(stack, axis, pick, "plane", np.shape(stack)[axis])
            what.append(f"plane {int(pick)}")
        current = current.replace("Z", "")
    if "C" in current:
        pick = choice.get("C")
        axis = current.index("C")
        if pick is None:
            what.append("all channels jointly")
        else:
            stack = _take(stack, axis, pick, "channel", np.shape(stack)[axis])
            current = current.replace("C", "")
            what.append(f"channel {int(pick)}")
    order = [current.index(a) for a in "TYX"] + ([current.index("C")] if "C" in current else [])
    if order != list(range(len(order))):
        stack = _moveaxes(stack, order)
    return stack, ", ".join(what)


def _take(stack, axis: int, index, what: str, size: int):
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -size <= int(index) < size:
        raise ValueError(f"register_on {what} must be an index in 0..{size - 1}" +
                         (" or 'max'" if what == "plane" else " or None (all channels)") + f", got {index!r}")
    key = [slice(None)] * len(np.shape(stack))
    key[axis] = int(index)
    return stack[tuple(key)]


def _moveaxes(stack, order: list[int]):
    transpose = getattr(stack, "transpose", None)
    return transpose(order) if transpose is not None else np.transpose(stack, order)


# -- the reference grid -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceGrid:
    """Where registered frames land.

    shape: (rows, cols) of the grid at the fit's resolution. transforms: (T, 3, 3) frame pixel -> grid pixel
    ("napari-nir" convention) for matrix motions, None for flow. positions(t, grid_xy (N, 2) (col, row) grid
    pixels) -> (N, 2) (col, row) pixels of frame t: the general map (flow models need it).
    """

    shape: tuple[int, int]
    transforms: np.ndarray | None
    positions: Callable[[int, np.ndarray], np.ndarray]

    def scaled(self, factor: float, frame_shape: tuple[int, int]) -> ReferenceGrid:
        """The same grid for another resolution of the same data: ``factor`` pixels per fitted pixel (the array's
        frames are ``frame_shape``); pixel centres map as (c + 0.5) * factor - 0.5."""
        if factor == 1.0:
            return self
        s = np.array([[factor, 0, 0.5 * factor - 0.5], [0, factor, 0.5 * factor - 0.5], [0, 0, 1.0]])
        s_inv = np.linalg.inv(s)
        shape = (max(1, round(self.shape[0] * factor)), max(1, round(self.shape[1] * factor)))
        transforms = None if self.transforms is None else np.einsum("ij,tjk,kl->til", s, self.transforms, s_inv)

        def positions(t: int, grid_xy: np.ndarray) -> np.ndarray:
            low = transform_points(s_inv, grid_xy)
            return transform_points(s, self.positions(t, low))

        return ReferenceGrid(shape, transforms, positions)


def matrices_grid(frame_to_reference: np.ndarray, frame_shape: tuple[int, int], extent: str) -> ReferenceGrid:
    """The grid of a matrix motion: ``frame_to_reference`` (T, 3, 3) frame pixel -> reference pixel (a grid of
    the frame's size); "union" shifts it by whole pixels and grows it to hold every frame's outline."""
    h, w = frame_shape
    m = frame_to_reference / frame_to_reference[:, 2:3, 2:3]
    shape = (h, w)
    if extent == "union":
        corners = np.array([[-0.5, -0.5, 1], [w - 0.5, -0.5, 1], [w - 0.5, h - 0.5, 1], [-0.5, h - 0.5, 1]]).T
        pts = np.einsum("tij,jk->tik", m, corners)
        pts = pts[:, :2] / pts[:, 2:3]
        lo = np.floor(pts.min(axis=(0, 2)) + 0.5)             # (col, row) of the grid's first pixel centre
        hi = np.ceil(pts.max(axis=(0, 2)) - 0.5)
        cols, rows = int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1
        if rows * cols > _MAX_GRID_PIXELS:
            raise ValueError(f"the union of the registered frames would be {rows} x {cols} pixels: the alignment "
                             "moves frames far apart; use extent='frame'")
        shift = np.array([[1, 0, -lo[0]], [0, 1, -lo[1]], [0, 0, 1.0]])
        m = np.einsum("ij,tjk->tik", shift, m)
        shape = (rows, cols)
    inverse = np.linalg.inv(m)
    return ReferenceGrid(shape, m, lambda t, grid_xy: transform_points(inverse[t], grid_xy))


def transform_points(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(N, 2) points through a 3x3 homography (float64)."""
    xy = np.asarray(xy, dtype=np.float64)
    out = xy @ matrix[:2, :2].T + matrix[:2, 2]
    den = xy @ matrix[2, :2] + matrix[2, 2]
    return out / den[:, None]


def grid_points(shape: tuple[int, int], r0: int = 0, r1: int | None = None, c0: int = 0) -> np.ndarray:
    """(N, 2) float64 (col, row) pixel centres of rows r0..r1 and columns c0.. of a (rows, cols) grid, row-major."""
    rows, cols = shape
    r1 = rows if r1 is None else r1
    cc, rr = np.meshgrid(np.arange(c0, cols, dtype=np.float64), np.arange(r0, r1, dtype=np.float64))
    return np.stack([cc.ravel(), rr.ravel()], 1)


# -- resampling -----------------------------------------------------------------------------------------
def resample_frame(frame: np.ndarray, positions: np.ndarray, out_shape: tuple[int, int], order: int,
                   fill: float) -> np.ndarray:
    """One frame (..., Y, X) of any real dtype sampled at (N, 2) (col, row) positions -> (..., rows, cols).

    Same dtype as ``frame``; integers rounded and never outside the frame's own value range (cubic
    overshoot is clipped to [min, max] of the frame, floats too); positions outside the frame (beyond its
    outer pixel edges) get ``fill``. order 0 copies values (labels stay labels).
    """
    frame = np.asarray(frame)
    y, x = frame.shape[-2:]
    lead = frame.shape[:-2]
    coords = np.stack([positions[:, 1], positions[:, 0]])          # (row, col) for scipy
    outside = ((coords[0] < -0.5) | (coords[0] > y - 0.5) | (coords[1] < -0.5) | (coords[1] > x - 0.5))
    dtype = frame.dtype
    out = np.empty(lead + out_shape, dtype=dtype)
    integer = dtype.kind in "iub"
    for index in np.ndindex(*lead):
        plane = frame[index]
        if order == 0:
            values = map_coordinates(plane, coords, order=0, mode="nearest")
        else:
            source = plane if dtype.kind == "f" and dtype.itemsize >= 4 else plane.astype(np.float64)
            values = map_coordinates(source, coords, order=order, mode="nearest")
            if order > 1:  # cubic splines overshoot at edges: keep the frame's own range
                np.clip(values, plane.min(), plane.max(), out=values)
            if integer:
                values = np.rint(values)
        values = values.astype(dtype, copy=False)
        values[outside] = _fill_value(fill, dtype)
        out[index] = values.reshape(out_shape)
    return out


def _fill_value(fill: float, dtype: np.dtype):
    if dtype.kind == "f":
        return fill
    if dtype.kind == "b":
        return bool(fill)
    info = np.iinfo(dtype)
    if not math.isfinite(fill):
        return 0
    return min(max(int(round(fill)), info.min), info.max)


def resample_stack(array, axes: str, grid: ReferenceGrid, order: int, fill: float = 0.0,
                   first_frame: int = 0) -> np.ndarray:
    """Every frame of ``array`` (axes with T, Y, X; any others) on ``grid`` -> numpy array in the same axes
    order with Y, X replaced by the grid's rows, cols; the same dtype. Reads one frame at a time (numpy,
    dask, zarr), so a lazy array is computed frame by frame. ``first_frame``: the fit's frame that the array's
    first T entry is (a block of a longer stack)."""
    t_axis = axes.index("T")
    shape = tuple(int(s) for s in np.shape(array))
    rows, cols = grid.shape
    # per frame: the axes without T, with Y and X moved last (the order resample_frame reads)
    rest = axes.replace("T", "")
    to_yx = [i for i, a in enumerate(rest) if a not in "YX"] + [rest.index("Y"), rest.index("X")]
    back = list(np.argsort(to_yx))
    out_shape = list(shape)
    out_shape[axes.index("Y")], out_shape[axes.index("X")] = rows, cols
    out = np.empty(out_shape, dtype=np.dtype(getattr(array, "dtype", np.float64)))
    band = max(1, (1 << 20) // max(cols, 1))
    for k in range(shape[t_axis]):
        t = first_frame + k
        key = [slice(None)] * len(shape)
        key[t_axis] = k
        frame = np.asarray(array[tuple(key)])
        frame = np.transpose(frame, to_yx)
        planes = []
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            positions = grid.positions(t, grid_points(grid.shape, r0, r1))
            planes.append(resample_frame(frame, positions, (r1 - r0, cols), order, fill))
        done = np.concatenate(planes, axis=-2) if len(planes) > 1 else planes[0]
        okey = [slice(None)] * len(shape)
        okey[t_axis] = k
        out[tuple(okey)] = np.transpose(done, back)
    return out
