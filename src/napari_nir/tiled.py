"""Tiled fusion: bursts whose frames are too large to hold in memory, fused to a zarr array tile by tile.

``fuse_tiled(burst, "out.zarr")`` reads the burst lazily (a dask, zarr or numpy array, a ``*.zarr`` path or a
multi-page TIFF), and never holds a full-resolution frame as float:

1. the motion is fitted by ``napari_nir.fuse`` on a copy reduced by k x k block means to at most ``working_size``
   px on the longer side, built a band of rows at a time (``fit_downsampled``);
2. the fit's matrices are carried to the input's pixels (``full_resolution_grid``; ``core/tiles.py``);
3. the fused view on the canonical "union" grid is computed in ``tile`` x ``tile`` tiles, one Dask task each,
   every tile reading only the windows of the frames it needs (``lazy_canonical``), and written chunk by chunk
   to a zarr array whose chunks are the tiles, with the fit's provenance as attributes.

The fused view is the mean of the registered input frames (linear interpolation) over the frames that cover
each pixel: the neural field is used for the motion only (its own canonical view, at working size, is
``fit.canonical()``). Tiling cannot create seams (core/tiles.py). Matrix motions only (homography, translation,
rigid, similarity, affine): the flow models' per-pixel motion is refused.

Files: a TIFF is read through tifffile's zarr store; a TIFF written in tiles or strips is read in pieces, one
whose pages are single strips is read a whole page per window (correct but slow). The output is written to a
hidden folder beside ``output`` and renamed to it when complete: an interrupted or failed run leaves no output.
With a dask.distributed client the workers open the input path and write the output folder themselves: both
must be on a file system they see (an in-memory array travels with every task).

Limitations: the frames are averaged as they are (a per-frame exposure the fit learned is not applied); one
global motion per frame (a per-tile local motion would need overlapping tiles and blending, module docstring of
core/tiles.py); the flow models are refused.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .core import tiles
from .core.burst import check_channels_last, check_dtype, check_shape
from .core.memory import usable_cores
from .core.motions import get_motion
from .core.registration import ReferenceGrid
from .io import replace_folder

__all__ = ["LazyBurst", "fit_downsampled", "full_resolution_grid", "lazy_canonical", "fuse_tiled"]

READ_ELEMENTS = 1 << 23   # values read at once while building the downsampled copy
WORKER_MEMORY = 1 << 30   # bytes the tiles running at once may hold together (sets the default thread count)
TIFF_SUFFIXES = (".tif", ".tiff")


class LazyBurst:
    """A burst (T, H, W[, C]) read window by window, never whole.

    burst: a numpy, dask or zarr array (or any array with ``shape``, ``dtype`` and numpy slicing), a path to a
    zarr array (``*.zarr``), or a path to a TIFF file (its first series, through tifffile's zarr store). Shape
    and dtype are checked as ``napari_nir.fuse`` checks them (T >= 2, H, W >= 8, integer or float). Picklable
    (a path is reopened in each process, as dask.distributed workers need)."""

    def __init__(self, burst):
        if isinstance(burst, LazyBurst):
            burst = burst._path if burst._path is not None else burst._array
        self._path = os.fspath(burst) if isinstance(burst, (str, os.PathLike)) else None
        self._array = None if self._path is not None else burst
        self._store = None
        array = self.array
        if not hasattr(array, "shape") or not hasattr(array, "dtype"):
            raise TypeError(f"the burst must be an array with shape and dtype (numpy, dask, zarr) or a path to a "
                            f"*.zarr array or a TIFF file, got {type(burst).__name__}")
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        check_dtype(self.dtype)
        check_shape(self.shape)
        check_channels_last(self.shape)
        self._dask = type(array).__module__.startswith("dask.")

    @property
    def array(self):
        """The underlying array (opened on first use for a path)."""
        if self._array is None:
            self._array, self._store = _open_path(self._path)
        return self._array

    @property
    def frames(self) -> int:
        return self.shape[0]

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """(H, W) or (H, W, C)."""
        return self.shape[1:]

    def read(self, t: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Frame t, rows y0:y1, cols x0:x1 -> numpy (y1 - y0, x1 - x0[, C]) in the input's dtype."""
        part = self.array[int(t), y0:y1, x0:x1]
        if self._dask:
            part = part.compute(scheduler="sync")  # inside a tile's task: no second thread pool
        return np.asarray(part)

    def close(self) -> None:
        """Close a file opened from a path (the array is reopened on the next read)."""
        if self._store is not None:
            close = getattr(self._store, "close", None)
            if close is not None:
                close()
            self._array = self._store = None

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._path is not None:
            state["_array"] = state["_store"] = None
        return state


def _open_path(path: str):
    """(array, store to close or None) for a ``*.zarr`` array or a TIFF file."""
    import zarr

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        store = tifffile.imread(p, aszarr=True)
        node = zarr.open(store, mode="r")
        if isinstance(node, zarr.Group):  # a pyramid: level 0 is full resolution
            node = node["0"]
        return node, store
    if p.suffix.lower() == ".zarr" or p.is_dir():
        node = zarr.open(str(p), mode="r")
        if isinstance(node, zarr.Group):
            names = sorted(name for name, _ in node.arrays())
            raise ValueError(f"{p} is a zarr group, not an array; pass one of its arrays, e.g. "
                             f"{p / names[0] if names else p / 'name'}")
        return node, None
    raise ValueError(f"cannot read {p} lazily: give a *.zarr array, a TIFF file (*.tif, *.tiff) or an array")


def fit_downsampled(burst, motion: str = "homography", *, working_size: int = 1024, **options):
    """Fit the motion on the burst reduced by k x k block means -> (FusionResult, k).

    burst: anything ``LazyBurst`` reads. working_size: the longest side of the reduced frames, in px (0: no
    reduction); k = ceil(max(H, W) / working_size), and the reduced frames are (H // k, W // k[, C]) float32 in
    the input's units, built one band of rows at a time; the fit gets the same ``working_size`` (it overrides
    the preset's), so it runs on these frames as they are. motion: a matrix motion (homography, translation,
    rigid, similarity, affine). options: anything else ``napari_nir.fuse`` takes (preset, steps, device, seed,
    callback, ...)."""
    import napari_nir as nir

    if get_motion(motion).alignment != "matrices":
        raise ValueError(f"tiled fusion needs a motion with one matrix per frame (homography, translation, rigid, "
                         f"similarity, affine); {motion!r} fits a per-pixel flow at working size, which is not "
                         "carried to full resolution")
    source = burst if isinstance(burst, LazyBurst) else LazyBurst(burst)
    factor = tiles.block_factor(source.frame_shape, working_size)
    h, w = tiles.downsampled_shape(source.frame_shape, factor)
    if min(h, w) < 8:
        raise ValueError(f"frames of {source.frame_shape[0]} x {source.frame_shape[1]} px reduced {factor} times "
                         f"to fit working_size={working_size} would be {h} x {w} px, too small to align; use a "
                         "larger working_size")
    row_values = source.frame_shape[1] * (source.frame_shape[2] if len(source.frame_shape) > 2 else 1)
    rows_per_read = max(factor, READ_ELEMENTS // max(1, row_values))
    small = np.stack([
        tiles.downsample_frame(functools.partial(_read_rows, source, t), source.frame_shape, factor, rows_per_read)
        for t in range(source.frames)])
    return nir.fuse(small, motion, working_size=working_size, **options), factor


def _read_rows(source: LazyBurst, t: int, r0: int, r1: int) -> np.ndarray:
    return source.read(t, r0, r1, 0, source.frame_shape[1])


def full_resolution_grid(fit, factor: int, frame_shape: tuple[int, ...]) -> ReferenceGrid:
    """The canonical "union" grid at the input's resolution for a fit of its k x k block means (``fit_downsampled``);
    frame_shape: the input's (H, W[, C]). Its ``transforms`` map input frame pixels (col, row, 1) to output pixels
    ("napari-nir" convention)."""
    return tiles.full_resolution_grid(fit.transforms(reference="canonical", extent="frame"), factor, frame_shape)


def lazy_canonical(burst, grid: ReferenceGrid, *, tile: int = 1024, fill: float = 0.0):
    """The fused view on ``grid`` as a dask array (rows, cols[, C]) in the input's dtype, chunks ``tile`` x ``tile``,
    one task per tile (``core.tiles.fuse_tile``); nothing is computed here. Pixels no frame covers are ``fill``."""
    import dask
    import dask.array as da

    tile = _check_tile(tile)
    source = burst if isinstance(burst, LazyBurst) else LazyBurst(burst)
    extra = tuple(source.frame_shape[2:])
    job = functools.partial(tiles.fuse_tile, source.read, grid, n_frames=source.frames,
                            frame_shape=source.frame_shape, dtype=source.dtype, fill=float(fill))
    meta = np.empty((0,) * (2 + len(extra)), dtype=source.dtype)
    rows = []
    for r0 in range(0, grid.shape[0], tile):
        row = []
        for c0 in range(0, grid.shape[1], tile):
            bounds = (r0, min(grid.shape[0], r0 + tile), c0, min(grid.shape[1], c0 + tile))
            shape = (bounds[1] - r0, bounds[3] - c0) + extra
            name = f"napari-nir-tile-{r0}-{c0}-{uuid.uuid4().hex}"
            row.append(da.from_delayed(dask.delayed(job, name=name, pure=False)(bounds), shape, meta=meta))
        rows.append(row)
    # da.block joins the innermost lists along the last axis: a channel axis needs one more level
    return da.block(rows) if extra == () else da.block([[[block] for block in row] for row in rows])


def fuse_tiled(burst, output, *, motion: str = "homography", working_size: int = 1024, tile: int = 1024,
               client=None, overwrite: bool = False, fill: float = 0.0, workers: int | None = None,
               **options) -> dict:
    """Fuse a burst too large for memory into a zarr array at ``output`` (a path ending in ``.zarr``).

    burst: (T, H, W[, C]) as ``LazyBurst`` reads it (dask, zarr or numpy array, ``*.zarr`` path, TIFF file).
    The motion is fitted on block means at most ``working_size`` px on the longer side (``fit_downsampled``),
    then the fused view (the mean of the registered input frames, module docstring) on the canonical "union"
    grid at full resolution is computed in ``tile`` x ``tile`` tiles, one Dask task each, with ``client`` (a
    dask.distributed Client) when given, else dask's threaded scheduler with ``workers`` threads (default: as
    many as the CPUs, fewer when the tiles' memory would exceed about 1 GiB). Output: (rows, cols) for grey
    bursts, (rows, cols, C) otherwise, in the input's dtype and units (integers rounded), chunks = tiles; pixels
    no frame covers are ``fill``. Attributes: "napari_nir" (the fit's provenance) and "napari_nir_tiled" (input
    shape and dtype, block factor, working shape, tile, fill, and "transforms": (T, 3, 3) input frame pixel ->
    output pixel). Written to a hidden folder beside ``output``, renamed to it when complete; an existing
    ``output`` is refused (FileExistsError) unless ``overwrite=True``. options: anything ``napari_nir.fuse``
    takes (preset, steps, device, seed, ...).

    Returns {"output", "shape", "dtype", "tiles", "tile", "block_factor", "working_shape", "working_size",
    "final_psnr_db" (the fit's, at working size), "fit_seconds", "seconds"}.
    """
    import dask.array as da
    import zarr

    start = time.perf_counter()
    target = _check_output(output, overwrite)
    tile = _check_tile(tile)
    source = burst if isinstance(burst, LazyBurst) else LazyBurst(burst)
    if source._path is not None and Path(source._path).resolve() == target.resolve():
        raise ValueError(f"the output {target} is the input; choose another name")
    try:
        fit, factor = fit_downsampled(source, motion, working_size=working_size, **options)
        fit_seconds = time.perf_counter() - start
        grid = full_resolution_grid(fit, factor, source.frame_shape)
        canonical = lazy_canonical(source, grid, tile=tile, fill=fill)
        working = tuple(fit.input_shape[1:3])
        attributes = _jsonable({
            "napari_nir": fit.provenance(),
            "napari_nir_tiled": {
                "input": {"shape": list(source.shape), "dtype": str(source.dtype)},
                "block_factor": factor, "working_shape": list(working), "tile": tile,
                "fill": float(fill) if math.isfinite(float(fill)) else str(float(fill)),
                "reference": "canonical", "extent": "union", "interpolation": "linear",
                "transforms": grid.transforms,
                "value": "mean over the frames covering each pixel of the input resampled on the canonical grid"}})
        folder = target.parent
        part = folder / f".{target.name}-{uuid.uuid4().hex[:12]}.part"
        try:
            array = zarr.create_array(store=str(part), shape=canonical.shape, dtype=source.dtype,
                                      chunks=(tile, tile) + tuple(source.frame_shape[2:]),
                                      fill_value=tiles.cast_to(np.array([float(fill)]), source.dtype)[0],
                                      attributes=attributes)
            target_chunks = _WhilePresent(array, part / "zarr.json")
            if client is not None:
                da.store(canonical, target_chunks, lock=False, scheduler=client)
            else:
                # our own pool, so that a failure waits for the tiles still running before the folder goes
                with ThreadPoolExecutor(workers or _default_workers(tile, source)) as pool:
                    try:
                        da.store(canonical, target_chunks, lock=False, scheduler=pool)
                    except BaseException:
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
            replace_folder(part, target, overwrite)
        except BaseException:
            shutil.rmtree(part, ignore_errors=True)
            raise
    finally:
        source.close()
    return {"output": str(target), "shape": tuple(int(n) for n in canonical.shape), "dtype": str(source.dtype),
            "tiles": len(tiles.tile_bounds(grid.shape, tile)), "tile": tile, "block_factor": factor,
            "working_shape": working, "working_size": max(working),
            "final_psnr_db": None if fit.final_psnr is None else float(fit.final_psnr),
            "fit_seconds": fit_seconds, "seconds": time.perf_counter() - start}


class _WhilePresent:
    """A zarr array that takes tiles only while ``marker`` exists: after a failure removed the unfinished output,
    a tile still running elsewhere (a dask.distributed worker) does not write it back."""

    def __init__(self, array, marker: Path):
        self.array, self.marker = array, marker
        self.shape, self.dtype = array.shape, array.dtype

    def __setitem__(self, key, value) -> None:
        if not self.marker.exists():
            raise RuntimeError(f"{self.marker.parent} was removed: the tiled fusion was stopped")
        self.array[key] = value


def _check_tile(tile) -> int:
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 16:
        raise ValueError(f"tile must be an integer of at least 16 px (the side of a square tile), got {tile!r}")
    return int(tile)


def _check_output(output, overwrite: bool) -> Path:
    target = Path(os.path.abspath(output))  # absolute: dask.distributed workers may run elsewhere
    if target.suffix != ".zarr":
        raise ValueError(f"the output must be a path ending in .zarr (a zarr array folder), got {target}")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: folder {target.parent} does not exist; create it first")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it, or choose another name")
    return target


def _default_workers(tile: int, source: LazyBurst) -> int:
    channels = source.frame_shape[2] if len(source.frame_shape) > 2 else 1
    per_tile = tiles.tile_memory(tile, channels, source.dtype.itemsize)
    return max(1, min(usable_cores(), WORKER_MEMORY // per_tile))


def _jsonable(value):
    """numpy values as Python ones, tuples as lists, non-finite floats as None: what zarr attributes hold."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)
