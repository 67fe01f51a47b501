"""Files in and out: bursts from TIFF stacks or folders of frames; TIFF, PNG and JSON outputs with provenance.

Pure numpy + tifffile/imageio: no napari, Qt or torch imports.

- :func:`read_burst`: a multi-page TIFF (or ``.npy``) file, or a folder of frames, -> (T, H, W[, C]) array.
- :func:`write_tiff` / :func:`read_tiff`: any shape and numeric dtype; a metadata dict travels as JSON in the
  first page's ImageDescription (``{"shape": [...], "napari_nir": {...}}``, tifffile's "shaped" format), so
  the file opens in Fiji/ImageJ, QuPath, Python and others while napari-nir reads its provenance back.
- :func:`write_json`, :func:`write_png`, :func:`side_by_side`.

Every writer is atomic: it writes a hidden temporary file in the target's folder and renames it over the
target (``os.replace``) only once complete, so a crash or Ctrl-C never leaves a half-written output; an
existing target is refused unless ``overwrite=True``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

__all__ = ["FRAME_EXTENSIONS", "read_burst", "read_tiff", "write_tiff", "write_json", "write_png", "side_by_side"]

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff")
_META_KEY = "napari_nir"
_DTYPE_KEY = "napari_nir_dtype"  # set when the stored dtype differs from the array's (bool is stored as uint8)


# -- reading ----------------------------------------------------------------------------------------

def read_burst(path: str | os.PathLike) -> np.ndarray:
    """Read a burst from a file or a folder of frames.

    path: a TIFF file (multi-page, or one page holding a 3-D/4-D array; read with tifffile, the first
        series, as stored), a ``.npy`` file, or a folder of frames (*.png, *.jpg, *.jpeg, *.tif, *.tiff,
        naturally sorted so frame2 comes before frame10; hidden files, sub-folders and other files ignored).
    Returns a new in-memory array (never a memory map): the file's array as stored, or (T, H, W[, C]) for
    a folder, in the frames' own dtype and units.
    Raises FileNotFoundError for a missing path; ValueError for an unreadable/truncated file, an empty
    folder, or frames that differ in size, channels or dtype (naming the two files and the fix).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.is_dir():
        return _read_folder(p)
    suffix = p.suffix.lower()
    if suffix in TIFF_EXTENSIONS:
        return _read_tiff_array(p)
    if suffix == ".npy":
        try:
            array = np.load(p, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any failure of a foreign file is a bad input
            raise ValueError(f"cannot read {p}: {_reason(exc)}; the file may be truncated or not a NumPy .npy "
                             "array") from None
        return np.array(array, copy=True)
    if suffix in FRAME_EXTENSIONS:
        raise ValueError(f"{p} is a single image, not a burst; put the frames in one folder and pass the folder, "
                         "or save them as one multi-page TIFF")
    raise ValueError(f"cannot read {p}: unsupported file type {p.suffix or '(no extension)'!r}; pass a multi-page "
                     f"TIFF (.tif/.tiff), a .npy array, or a folder of frames ({', '.join(FRAME_EXTENSIONS)})")


def burst_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of the array ``read_burst`` would return, from the file's header (TIFF: the first series;
    .npy: its header; a folder: its first frame times the number of frames), without reading the data; None when
    the header cannot tell (``read_burst`` then says what is wrong)."""
    p = Path(path)
    try:
        if p.is_dir():
            files = _frame_files(p)
            if not files:
                return None
            first = _read_frame(files[0])
            return (len(files),) + first.shape, first.dtype
        suffix = p.suffix.lower()
        if suffix in TIFF_EXTENSIONS:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                series = tif.series[0]
                return tuple(int(n) for n in series.shape), np.dtype(series.dtype)
        if suffix == ".npy":
            array = np.load(p, mmap_mode="r", allow_pickle=False)
            return tuple(array.shape), array.dtype
    except Exception:  # noqa: BLE001 - a damaged file: read_burst reports it
        return None
    return None


def _natural_key(name: str) -> list:
    """Sort key: digit runs compare as numbers (frame2 < frame10), the rest case-insensitively."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part != ""]


def _frame_files(folder: Path) -> list[Path]:
    files = [f for f in folder.iterdir()
             if not f.name.startswith(".") and f.suffix.lower() in FRAME_EXTENSIONS and f.is_file()]
    return sorted(files, key=lambda f: _natural_key(f.name))


def _describe(shape: tuple) -> str:
    if len(shape) == 2:
        return f"grey {shape[0]}x{shape[1]}"
    if len(shape) == 3:
        kind = {1: "grey", 3: "RGB", 4: "RGBA"}.get(shape[2], f"{shape[2]}-channel")
        return f"{kind} {shape[0]}x{shape[1]}"
    return f"shape {shape}"


def _read_folder(folder: Path) -> np.ndarray:
    files = _frame_files(folder)
    if not files:
        others = sorted(f.name for f in folder.iterdir() if not f.name.startswith("."))
        found = f"it holds {len(others)} other entr{'y' if len(others) == 1 else 'ies'}" if others else "it is empty"
        raise ValueError(f"folder {folder} has no frames ({found}); put the burst's frames in it as "
                         f"{', '.join(FRAME_EXTENSIONS)} files (one image per file, named so that they sort in order)")
    first = _read_frame(files[0])
    if not (first.ndim == 2 or (first.ndim == 3 and first.shape[2] <= 4)):
        raise ValueError(f"{files[0]} holds an array of shape {first.shape}, not one grey/RGB/RGBA frame; a folder "
                         "must hold one image per file (for a stack in one TIFF, pass that file instead)")
    out = np.empty((len(files),) + first.shape, dtype=first.dtype)
    out[0] = first
    for i, f in enumerate(files[1:], start=1):
        frame = _read_frame(f)
        if frame.shape != first.shape:
            grey_rgb = {frame.ndim, first.ndim} == {2, 3} or (
                frame.ndim == first.ndim == 3 and frame.shape[:2] == first.shape[:2])
            fix = ("convert all frames to the same colour mode (all grey or all RGB, without alpha)" if grey_rgb
                   else "crop or resize all frames to one size")
            raise ValueError(f"frames differ: {files[0].name} is {_describe(first.shape)} (shape {first.shape}) but "
                             f"{f.name} is {_describe(frame.shape)} (shape {frame.shape}) in {folder}; {fix}, or "
                             "move the odd file out of the folder")
        if frame.dtype != first.dtype:
            raise ValueError(f"frames differ: {files[0].name} is {first.dtype} but {f.name} is {frame.dtype} in "
                             f"{folder}; save all frames with the same bit depth")
        out[i] = frame
    return out


def _read_frame(path: Path) -> np.ndarray:
    if path.suffix.lower() in TIFF_EXTENSIONS:
        return _read_tiff_array(path)
    import imageio.v3 as iio

    try:
        frame = iio.imread(path)
    except Exception as exc:  # noqa: BLE001 - imageio/Pillow raise many types for damaged files
        raise ValueError(f"cannot read {path}: {_reason(exc)}; the file may be truncated or not an image; "
                         "re-export it or move it out of the folder") from None
    return np.array(frame, copy=True)


class _ErrorLog(logging.Handler):
    """Collects tifffile's logged errors about the file's structure: it logs, rather than raises, damage such as
    a truncated page chain and then returns fewer frames. Errors about a single odd tag (vendor quirks) are
    not fatal."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "for tag #" not in message and "TiffTag.fromfile" not in message:
            self.messages.append(message)


@contextlib.contextmanager
def _tifffile_errors():
    logger = logging.getLogger("tifffile")
    handler = _ErrorLog()
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _open_tiff(path: Path):
    """(array, first-page description, shaped metadata dict or None) of a TIFF; ValueError when damaged."""
    import tifffile

    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with _tifffile_errors() as errors, tifffile.TiffFile(path) as tif:
            array = tif.asarray()
            shaped = tif.shaped_metadata
            description = tif.pages[0].description if len(tif.pages) else ""
        if errors:
            raise ValueError(errors[0])
    except Exception as exc:  # noqa: BLE001 - tifffile raises ValueError, struct.error, IndexError, ...
        raise ValueError(f"cannot read {path}: {_reason(exc)}; the file may be truncated or not a TIFF; "
                         "re-export or copy it again") from None
    array = np.array(array, copy=True)  # plain in-memory ndarray, never a memory map
    return array, description, (shaped[0] if shaped else None)


def _read_tiff_array(path: Path) -> np.ndarray:
    array, _, shaped = _open_tiff(path)
    return _restore_dtype(array, shaped)


def _restore_dtype(array: np.ndarray, shaped: dict | None) -> np.ndarray:
    if shaped and shaped.get(_DTYPE_KEY) == "bool":
        return array.astype(bool)
    return array


def read_tiff(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a TIFF written by :func:`write_tiff` (or any TIFF).

    Returns (array, metadata): the array with the shape and dtype it was written with (any TIFF: the first
    series as stored), and the metadata dict given to ``write_tiff`` ({} when the file has none or its
    description is not napari-nir JSON). Raises FileNotFoundError / ValueError (damaged or not a TIFF).
    """
    array, description, shaped = _open_tiff(Path(path))
    meta = None
    if isinstance(shaped, dict):
        meta = shaped.get(_META_KEY)
    if meta is None and description:
        try:
            doc = json.loads(description)
        except (ValueError, TypeError):
            doc = None
        if isinstance(doc, dict):
            meta = doc.get(_META_KEY)
    return _restore_dtype(array, shaped), (meta if isinstance(meta, dict) else {})


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- writing ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _atomic(path: str | os.PathLike, overwrite: bool):
    """Yield a temporary path beside ``path`` (same suffix); on success it is fsynced and renamed to ``path``."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {target}: it is a folder; give a file name")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {target}: folder {folder} does not exist; create it first")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it, or choose "
                              "another name")
    tmp = folder / f".{target.stem}-{uuid.uuid4().hex[:12]}.part{target.suffix}"
    with open(tmp, "xb"):  # created with the usual permissions (umask), unlike mkstemp's 0600
        pass
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if target.exists() and not overwrite:  # appeared while we were writing
            raise FileExistsError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _jsonable(obj, where: str = "metadata"):
    """A copy of ``obj`` with numpy scalars/arrays as Python values, tuples as lists, NaN/Inf as None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, where) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), where)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{where} holds a {type(obj).__name__} ({obj!r:.60}), which cannot be stored as JSON; use "
                    "numbers, strings, lists and dicts")


def write_json(path: str | os.PathLike, obj, *, overwrite: bool = False) -> Path:
    """Write ``obj`` (dicts, lists, numbers, strings; numpy values converted; NaN/Inf -> null) as indented
    UTF-8 JSON, atomically. Returns the path written. FileExistsError unless ``overwrite``."""
    text = json.dumps(_jsonable(obj, "object"), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with _atomic(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_tiff(path: str | os.PathLike, array, metadata: dict | None = None, *, overwrite: bool = False,
               channels: bool | None = None) -> Path:
    """Write ``array`` to a TIFF (tifffile, uncompressed, BigTIFF when > ~4 GB), atomically.

    array: any shape with ndim >= 2, any numeric dtype (bool is stored as uint8 and read back as bool);
        e.g. (H, W[, C]) images or (T, H, W[, C]) stacks. Values are written unchanged.
    metadata: JSON-able dict stored in the first page's ImageDescription as
        ``{"shape": [...], "napari_nir": metadata}``; :func:`read_tiff` returns it.
    channels: whether the last axis holds channels (stored as samples per pixel, so other tools see
        T pages of (H, W, C) rather than H*T pages of (W, C)); None guesses: ndim >= 3 and last axis <= 4.
    Photometric 'rgb' for uint8/uint16 arrays whose last (channel) axis is 3, else 'minisblack'.
    Returns the path written. Raises FileExistsError when ``path`` exists and not ``overwrite``.
    """
    import tifffile

    a = np.asarray(array)
    if a.ndim < 2:
        raise ValueError(f"write_tiff needs an image or a stack (ndim >= 2), got shape {a.shape}")
    if a.dtype.kind not in "biufc":
        raise TypeError(f"write_tiff cannot store dtype {a.dtype}; convert the array to a numeric dtype first")
    if not isinstance(metadata, (dict, type(None))):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    if channels is None:
        channels = a.ndim >= 3 and a.shape[-1] <= 4
    if channels and a.ndim < 3:
        raise ValueError(f"channels=True needs an array of ndim >= 3 (..., H, W, C), got shape {a.shape}")
    shaped = {_META_KEY: _jsonable(metadata or {})}
    if a.dtype == bool:
        a = a.astype(np.uint8)
        shaped[_DTYPE_KEY] = "bool"
    rgb = bool(channels) and a.shape[-1] == 3 and a.dtype in (np.uint8, np.uint16)
    with _atomic(path, overwrite) as tmp:
        tifffile.imwrite(tmp, a, photometric="rgb" if rgb else "minisblack",
                         planarconfig="contig" if channels else None, metadata=shaped)
    return Path(path)


def _to_uint8(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    x = image.astype(np.float64)
    span = hi - lo
    x = (x - lo) / span if span > 0 else np.zeros_like(x)
    x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def write_png(path: str | os.PathLike, image, *, lo: float | None = None, hi: float | None = None,
              overwrite: bool = False) -> Path:
    """Write an 8-bit PNG, atomically.

    image: (H, W) or (H, W, 1) grey, (H, W, 3) RGB or (H, W, 4) RGBA. uint8 is written as is; any other
        dtype is mapped linearly from [lo, hi] (default: the image's own min and max) to 0..255, clipped.
    Returns the path written. Raises FileExistsError when ``path`` exists and not ``overwrite``.
    """
    import imageio.v3 as iio

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"write_png needs (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA, got shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise TypeError(f"write_png cannot store dtype {a.dtype}")
    if a.dtype != np.uint8:
        finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a
        lo = float(finite.min()) if lo is None and finite.size else (0.0 if lo is None else float(lo))
        hi = float(finite.max()) if hi is None and finite.size else (1.0 if hi is None else float(hi))
        a = _to_uint8(a, lo, hi)
    with _atomic(path, overwrite) as tmp:
        iio.imwrite(tmp, np.ascontiguousarray(a), extension=".png")
    return Path(path)


def _display_rgb(image) -> np.ndarray:
    """(H, W[, C]) -> (H, W, 3) uint8 stretched between its own 0.5 and 99.5 percentiles."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3:
        c = a.shape[2]
        if c >= 3:
            a = a[..., :3]  # RGB, or RGBA without alpha, or the first three channels
        else:
            a = np.concatenate([a, np.zeros(a.shape[:2] + (3 - c,), dtype=a.dtype)], axis=2)
    elif a.ndim != 2:
        raise ValueError(f"side_by_side needs (H, W) or (H, W, C) images, got shape {a.shape}")
    x = a.astype(np.float32)
    finite = x[np.isfinite(x)]
    if finite.size:
        lo, hi = np.percentile(finite, [0.5, 99.5])
        if hi <= lo:
            lo, hi = float(finite.min()), float(finite.max())
    else:
        lo = hi = 0.0
    out = _to_uint8(x, float(lo), float(hi))
    return np.repeat(out[..., None], 3, axis=2) if out.ndim == 2 else out


def side_by_side(images, *, gap: int = 4) -> np.ndarray:
    """Place images left to right for viewing: (H, W, 3) uint8.

    images: list of (H_i, W_i) or (H_i, W_i, C) arrays of any numeric dtype; each is stretched to 0..255
        between its own 0.5 and 99.5 percentiles, grey becomes RGB (C > 3: first three channels), and the
        shorter ones are centred vertically on white. gap: white columns between images.
    """
    images = list(images)
    if not images:
        raise ValueError("side_by_side needs at least one image")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    tiles = [_display_rgb(im) for im in images]
    height = max(t.shape[0] for t in tiles)
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for t in tiles:
        y = (height - t.shape[0]) // 2
        canvas[y:y + t.shape[0], x:x + t.shape[1]] = t
        x += t.shape[1] + gap
    return canvas


def replace_folder(part: Path, target: Path, overwrite: bool) -> None:
    """Move the finished folder ``part`` to ``target``; an existing ``target`` (overwrite) is moved aside to a
    hidden ``.<name>-<id>.old`` first and deleted only once the new one is in place (put back if the move fails).
    A ``target`` that exists without ``overwrite`` (it appeared while ``part`` was written) is refused."""
    aside = None
    if target.exists():
        if not overwrite:  # appeared while we were writing
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        aside = target.parent / f".{target.name}-{uuid.uuid4().hex[:12]}.old"
        os.replace(target, aside)
    try:
        os.replace(part, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink()
