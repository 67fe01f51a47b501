"""napari_nir.tiled: lazy inputs, a fit on block means, tiles as Dask tasks, an atomic zarr output."""
from __future__ import annotations

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
dask = pytest.importorskip("dask")

from napari_nir import tiled  # noqa: E402
from napari_nir.core import tiles  # noqa: E402

OFFSETS = ((128, 128), (135, 140), (119, 133))  # (row, col) of each frame in the source; odd: half fitted pixels
FIT = {"motion": "translation", "working_size": 128, "steps": 40, "device": "cpu", "threads": 1}


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    from skimage import data

    return data.camera()


@pytest.fixture(scope="module")
def burst(source) -> np.ndarray:
    """(3, 256, 256) uint8: crops of one photograph at OFFSETS."""
    return np.stack([source[r:r + 256, c:c + 256] for r, c in OFFSETS])


@pytest.fixture(scope="module")
def zarr_path(burst, tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "burst.zarr"
    array = zarr.create_array(store=str(path), shape=burst.shape, chunks=(1, 64, 64), dtype=burst.dtype)
    array[:] = burst
    return path


@pytest.fixture(scope="module")
def run(zarr_path, tmp_path_factory):
    """One tiled fusion of the zarr input: (summary, output array)."""
    output = tmp_path_factory.mktemp("output") / "fused.zarr"
    summary = tiled.fuse_tiled(zarr_path, output, tile=96, workers=2, **FIT)
    return summary, zarr.open_array(str(output), mode="r")


def _covered_by_all(transforms: np.ndarray, shape: tuple[int, int], frame: int = 256) -> np.ndarray:
    """(rows, cols) bool: output pixels inside every frame."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    points = np.stack([cols.ravel(), rows.ravel(), np.ones(rows.size)])
    inside = np.ones(rows.size, bool)
    for m in transforms:
        p = np.linalg.inv(m) @ points
        x, y = p[0] / p[2], p[1] / p[2]
        inside &= (x >= -0.5) & (x <= frame - 0.5) & (y >= -0.5) & (y <= frame - 0.5)
    return inside.reshape(shape)


def test_the_output_is_a_chunked_zarr_array_with_provenance(run, burst):
    summary, out = run
    assert summary["shape"] == out.shape and out.dtype == burst.dtype and out.chunks == (96, 96)
    assert summary["tiles"] == len(tiles.tile_bounds(out.shape, 96)) and summary["block_factor"] == 2
    assert summary["working_shape"] == (128, 128) and summary["working_size"] == 128
    assert summary["final_psnr_db"] > 20 and 0 < summary["fit_seconds"] <= summary["seconds"]
    # the union of frames shifted by up to 16 rows and 12 columns
    assert out.shape == (256 + 16 + 1, 256 + 12 + 1) or out.shape == (256 + 16, 256 + 12)
    provenance = out.attrs["napari_nir"]
    assert provenance["software"] == "napari-nir" and provenance["parameters"]["motion"] == "translation"
    record = out.attrs["napari_nir_tiled"]
    assert record["input"] == {"shape": [3, 256, 256], "dtype": "uint8"} and record["tile"] == 96
    assert np.shape(record["transforms"]) == (3, 3, 3)


def test_the_fused_view_is_the_source_where_all_frames_overlap(run, source):
    """Frames cut from one photograph at known offsets: in their overlap the fused view is the photograph,
    sampled where the output's transforms put frame 0 (high PSNR: the alignment is right at full resolution)."""
    _, out = run
    from scipy.ndimage import map_coordinates

    transforms = np.array(out.attrs["napari_nir_tiled"]["transforms"])
    fused = out[:].astype(np.float64)
    rows, cols = np.mgrid[0:fused.shape[0], 0:fused.shape[1]]
    p = np.linalg.inv(transforms[0]) @ np.stack([cols.ravel(), rows.ravel(), np.ones(rows.size)])
    truth = map_coordinates(source.astype(np.float64), [p[1] / p[2] + OFFSETS[0][0], p[0] / p[2] + OFFSETS[0][1]],
                            order=1).reshape(fused.shape)
    overlap = _covered_by_all(transforms, fused.shape)
    assert overlap.sum() > 0.7 * 256 * 256
    psnr = 10 * np.log10(255.0 ** 2 / np.mean((fused[overlap] - truth[overlap]) ** 2))
    assert psnr > 40, psnr


def test_tiled_equals_the_untiled_registration_of_the_full_input(burst):
    """The tiled view against fit.apply (the whole frames on the fit's union grid scaled to full resolution),
    averaged over the frames covering each pixel; the two grids differ only by a whole-pixel shift."""
    fit, factor = tiled.fit_downsampled(burst, **FIT)
    grid = tiled.full_resolution_grid(fit, factor, burst.shape[1:])
    fused = tiled.lazy_canonical(burst, grid, tile=96).compute(scheduler="threads", num_workers=2).astype(float)
    registered = fit.apply(burst.astype(np.float32), extent="union", fill=np.nan)
    valid = np.isfinite(registered)
    untiled = np.where(valid, registered, 0).sum(0) / np.maximum(valid.sum(0), 1)
    shift = fit.registration_grid("canonical", "union").scaled(factor, burst.shape[1:]).transforms[0] @ \
        np.linalg.inv(grid.transforms[0])
    dx, dy = np.round(shift[:2, 2] / shift[2, 2]).astype(int)
    rows = slice(max(0, -dy), min(fused.shape[0], untiled.shape[0] - dy))
    cols = slice(max(0, -dx), min(fused.shape[1], untiled.shape[1] - dx))
    mine = fused[rows, cols]
    theirs = untiled[rows.start + dy:rows.stop + dy, cols.start + dx:cols.stop + dx]
    both = valid.any(0)[rows.start + dy:rows.stop + dy, cols.start + dx:cols.stop + dx]
    assert both.mean() > 0.9
    rms = np.sqrt(np.mean((mine[both] - theirs[both]) ** 2))
    assert rms < 0.01 * 255, rms


class CountingArray:
    """An array that records the shape of every read (to show the burst is never read whole)."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        part = np.asarray(self.array[key])
        self.reads.append(part.shape)
        return part


def test_reads_are_bands_and_windows_never_a_whole_frame(zarr_path, tmp_path, monkeypatch):
    monkeypatch.setattr(tiled, "READ_ELEMENTS", 64 * 256)  # bands of 64 rows for the block means
    counting = CountingArray(zarr.open_array(str(zarr_path), mode="r"))
    tiled.fuse_tiled(counting, tmp_path / "out.zarr", tile=96, workers=2, **FIT)
    sizes = [int(np.prod(shape)) for shape in counting.reads]
    assert all(len(shape) == 2 for shape in counting.reads)  # one frame at a time
    assert max(sizes) <= 64 * 256 < 256 * 256
    windows = [shape for shape in counting.reads if shape[1] < 256]
    assert windows and all(rows <= 96 + 3 and cols <= 96 + 3 for rows, cols in windows)


def test_a_tiff_file_is_read_lazily_and_fuses_like_the_zarr_input(burst, run, tmp_path):
    import pickle

    import tifffile

    path = tmp_path / "burst.tif"
    tifffile.imwrite(path, burst, tile=(64, 64), photometric="minisblack")  # one page per frame
    lazy = tiled.LazyBurst(path)
    assert isinstance(lazy.array, zarr.Array) and lazy.shape == burst.shape
    np.testing.assert_array_equal(lazy.read(1, 60, 70, 100, 130), burst[1, 60:70, 100:130])
    copy = pickle.loads(pickle.dumps(lazy))  # what a dask.distributed worker gets: the path, reopened there
    np.testing.assert_array_equal(copy.read(2, 0, 5, 250, 256), burst[2, 0:5, 250:256])
    lazy.close()
    copy.close()
    summary = tiled.fuse_tiled(path, tmp_path / "from_tiff.zarr", tile=96, workers=2, **FIT)
    fused = zarr.open_array(summary["output"], mode="r")[:].astype(float)
    reference = run[1][:].astype(float)
    assert fused.shape == reference.shape
    assert np.sqrt(np.mean((fused - reference) ** 2)) < 0.005 * 255


class FakeClient:
    """Stands in for a dask.distributed Client: dask hands it the graph through ``get``."""

    asynchronous = False

    def __init__(self):
        self.graphs = 0

    def get(self, graph, keys, **kwargs):
        import dask.threaded

        self.graphs += 1
        return dask.threaded.get(graph, keys, num_workers=2)


def test_a_dask_rgb_burst_with_a_client(burst, tmp_path):
    import dask.array as da

    rgb = np.stack([burst, 255 - burst, burst // 2], -1)
    client = FakeClient()
    summary = tiled.fuse_tiled(da.from_array(rgb, chunks=(1, 64, 64, 3)), tmp_path / "rgb.zarr", tile=96,
                               client=client, **FIT)
    out = zarr.open_array(summary["output"], mode="r")
    assert client.graphs == 1
    assert out.shape == summary["shape"] and out.shape[2] == 3 and out.chunks == (96, 96, 3)
    fused = out[:].astype(int)
    covered = fused.sum(-1) > 0
    assert np.abs(fused[..., 1] - (255 - fused[..., 0]))[covered].max() <= 1  # channels fused alike


def test_an_existing_output_is_refused_and_left_alone(burst, tmp_path):
    output = tmp_path / "fused.zarr"
    output.mkdir()
    (output / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiled.fuse_tiled(burst, output, **FIT)
    assert (output / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match=r"\.zarr"):
        tiled.fuse_tiled(burst, tmp_path / "fused.tif", **FIT)
    with pytest.raises(ValueError, match="one matrix per frame"):
        tiled.fuse_tiled(burst, tmp_path / "flow.zarr", **{**FIT, "motion": "flow"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.zarr"]


@pytest.mark.parametrize("existing", [False, True])
def test_a_failing_tile_leaves_no_output(burst, tmp_path, monkeypatch, existing):
    real = tiles.fuse_tile

    def failing(read, grid, bounds, *args, **kwargs):
        if bounds[:3] == (96, 192, 96):
            raise RuntimeError("tile failed")
        return real(read, grid, bounds, *args, **kwargs)

    monkeypatch.setattr(tiles, "fuse_tile", failing)
    output = tmp_path / "fused.zarr"
    if existing:
        output.mkdir()
        (output / "mine.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="tile failed"):
        tiled.fuse_tiled(burst, output, tile=96, workers=2, overwrite=existing, **FIT)
    if existing:
        assert (output / "mine.txt").read_text() == "keep"  # the old output is still there, untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.zarr"]
    else:
        assert list(tmp_path.iterdir()) == []  # no output and no hidden part folder


def test_the_benchmark_helpers_run_on_a_tiny_burst(tmp_path):
    """benchmarks/tiled.py's pieces on 3 x 96^2 (its figures come from ``python -m benchmarks --only tiled``)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import tiled as bench

    burst = bench.make_burst(3, 96)
    assert burst.shape == (3, 96, 96) and burst.dtype == np.uint16
    fused, untiled, _ = bench.tiled_and_untiled(burst, 32, "cpu", working_size=48, motion="translation", steps=20,
                                                threads=1)
    both = np.isfinite(untiled)
    # rounding to integers, plus float32 in fit.apply: nothing else differs
    assert both.mean() > 0.5 and np.abs(fused[both] - untiled[both]).max() < 0.51
    image = bench.write_seam_image(tmp_path / "tiled_seams.png", fused, 32)
    assert image.exists()
