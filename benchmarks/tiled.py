"""Tiled fusion (``napari_nir.tiled.fuse_tiled``): peak memory and time against frame size, agreement with an
untiled computation, and a crop across tile corners.

Bursts: frames cut at random whole-pixel offsets (up to 48 px) from one image, scikit-image's ``camera``
enlarged to the frame size plus a fine random texture, so that the frames have detail at full resolution and
structure at the fitted size. Grey uint16.

Memory and time: each burst is first written to a zarr array (chunks 1 x 1024 x 1024) by a separate process;
a fresh process then runs ``fuse_tiled`` on the zarr path (homography, working size 1024, tiles 1024) and
reports its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, imports included) and times.

Agreement: the tiled view against ``fit.apply`` (whole frames on the fit's union grid scaled to full resolution,
the path of ``registered()``), averaged over the frames that cover each pixel, on the pixels both cover; the
two grids share one pixel lattice and differ by a whole-pixel shift of the union, which is undone first. The
tiled view is in the input's dtype (rounded), the untiled one in float: the difference includes that rounding.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
MARGIN = 48          # px: the largest offset of a frame in the source image
SIZES = ((3, 2048), (3, 4096), (3, 8192))
QUICK_SIZES = ((3, 512), (3, 1024))
AGREEMENT = (4, 2048, 512)        # frames, side, tile
QUICK_AGREEMENT = (4, 512, 128)
DTYPE = "uint16"
RSS_TARGET_GB = 3.0

WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from benchmarks.tiled import write_burst
write_burst(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
"""

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from napari_nir.tiled import fuse_tiled
imported = time.perf_counter() - start
summary = fuse_tiled(sys.argv[1], sys.argv[2], working_size=int(sys.argv[3]), tile=int(sys.argv[4]),
                     device=sys.argv[5], preview_every=0)
print(json.dumps({"summary": summary, "imports": imported,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def source_image(side: int, seed: int = 0) -> np.ndarray:
    """(side + 2 MARGIN)^2 float32 in [0, 1]: camera enlarged (linear) plus a fine random texture."""
    from scipy.ndimage import gaussian_filter, zoom
    from skimage import data

    size = side + 2 * MARGIN
    camera = data.camera().astype(np.float32) / 255
    image = zoom(camera, size / camera.shape[0], order=1, grid_mode=True, mode="nearest")
    rng = np.random.default_rng(seed)
    texture = gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 1.0)
    image *= 0.8
    image += 0.2 * (texture - texture.min()) / (texture.max() - texture.min())
    return image


def frame_offsets(frames: int, seed: int = 0) -> list[tuple[int, int]]:
    """(row, col) of each frame's top-left pixel in the source image."""
    rng = np.random.default_rng(seed + 1)
    return [tuple(int(v) for v in rng.integers(0, 2 * MARGIN + 1, 2)) for _ in range(frames)]


def make_burst(frames: int, side: int, dtype: str = DTYPE, seed: int = 0) -> np.ndarray:
    """(frames, side, side) in ``dtype``: crops of ``source_image`` at ``frame_offsets``."""
    image = source_image(side, seed)
    top = np.iinfo(dtype).max
    return np.stack([np.rint(image[r:r + side, c:c + side] * top).astype(dtype)
                     for r, c in frame_offsets(frames, seed)])


def write_burst(path: str, frames: int, side: int, dtype: str = DTYPE, seed: int = 0) -> None:
    """``make_burst`` written frame by frame to a zarr array at ``path`` (chunks 1 x 1024 x 1024)."""
    import zarr

    image = source_image(side, seed)
    top = np.iinfo(dtype).max
    chunk = min(1024, side)
    array = zarr.create_array(store=path, shape=(frames, side, side), chunks=(1, chunk, chunk), dtype=dtype)
    for t, (r, c) in enumerate(frame_offsets(frames, seed)):
        array[t] = np.rint(image[r:r + side, c:c + side] * top).astype(dtype)


def measure(frames: int, side: int, device: str, working_size: int = 1024, tile: int = 1024) -> dict:
    """Write a burst in one process, fuse it tiled in a fresh one -> {"summary", "imports", "peak" (bytes)}."""
    with tempfile.TemporaryDirectory(prefix="nir-tiled-") as folder:
        source = str(Path(folder) / "burst.zarr")
        subprocess.run([sys.executable, "-c", WRITER, str(ROOT), source, str(frames), str(side), DTYPE],
                       capture_output=True, text=True, check=True)
        out = subprocess.run([sys.executable, "-c", CHILD, source, str(Path(folder) / "fused.zarr"),
                              str(working_size), str(tile), device], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"tiled fusion of {frames} x {side}^2 failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def tiled_and_untiled(burst: np.ndarray, tile: int, device: str, working_size: int = 1024, **options):
    """(tiled view in the input's dtype, untiled float view aligned to it (NaN where no frame covers), the fit)."""
    from napari_nir import tiled

    fit, factor = tiled.fit_downsampled(burst, working_size=working_size, device=device, preview_every=0, **options)
    grid = tiled.full_resolution_grid(fit, factor, burst.shape[1:])
    fused = tiled.lazy_canonical(burst, grid, tile=tile).compute(scheduler="threads")
    registered = fit.apply(burst.astype(np.float32), extent="union", fill=np.nan)
    valid = np.isfinite(registered)
    counts = valid.sum(0)
    untiled = np.where(counts > 0, np.where(valid, registered, 0).sum(0) / np.maximum(counts, 1), np.nan)
    del registered, valid
    scaled = fit.registration_grid("canonical", "union").scaled(factor, burst.shape[1:])
    shift = scaled.transforms[0] @ np.linalg.inv(grid.transforms[0])
    dx, dy = (int(v) for v in np.round(shift[:2, 2] / shift[2, 2]))
    aligned = np.full(fused.shape, np.nan)
    rows = slice(max(0, -dy), min(fused.shape[0], untiled.shape[0] - dy))
    cols = slice(max(0, -dx), min(fused.shape[1], untiled.shape[1] - dx))
    aligned[rows, cols] = untiled[rows.start + dy:rows.stop + dy, cols.start + dx:cols.stop + dx]
    return fused, aligned, fit


def agreement(frames: int, side: int, tile: int, device: str, images: Path | None = None,
              working_size: int = 1024) -> list:
    """A table row: tiled against untiled on a generated burst; writes the seam image when ``images`` is given."""
    from napari_nir.core.tiles import tile_bounds

    burst = make_burst(frames, side)
    start = time.perf_counter()
    fused, untiled, _ = tiled_and_untiled(burst, tile, device, working_size)
    seconds = time.perf_counter() - start
    both = np.isfinite(untiled)
    difference = fused[both].astype(np.float64) - untiled[both]
    value_range = float(burst.max()) - float(burst.min())
    if images is not None:
        write_seam_image(Path(images) / "tiled_seams.png", fused, tile)
    return [f"{frames} x {side}^2 {burst.dtype}", f"{tile}", f"{len(tile_bounds(fused.shape[:2], tile))}",
            f"{100 * np.sqrt(np.mean(difference ** 2)) / value_range:.4f}", f"{np.abs(difference).max():.2f}",
            f"{both.mean() * 100:.1f}", f"{seconds:.1f}"]


def seam_crop(fused: np.ndarray, tile: int, half: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A square crop (at most 2 half px wide) of the fused view centred on the tile corner nearest the view's
    centre, and the same crop as RGB uint8 with the tile borders through it drawn in red."""
    rows, cols = fused.shape[:2]
    row = tile * max(1, round(rows / 2 / tile))
    col = tile * max(1, round(cols / 2 / tile))
    half = max(1, min(half, row, rows - row, col, cols - col))
    crop = fused[row - half:row + half, col - half:col + half].astype(np.float64)
    lo, hi = np.percentile(crop, [0.5, 99.5])
    grey = np.clip(np.rint((crop - lo) / max(hi - lo, 1e-12) * 255), 0, 255).astype(np.uint8)
    marked = np.repeat(grey[..., None], 3, axis=2)
    for index in (half - 1, half):  # the last row / column of one tile and the first of the next
        marked[index, :] = marked[:, index] = (255, 0, 0)
    return grey, marked


def write_seam_image(path: Path, fused: np.ndarray, tile: int) -> Path:
    """docs/images/tiled_seams.png: the crop across a tile corner, plain and with the tile borders marked."""
    from napari_nir.io import side_by_side, write_png

    grey, marked = seam_crop(fused, tile)
    return write_png(path, side_by_side([grey, marked], gap=8), overwrite=True)


def run(quick: bool, device: str, images: Path | None = None) -> list[dict]:
    sizes = QUICK_SIZES if quick else SIZES
    working_size, tile = (256, 256) if quick else (1024, 1024)
    rows = []
    for frames, side in sizes:
        found = measure(frames, side, device, working_size, tile)
        summary = found["summary"]
        rows.append([f"{frames} x {side}^2 {DTYPE} (zarr)", f"{frames * side * side / 1e6:.0f}",
                     " x ".join(str(n) for n in summary["shape"]), f"{summary['tiles']}",
                     f"{summary['working_size']}", f"{summary['fit_seconds']:.1f}", f"{summary['seconds']:.1f}",
                     f"{found['peak'] / MiB:.0f}", f"{summary['final_psnr_db']:.1f}"])
    frames, side, agreement_tile = QUICK_AGREEMENT if quick else AGREEMENT
    agree = agreement(frames, side, agreement_tile, device, images, working_size=working_size)
    return [{"title": "Tiled fusion: peak memory and time against frame size (homography, zarr in and out)",
             "header": ["burst", "MPx", "output", "tiles", "working px", "fit s", "total s", "peak RSS MiB",
                        "fit PSNR dB"],
             "rows": rows,
             "notes": [f"each size in a fresh process reading a zarr array written by another; peak RSS "
                       f"(ru_maxrss) of the whole process, imports included; target <= {RSS_TARGET_GB:g} GB for "
                       "3 x 8192^2",
                       f"tiles {tile} px, working size {working_size} px (block means), dask's threaded scheduler "
                       "with the default thread count; 'total s' includes the fit, not the imports",
                       "fit PSNR: the fit's own, against the block-mean frames"]},
            {"title": "Tiled against untiled: the same fusion computed whole (fit.apply on full frames, averaged)",
             "header": ["burst", "tile", "tiles", "RMS difference % of range", "max |difference|",
                        "pixels compared %", "s"],
             "rows": [agree],
             "notes": ["the untiled view is float, the tiled one the input's dtype (rounded to integers): the "
                       "difference is that rounding; any seam would show as a larger maximum along tile borders",
                       "image: docs/images/tiled_seams.png (a crop across a tile corner, tile borders marked in red "
                       "on the right)"]}]
