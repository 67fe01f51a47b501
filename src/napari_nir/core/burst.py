"""Input checking and normalisation of a burst, and its exact inverse.

A burst is a stack of frames of one scene: ``(T, H, W)`` grey or ``(T, H, W, C)`` with any ``C >= 1``
(RGB, RGBA, multichannel), of any integer or float dtype. :func:`prepare_burst` validates it and maps every
channel to the working range [0, 1] (``working = (x - lo) / scale`` with ``lo`` the channel minimum and
``scale`` its range); :meth:`Burst.restore` maps model outputs back to the input's units and dtype.

Precision: working values are float32 (24-bit significand). For integer inputs whose per-channel range is at
most 2**24 the round trip ``b.restore(b.data)`` is bit exact. Wider integer ranges (int32/int64/uint32/uint64
spanning more than 2**24 levels) come back with errors below ``range / 2**24`` (a few units in the last of
24 bits). 64-bit integers are handled without overflow or loss in the offset arithmetic even near the dtype's
extremes (the offset from the minimum is computed exactly in integers, never as ``float(x) - float(lo)``).

Pure numpy: no napari, Qt or magicgui imports.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["Burst", "prepare_burst", "working_shape", "working_frames", "resized_frames", "check_channels_last",
           "check_shape", "check_dtype"]

MIN_SIZE = 8                 # smallest height/width that can be aligned
_CHUNK = 1 << 20             # elements per float64 temporary (8 MiB)


@dataclass(frozen=True, eq=False)
class Burst:
    """A validated, normalised burst ready for fitting.

    data:   (T, H, W, C) float32, C-contiguous, a new array, each channel mapped to [0, 1] (working units).
    layout: "THW" (input was 3-D; C == 1 here) or "THWC".
    dtype:  the input's dtype (restored outputs use it).
    lo:     (C,) float64 per-channel minimum of the input (input units).
    scale:  (C,) float64 per-channel (max - min) in input units; 1.0 for a constant channel.
    lo_exact: (C,) exact integer minima (Python ints) for integer inputs, or None (then derived from ``lo``).
        Only matters for 64-bit integers beyond 2**53, where float64 ``lo`` is rounded.
    """

    data: np.ndarray
    layout: str
    dtype: np.dtype
    lo: np.ndarray
    scale: np.ndarray
    lo_exact: tuple | None = None

    @property
    def T(self) -> int:
        """Number of frames."""
        return int(self.data.shape[0])

    @property
    def H(self) -> int:
        """Frame height in pixels."""
        return int(self.data.shape[1])

    @property
    def W(self) -> int:
        """Frame width in pixels."""
        return int(self.data.shape[2])

    @property
    def C(self) -> int:
        """Number of channels (1 for a grey "THW" burst)."""
        return int(self.data.shape[3])

    @property
    def shape(self) -> tuple:
        """The input's shape: (T, H, W) for layout "THW", (T, H, W, C) for "THWC"."""
        return (self.T, self.H, self.W) if self.layout == "THW" else (self.T, self.H, self.W, self.C)

    # -- mappings ---------------------------------------------------------------------------------
    def _lo_ints(self) -> list[int]:
        if self.lo_exact is not None:
            return [int(v) for v in self.lo_exact]
        info = np.iinfo(self.dtype)
        return [min(max(int(round(float(v))), info.min), info.max) for v in self.lo]

    def restore(self, x, *, dtype: str = "input") -> np.ndarray:
        """Map working-range values back to the input's units.

        x: (..., H', W', C) float array in working units whose last axis is C (any leading axes and sizes,
           e.g. a canonical view (H', W', C) or frames (T, H, W, C)). Values outside [0, 1] are allowed.
        Returns ``x * scale + lo`` with shape (..., H', W', C), or (..., H', W') when layout == "THW".
        dtype="input": cast to the input dtype. Integers are rounded half to even and clipped to the dtype's
            limits (no wrap-around; NaN maps to the channel minimum); floats are clipped to the dtype's finite
            range. dtype="float32": float32 in input units, unrounded and unclipped.
        """
        if not isinstance(dtype, str) or dtype not in ("input", "float32"):
            raise ValueError(f"restore(dtype={dtype!r}) is not supported; use dtype='input' (the burst's own dtype, "
                             f"{np.dtype(self.dtype).name}) or dtype='float32' (float32 in the burst's units)")
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.C:
            raise ValueError(f"restore() needs an array whose last axis is the {self.C} channel(s) of the burst, "
                             f"got shape {x.shape}; for a grey burst add the channel axis with x[..., None]")
        if x.dtype.kind not in "fiu":
            raise TypeError(f"restore() needs a real float array in working units, got dtype {x.dtype}; "
                            f"convert it with x.astype(np.float32)")
        in_dtype = np.dtype(self.dtype)
        out_dtype = np.dtype(np.float32) if dtype == "float32" else in_dtype
        out = np.empty(x.shape, dtype=out_dtype)
        src, dst = _rows(x, self.C), out.reshape(-1, self.C)
        kind = "float" if dtype == "float32" or in_dtype.kind == "f" else (
            "wide" if in_dtype.itemsize == 8 else "int")
        scale = np.asarray(self.scale, dtype=np.float64)
        lo = np.asarray(self.lo, dtype=np.float64)
        if kind == "float":
            lim = None
            if dtype == "input" and out_dtype.itemsize <= 8:
                fi = np.finfo(out_dtype)
                lim = (float(fi.min), float(fi.max))
            for sl in _chunks(src.shape[0], self.C):
                v = src[sl].astype(np.float64)
                v *= scale
                v += lo
                if lim is not None:
                    np.clip(v, lim[0], lim[1], out=v)
                dst[sl] = v
        elif kind == "int":
            info = np.iinfo(in_dtype)
            lo_i = np.asarray(self._lo_ints(), dtype=np.float64)   # exact: |lo| < 2**32
            for sl in _chunks(src.shape[0], self.C):
                v = src[sl].astype(np.float64)
                v *= scale
                np.rint(v, out=v)
                v[np.isnan(v)] = 0.0                                 # NaN -> the channel minimum
                v += lo_i
                np.clip(v, float(info.min), float(info.max), out=v)
                dst[sl] = v.astype(in_dtype)
        else:
            self._restore_wide(src, dst, scale, in_dtype)
        return out[..., 0] if self.layout == "THW" else out

    def _restore_wide(self, src: np.ndarray, dst: np.ndarray, scale: np.ndarray, dtype: np.dtype) -> None:
        """64-bit integer outputs: offset = rint(x * scale) clipped so that lo + offset stays in the dtype,
        then added to the exact integer minimum in wrapping uint64 arithmetic (exact since the true sum fits)."""
        info = np.iinfo(dtype)
        lo_ints = self._lo_ints()
        lo_u = np.array([v % (1 << 64) for v in lo_ints], dtype=np.uint64)
        lower = np.array([_float_toward_zero(info.min - v) for v in lo_ints])
        upper = np.array([_float_toward_zero(info.max - v) for v in lo_ints])
        for sl in _chunks(src.shape[0], self.C):
            xs = src[sl]
            off = xs.astype(np.float64)
            off *= scale
            np.rint(off, out=off)
            off[np.isnan(off)] = 0.0                       # NaN -> the channel minimum
            above, below = off > upper, off < lower        # beyond the dtype: saturate exactly at its limits
            np.clip(off, lower, upper, out=off)
            neg = off < 0
            mag = np.abs(off).astype(np.uint64)
            mag[neg] = np.negative(mag[neg])             # two's complement in uint64
            res = mag + lo_u                             # wraps modulo 2**64: exact result
            res = res.view(np.int64) if dtype.kind == "i" else res
            res[above] = info.max
            res[below] = info.min
            dst[sl] = res

    def to_working(self, x) -> np.ndarray:
        """Forward mapping for another array in input units with the same layout (e.g. ground truth).

        x: (..., H', W') for layout "THW" or (..., H', W', C) for "THWC", any real dtype, input units.
        Returns (..., H', W', C) float32 ``(x - lo) / scale`` (not clipped to [0, 1]).
        """
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise TypeError(f"to_working() needs a real integer or float array, got dtype {x.dtype}; "
                            f"convert it with x.astype(np.float32)")
        if self.layout == "THW":
            x = x[..., None]
        elif x.ndim < 1 or x.shape[-1] != self.C:
            raise ValueError(f"to_working() needs an array whose last axis is the {self.C} channel(s) of the burst, "
                             f"got shape {x.shape}")
        out = np.empty(x.shape, dtype=np.float32)
        src, dst = _rows(x, self.C), out.reshape(-1, self.C)
        lo_ints = self._lo_ints() if np.dtype(self.dtype).kind in "iu" else None
        for sl in _chunks(src.shape[0], self.C):
            dst[sl] = _to_working_block(src[sl], np.asarray(self.lo, dtype=np.float64), lo_ints,
                                        np.asarray(self.scale, dtype=np.float64))
        return out

    def __repr__(self) -> str:
        return (f"Burst(shape={self.shape}, layout={self.layout!r}, dtype={np.dtype(self.dtype).name}, "
                f"lo={np.asarray(self.lo).tolist()}, scale={np.asarray(self.scale).tolist()})")


# -- helpers --------------------------------------------------------------------------------------
def _rows(x: np.ndarray, C: int) -> np.ndarray:
    """(..., C) -> (N, C) (a view when possible)."""
    return x.reshape(-1, C)


def _chunks(n_rows: int, C: int):
    step = max(1, _CHUNK // max(1, C))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _float_toward_zero(n: int) -> float:
    """The float64 nearest to integer n that is not farther from zero than n."""
    f = float(n)
    if abs(int(f)) > abs(n):
        f = float(np.nextafter(f, 0.0))
    return f


def _offset_f64(block: np.ndarray, lo: np.ndarray, lo_ints: list[int] | None) -> np.ndarray:
    """(N, C) block in input units -> (N, C) float64 ``x - lo``, exact up to one final rounding.

    64-bit integers are split into 32-bit halves so that no value is rounded before the subtraction."""
    if block.dtype.kind in "iu" and lo_ints is not None and (
            block.dtype.itemsize == 8 or any(abs(v) >= 2 ** 53 for v in lo_ints)):
        if block.dtype == np.uint64:
            hi = (block >> np.uint64(32)).astype(np.int64)
            low = (block & np.uint64(0xFFFFFFFF)).astype(np.int64)
        else:
            block = block.astype(np.int64, copy=False)
            hi = block >> np.int64(32)
            low = block & np.int64(0xFFFFFFFF)
        lo_hi = np.array([v >> 32 for v in lo_ints], dtype=np.int64)
        lo_low = np.array([v & 0xFFFFFFFF for v in lo_ints], dtype=np.int64)
        out = (hi - lo_hi).astype(np.float64)
        out *= 4294967296.0
        out += (low - lo_low).astype(np.float64)
        return out
    if block.dtype.kind in "iu" and lo_ints is not None:
        out = block.astype(np.float64)
        out -= np.asarray(lo_ints, dtype=np.float64)            # exact: |values| < 2**53
        return out
    out = block.astype(np.float64)
    out -= lo
    return out


def _to_working_block(block, lo, lo_ints, scale) -> np.ndarray:
    out = _offset_f64(block, lo, lo_ints)
    out /= scale
    return out


def _as_numpy(burst, name: str) -> np.ndarray:
    """Any array-like (numpy, dask, zarr, xarray, torch, nested lists) -> numpy array, never copied needlessly."""
    if isinstance(burst, Burst):
        raise TypeError(f"{name} is already a prepared Burst; pass the original array, or use it directly")
    mod = type(burst).__module__ or ""
    try:
        if mod.startswith("torch") and hasattr(burst, "detach"):
            return burst.detach().cpu().numpy()
        if not isinstance(burst, np.ndarray) and callable(getattr(burst, "compute", None)):
            burst = burst.compute()                          # dask / xarray: load lazily-held data
        return np.asarray(burst)
    except ValueError as e:
        raise ValueError(f"{name} could not be made into one array ({e}); all frames must have the same shape "
                         f"and dtype: stack them with np.stack(frames)") from e


_DTYPE_FIXES = {
    "b": "a boolean mask is not an image; convert it with {name}.astype(np.float32) if it really is the data",
    "c": "complex data has no single intensity; pass np.abs({name}) (magnitude) or {name}.real",
    "O": "convert it to a numeric array, e.g. np.asarray({name}, dtype=np.float32)",
    "U": "text is not image data; convert it to numbers, e.g. {name}.astype(np.float32)",
    "S": "bytes are not image data; convert them to numbers, e.g. {name}.astype(np.float32)",
    "M": "dates are not image data; convert to numbers first, e.g. {name}.astype('int64').astype(np.float32)",
    "m": "time spans are not image data; convert to numbers first, e.g. {name}.astype('int64').astype(np.float32)",
    "V": "structured/record arrays are not supported; pick a numeric field, e.g. {name}['field'].astype(np.float32)",
}


def _check_dtype(a: np.ndarray, name: str) -> None:
    check_dtype(a.dtype, name)


def check_dtype(dtype: np.dtype, name: str = "burst") -> None:
    """TypeError (saying how to convert) unless ``dtype`` is an integer or float dtype."""
    kind = np.dtype(dtype).kind
    if kind in "iuf":
        return
    fix = _DTYPE_FIXES.get(kind, "convert it with {name}.astype(np.float32)").format(name=name)
    raise TypeError(f"{name} has dtype {np.dtype(dtype)} (kind {kind!r}), which is not supported; bursts must be "
                    f"integer or float images (uint8, uint16, float32, ...); {fix}")


def _check_shape(a: np.ndarray, name: str, min_frames: int) -> None:
    check_shape(a.shape, name, min_frames)


def check_shape(shape: tuple, name: str = "burst", min_frames: int = 2) -> None:
    """ValueError (saying what to do) unless ``shape`` is a burst's: (T, H, W[, C]), T >= min_frames, H, W >= 8.
    Only the shape: callers check it before reading or copying the data (the memory check needs it)."""
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"{name} is {ndim}-D (shape {shape}); a burst is a stack of images (T, H, W) for grey or "
                         f"(T, H, W, C) for colour/multichannel, with at least {min_frames} frames")
    if ndim == 2:
        raise ValueError(f"{name} is a single 2-D image (shape {shape}); stack at least {min_frames} frames along a "
                         f"new first axis, e.g. np.stack([frame0, frame1, ...]) -> (T, H, W)")
    if ndim > 4:
        raise ValueError(f"{name} is {ndim}-D (shape {shape}); a burst must be (T, H, W) or (T, H, W, C); "
                         f"select one burst, e.g. {name}[0] for a leading batch/z axis, or reshape the extra axes "
                         f"into T or C")
    axes = ["T (frames)", "H (height)", "W (width)", "C (channels)"][:ndim]
    for ax, (n, label) in enumerate(zip(shape, axes)):
        if n == 0:
            raise ValueError(f"{name} is empty: axis {ax}, {label}, has size 0 (shape {shape}); pass a burst with "
                             f"at least {min_frames} frames of at least {MIN_SIZE}x{MIN_SIZE} pixels")
    T, H, W = shape[:3]
    if T < min_frames:
        raise ValueError(f"{name} has {T} frame{'s' if T != 1 else ''} (shape {shape}); fusion needs at least "
                         f"{min_frames} frames stacked along the first axis (T, H, W[, C])")
    if H < MIN_SIZE or W < MIN_SIZE:
        hint = ""
        if ndim == 3 and W <= 4 and T >= MIN_SIZE and H >= MIN_SIZE:
            hint = (f"; shape {shape} looks like a single colour image (H, W, C): a burst needs several such "
                    f"images stacked, e.g. np.stack([img0, img1, ...]) -> (T, H, W, C)")
        elif ndim == 4 and H < MIN_SIZE and shape[3] >= MIN_SIZE:
            hint = (f"; if channels (or planes) come before height and width (T, C, H, W), say so with "
                    f"axes='TCYX' (command line: --axes TCYX), or move them last with np.moveaxis({name}, 1, -1)")
        raise ValueError(f"{name} frames are {H}x{W} pixels (shape {shape}); frames must be at least "
                         f"{MIN_SIZE}x{MIN_SIZE} pixels to be aligned{hint}")


def _check_finite(rows: np.ndarray, shape: tuple, name: str) -> None:
    """rows: (N, C) float view of the input; shape: the input's shape (for reporting indices)."""
    bad, first = 0, None
    C = rows.shape[1]
    for sl in _chunks(rows.shape[0], C):
        nf = ~np.isfinite(rows[sl])
        n = int(np.count_nonzero(nf))
        if n and first is None:
            r, c = np.argwhere(nf)[0]
            flat = (sl.start + int(r)) * C + int(c)
            first = tuple(int(i) for i in np.unravel_index(flat, shape))
            first_val = rows[sl][r, c]
        bad += n
    if bad:
        raise ValueError(f"{name} contains {bad} non-finite value{'s' if bad != 1 else ''} (NaN or Inf) out of "
                         f"{rows.size}; the first is {first_val} at index {first}; replace them first, e.g. "
                         f"np.nan_to_num({name}, nan=0.0, posinf=..., neginf=...) or by interpolating the "
                         f"missing pixels")


def check_channels_last(shape, name: str = "burst") -> None:
    """Refuse a 4-D array read as (T, H, W, C) whose C is longer than 4 and than its H: that is a channel- (or
    plane-) first stack (T, C, H, W), which would otherwise be fitted as frames of C x W pixels with H channels.
    Callers that were told the axes (``axes='TYXC'``) skip this check."""
    if len(shape) == 4 and shape[3] > 4 and shape[3] > shape[1]:
        raise ValueError(f"{name} has shape {tuple(shape)}: read as (T, H, W, C) it would be {shape[0]} frames of "
                         f"{shape[1]}x{shape[2]} pixels with {shape[3]} channels, which looks like channels or planes "
                         f"before height and width (T, C, H, W); say so with axes='TCYX' or 'TZYX' (command line: "
                         f"--axes TCYX) or move them last with np.moveaxis({name}, 1, -1); if it really is "
                         f"{shape[3]} channels last, axes='TYXC'")


def prepare_burst(burst, *, name: str = "burst", min_frames: int = 2) -> Burst:
    """Validate a burst and map it to float32 working units.

    burst: (T, H, W) grey or (T, H, W, C) any C >= 1; numpy, dask, zarr, xarray, torch or nested lists; any
        integer (int8..int64, uint8..uint64) or float (float16, float32, float64) dtype; T >= min_frames,
        H, W >= 8, all values finite, not constant everywhere.
    name: how the array is called in error messages.
    Returns a :class:`Burst` whose ``data`` is a new (T, H, W, C) float32 array with each channel in [0, 1]
    (``(x - min) / (max - min)``, computed in float64 block by block). The caller's array is never written.

    Raises TypeError for an unsupported dtype and ValueError for a bad shape, too few frames, tiny frames,
    non-finite values or a constant burst; each message says what is wrong and how to fix it.
    Precision: see the module docstring (bit-exact round trip for integer ranges up to 2**24).
    """
    a = _as_numpy(burst, name)
    _check_dtype(a, name)
    _check_shape(a, name, int(min_frames))
    layout = "THW" if a.ndim == 3 else "THWC"
    C = 1 if a.ndim == 3 else a.shape[3]
    rows = a.reshape(-1, C)                  # a view unless the input is non-contiguous
    is_float = a.dtype.kind == "f"
    if is_float:
        _check_finite(rows, a.shape, name)

    mins, maxs = rows.min(axis=0), rows.max(axis=0)
    if is_float:
        lo = mins.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            scale = maxs.astype(np.float64) - lo
        lo_ints = None
        if not np.all(np.isfinite(lo)) or not np.all(np.isfinite(scale)):
            raise ValueError(f"{name} spans a range too wide for float64 arithmetic (min {mins.tolist()}, "
                             f"max {maxs.tolist()}); rescale it first, e.g. {name} / np.abs({name}).max()")
    else:
        lo_ints = [int(v) for v in mins]
        spans = [int(hi) - lo_i for hi, lo_i in zip(maxs, lo_ints)]
        lo = np.array([float(v) for v in lo_ints], dtype=np.float64)
        scale = np.array([float(s) for s in spans], dtype=np.float64)
    if np.all(scale == 0):
        vals = mins.tolist()
        desc = f"every value is {vals[0]}" if len(set(vals)) == 1 else f"each channel is constant: {vals}"
        raise ValueError(f"{name} is constant ({desc}; shape {a.shape}, dtype {a.dtype}): there is nothing to fuse "
                         f"or separate; check that the right layer or array was passed")
    scale = np.where(scale == 0, 1.0, scale)

    data = np.empty((a.shape[0], a.shape[1], a.shape[2], C), dtype=np.float32)
    dst = data.reshape(-1, C)
    for sl in _chunks(rows.shape[0], C):
        dst[sl] = _to_working_block(rows[sl], lo, lo_ints, scale)
    return Burst(data=data, layout=layout, dtype=np.dtype(a.dtype), lo=lo, scale=scale,
                 lo_exact=tuple(lo_ints) if lo_ints is not None else None)


def working_shape(input_shape, working_size: int) -> tuple[int, int, int, int]:
    """(T, h, w, C) of the working frames for an input (T, H, W[, C]): downscaled so that the longer side is at
    most ``working_size`` (0: no limit), never below 8 pixels."""
    if isinstance(working_size, bool) or not isinstance(working_size, numbers.Integral):
        raise TypeError(f"working_size must be an integer number of pixels (0: no limit), got {working_size!r}")
    working_size = int(working_size)
    t, h, w = (int(v) for v in input_shape[:3])
    c = int(input_shape[3]) if len(input_shape) > 3 else 1
    longest = max(h, w)
    if working_size <= 0 or longest <= working_size:
        return (t, h, w, c)
    factor = working_size / longest
    return (t, max(8, round(h * factor)), max(8, round(w * factor)), c)


def working_frames(burst: Burst, working_size: int) -> tuple[np.ndarray, float]:
    """(T, h, w, C) float32 frames for fitting (their shape: ``working_shape``) and the factor fit pixels /
    input pixels (<= 1)."""
    _, h, w, _ = working_shape(burst.data.shape, working_size)
    if (h, w) == (burst.H, burst.W):
        return burst.data, 1.0
    return resized_frames(burst.data, (h, w)), w / burst.W


def resized_frames(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(T, H, W, C) float32 frames resized to (T, h, w, C): bilinear with anti-aliasing (scikit-image), which keeps
    the normalised coordinates of geometry.Normaliser: a point has the same (x, y) at both sizes."""
    from skimage.transform import resize  # here: scikit-image's import is slow and most bursts need no resize

    h, w = shape
    out = np.empty((len(frames), h, w, frames.shape[3]), dtype=np.float32)  # frame by frame: no stacked temporaries
    for t, frame in enumerate(frames):
        out[t] = resize(frame, (h, w), order=1, anti_aliasing=True)
    return out
