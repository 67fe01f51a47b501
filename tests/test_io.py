"""napari_nir.io: burst reading, TIFF/JSON/PNG writing with provenance, atomic writes."""
from __future__ import annotations

import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_nir import io

DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32", "float64",
          "complex64", "bool"]
SHAPES = [(6, 7), (3, 6, 7), (3, 6, 7, 3), (2, 6, 7, 2), (2, 3, 6, 7)]


def _array(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == bool:
        return rng.random(shape) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        a = rng.integers(0, 1000, size=shape).astype(dtype)
        a.flat[0], a.flat[-1] = info.min, info.max  # extremes survive
        return a
    return (rng.standard_normal(shape) * 100).astype(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiff_round_trip_every_dtype_with_metadata(tmp_path, dtype, shape):
    a = _array(shape, dtype)
    meta = {"output": "canonical", "psnr": np.float32(31.5), "steps": np.int64(20), "shape": (1, 2),
            "nested": {"list": [1, 2.5, "x"], "nan": float("nan")}, "none": None}
    path = io.write_tiff(tmp_path / "a.tif", a, meta)
    b, got = io.read_tiff(path)
    assert b.shape == a.shape and b.dtype == a.dtype
    np.testing.assert_array_equal(b, a)
    assert got == {"output": "canonical", "psnr": 31.5, "steps": 20, "shape": [1, 2],
                   "nested": {"list": [1, 2.5, "x"], "nan": None}, "none": None}
    assert io.read_burst(path).shape == a.shape


def test_tiff_layout_for_other_tools(tmp_path):
    """RGB uint8 stacks are T pages of RGB; grey stacks are T grey pages; JSON is in the ImageDescription."""
    rgb = _array((4, 10, 12, 3), "uint8")
    io.write_tiff(tmp_path / "rgb.tif", rgb, {"output": "frames"})
    with tifffile.TiffFile(tmp_path / "rgb.tif") as tif:
        assert len(tif.pages) == 4 and tif.pages[0].shape == (10, 12, 3)
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
        assert json.loads(tif.pages[0].description)["napari_nir"] == {"output": "frames"}
    grey = _array((5, 10, 12), "float32")
    io.write_tiff(tmp_path / "grey.tif", grey, {})
    with tifffile.TiffFile(tmp_path / "grey.tif") as tif:
        assert len(tif.pages) == 5 and tif.pages[0].shape == (10, 12)
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
    flow = _array((3, 10, 12, 2), "float32")
    io.write_tiff(tmp_path / "flow.tif", flow, {}, channels=True)
    with tifffile.TiffFile(tmp_path / "flow.tif") as tif:
        assert len(tif.pages) == 3 and tif.pages[0].shape == (10, 12, 2)
    assert tifffile.imread(tmp_path / "flow.tif").shape == flow.shape  # plain tifffile restores the shape too


def test_read_tiff_foreign_files(tmp_path):
    a = _array((3, 8, 9), "uint16")
    tifffile.imwrite(tmp_path / "plain.tif", a, photometric="minisblack", metadata=None)
    b, meta = io.read_tiff(tmp_path / "plain.tif")
    np.testing.assert_array_equal(b, a)
    assert meta == {}
    tifffile.imwrite(tmp_path / "text.tif", a, photometric="minisblack", description="made by a microscope",
                     metadata=None)
    assert io.read_tiff(tmp_path / "text.tif")[1] == {}
    # metadata as a bare JSON ImageDescription (no shaped metadata)
    tifffile.imwrite(tmp_path / "desc.tif", a, photometric="minisblack",
                     description=json.dumps({"napari_nir": {"k": 1}}), metadata=None)
    assert io.read_tiff(tmp_path / "desc.tif")[1] == {"k": 1}


def test_read_burst_tiff_is_in_memory_copy(tmp_path):
    a = _array((4, 16, 16), "uint16")
    tifffile.imwrite(tmp_path / "b.tif", a, photometric="minisblack")
    b = io.read_burst(tmp_path / "b.tif")
    assert type(b) is np.ndarray and b.flags.owndata and b.flags.writeable
    np.testing.assert_array_equal(b, a)
    np.save(tmp_path / "b.npy", a)
    c = io.read_burst(str(tmp_path / "b.npy"))
    assert type(c) is np.ndarray and not isinstance(c, np.memmap)
    np.testing.assert_array_equal(c, a)


def test_read_burst_folder_natural_sort(tmp_path):
    names = ["frame10.png", "frame2.png", "Frame1.png", "frame3.PNG"]
    order = {"Frame1.png": 1, "frame2.png": 2, "frame3.PNG": 3, "frame10.png": 10}
    for name in names:
        iio.imwrite(tmp_path / name, np.full((8, 9, 3), order[name], dtype=np.uint8), extension=".png")
    iio.imwrite(tmp_path / ".hidden0.png", np.zeros((3, 3), dtype=np.uint8), extension=".png")  # ignored
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub").mkdir()
    burst = io.read_burst(tmp_path)
    assert burst.shape == (4, 8, 9, 3) and burst.dtype == np.uint8
    assert burst[:, 0, 0, 0].tolist() == [1, 2, 3, 10]


def test_read_burst_folder_of_tiffs_and_jpegs(tmp_path):
    for i in range(3):
        tifffile.imwrite(tmp_path / f"t_{i}.tif", np.full((8, 8), 1000 * i, dtype=np.uint16))
    burst = io.read_burst(tmp_path)
    assert burst.dtype == np.uint16 and burst[:, 0, 0].tolist() == [0, 1000, 2000]
    jpegs = tmp_path / "jpg"
    jpegs.mkdir()
    for i in range(2):
        iio.imwrite(jpegs / f"im{i}.jpeg", np.full((16, 16, 3), 100, dtype=np.uint8), extension=".jpeg")
    assert io.read_burst(jpegs).shape == (2, 16, 16, 3)
    stack = tmp_path / "stack"
    stack.mkdir()
    tifffile.imwrite(stack / "all.tif", np.zeros((6, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(ValueError, match=r"all\.tif.*\(6, 8, 8\).*pass that file"):
        io.read_burst(stack)


def test_read_burst_mismatched_sizes_names_files(tmp_path):
    iio.imwrite(tmp_path / "a1.png", np.zeros((8, 9), dtype=np.uint8), extension=".png")
    iio.imwrite(tmp_path / "a2.png", np.zeros((8, 10), dtype=np.uint8), extension=".png")
    with pytest.raises(ValueError, match=r"a1\.png.*\(8, 9\).*a2\.png.*\(8, 10\).*resize"):
        io.read_burst(tmp_path)


def test_read_burst_grey_rgb_mixture(tmp_path):
    iio.imwrite(tmp_path / "a1.png", np.zeros((8, 9, 3), dtype=np.uint8), extension=".png")
    iio.imwrite(tmp_path / "a2.png", np.zeros((8, 9), dtype=np.uint8), extension=".png")
    with pytest.raises(ValueError, match=r"a1\.png is RGB.*a2\.png is grey.*colour mode"):
        io.read_burst(tmp_path)


def test_read_burst_empty_and_missing(tmp_path):
    with pytest.raises(ValueError, match="no frames.*empty"):
        io.read_burst(tmp_path)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no frames"):
        io.read_burst(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        io.read_burst(tmp_path / "nope.tif")
    with pytest.raises(FileNotFoundError):
        io.read_tiff(tmp_path / "nope.tif")


def test_read_burst_single_image_and_unknown_type(tmp_path):
    iio.imwrite(tmp_path / "one.png", np.zeros((8, 9), dtype=np.uint8), extension=".png")
    with pytest.raises(ValueError, match="single image"):
        io.read_burst(tmp_path / "one.png")
    (tmp_path / "x.dat").write_bytes(b"123")
    with pytest.raises(ValueError, match="unsupported file type"):
        io.read_burst(tmp_path / "x.dat")


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "burst.tif"
    io.write_tiff(path, _array((4, 32, 32), "float32"), {"output": "x"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*burst\.tif: .*truncated"):
        io.read_burst(path)
    with pytest.raises(ValueError, match="cannot read"):
        io.read_tiff(path)
    path.write_bytes(b"this is not a tiff")
    with pytest.raises(ValueError, match="cannot read"):
        io.read_burst(path)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2):
        iio.imwrite(folder / f"f{i}.png", np.full((32, 32), 7 * i, dtype=np.uint8), extension=".png")
    png = (folder / "f1.png").read_bytes()
    (folder / "f1.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*f1\.png"):
        io.read_burst(folder)


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path, monkeypatch):
    io.write_tiff(tmp_path / "a.tif", _array((2, 8, 8), "uint8"), {"k": 1})
    io.write_json(tmp_path / "a.json", {"x": np.arange(3)})
    io.write_png(tmp_path / "a.png", _array((8, 8), "float32"))
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.png", "a.tif"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [0, 1, 2]}

    # a failure while writing: no temporary file, no target
    with pytest.raises(TypeError, match="cannot be stored as JSON"):
        io.write_json(tmp_path / "b.json", {"x": object()})
    with pytest.raises(TypeError, match="cannot be stored as JSON"):
        io.write_tiff(tmp_path / "b.tif", _array((2, 8, 8), "uint8"), {"x": object()})
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.png", "a.tif"]

    # interrupted half way through an overwrite: the old file is intact, nothing else is left
    before = (tmp_path / "a.tif").read_bytes()

    def half_then_interrupt(file, *args, **kwargs):
        with open(file, "wb") as fh:
            fh.write(b"II*\x00partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        io.write_tiff(tmp_path / "a.tif", _array((2, 8, 8), "uint8"), {}, overwrite=True)
    assert (tmp_path / "a.tif").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.png", "a.tif"]


def test_overwrite_refusal(tmp_path):
    path = tmp_path / "out.tif"
    io.write_tiff(path, np.zeros((2, 8, 8), np.uint8), {"v": 1})
    with pytest.raises(FileExistsError, match=r"out\.tif.*--overwrite"):
        io.write_tiff(path, np.ones((2, 8, 8), np.uint8), {"v": 2})
    assert io.read_tiff(path)[1] == {"v": 1}
    io.write_tiff(path, np.ones((2, 8, 8), np.uint8), {"v": 2}, overwrite=True)
    assert io.read_tiff(path)[1] == {"v": 2}
    io.write_json(tmp_path / "p.json", {})
    with pytest.raises(FileExistsError):
        io.write_json(tmp_path / "p.json", {})
    io.write_png(tmp_path / "p.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileExistsError):
        io.write_png(tmp_path / "p.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.write_json(tmp_path / "missing" / "p.json", {})
    assert sorted(os.listdir(tmp_path)) == ["out.tif", "p.json", "p.png"]


def test_write_png_scaling(tmp_path):
    ramp = np.linspace(-1.0, 3.0, 5 * 6, dtype=np.float32).reshape(5, 6)
    io.write_png(tmp_path / "auto.png", ramp)
    auto = iio.imread(tmp_path / "auto.png")
    assert auto.dtype == np.uint8 and auto.shape == (5, 6) and auto.min() == 0 and auto.max() == 255
    io.write_png(tmp_path / "fixed.png", np.stack([ramp] * 3, -1), lo=0.0, hi=1.0)
    fixed = iio.imread(tmp_path / "fixed.png")
    assert fixed.shape == (5, 6, 3) and fixed[0, 0, 0] == 0 and fixed[-1, -1, 0] == 255
    rgb8 = _array((5, 6, 3), "uint8")
    io.write_png(tmp_path / "rgb8.png", rgb8)
    np.testing.assert_array_equal(iio.imread(tmp_path / "rgb8.png"), rgb8)
    with pytest.raises(ValueError, match="RGB"):
        io.write_png(tmp_path / "bad.png", np.zeros((4, 4, 2), np.float32))


def test_side_by_side():
    grey = np.linspace(0, 1000, 20 * 30).reshape(20, 30).astype(np.uint16)
    rgb = np.random.default_rng(0).random((40, 25, 3)).astype(np.float32)
    out = io.side_by_side([grey, rgb], gap=4)
    assert out.shape == (40, 30 + 4 + 25, 3) and out.dtype == np.uint8
    assert (out[:, 30:34] == 255).all()                      # white gap
    assert (out[:10, :30] == 255).all()                      # grey image centred vertically on white
    tile = out[10:30, :30]
    assert (tile[..., 0] == tile[..., 1]).all()              # grey -> RGB
    assert tile.min() == 0 and tile.max() == 255             # percentile stretch
    four = np.random.default_rng(1).random((10, 10, 4))
    assert io.side_by_side([four], gap=0).shape == (10, 10, 3)
