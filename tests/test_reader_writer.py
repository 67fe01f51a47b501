"""napari reader and writer contributions: the reader claims only napari-nir's own files; results round-trip."""
from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest

from napari_nir import _reader, _writer, io


def test_reader_claims_only_its_own_files(tmp_path):
    """Nothing napari's own reader opens is claimed (no "Choose reader" dialog for a PNG, CSV, TIFF or folder)."""
    frame = (np.random.default_rng(0).random((16, 20, 3)) * 255).astype(np.uint8)
    io.write_png(tmp_path / "frame.png", frame)
    io.write_tiff(tmp_path / "plain.tif", frame, {})
    io.write_tiff(tmp_path / "result.nir.tif", frame, {"software": "napari-nir"})
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    for name in ("frame.png", "plain.tif", "table.csv", "."):
        assert _reader.get_reader(str(tmp_path / name)) is None, name
    assert _reader.get_reader(str(tmp_path / "result.nir.tif")) is not None
    assert _reader.get_reader([str(tmp_path / "result.nir.tif")] * 2) is None  # one file at a time

    import yaml

    manifest = yaml.safe_load((Path(_reader.__file__).parent / "napari.yaml").read_text())
    [reader] = manifest["contributions"]["readers"]
    assert reader["accepts_directories"] is False
    for name in ("frame.png", "plain.tif", "plain.TIFF", "table.csv", "stack.tiff", "x.npz", "x.zarr"):
        assert not any(fnmatch(name.lower(), p.lower()) for p in reader["filename_patterns"]), name


def test_colour_tiff_reads_as_one_colour_image(tmp_path):
    canonical = np.random.default_rng(2).random((40, 30, 3)).astype(np.float32)
    path = tmp_path / "canonical.nir.tif"
    io.write_tiff(path, canonical, {"output": "canonical"}, channels=True)
    [(data, kwargs, kind)] = _reader.read_layers(str(path))
    assert kind == "image" and kwargs["rgb"] is True and data.shape == (40, 30, 3) and kwargs["name"] == "canonical"
    assert kwargs["metadata"]["napari_nir"] == {"output": "canonical"}


def test_writer_round_trip_keeps_data_and_provenance(tmp_path, small_fit):
    canonical = small_fit.canonical()
    meta = {"name": "burst canonical", "rgb": True, "metadata": {"napari_nir": small_fit.provenance()}}
    path = str(tmp_path / "canonical.nir.tif")
    assert _writer.write_image(path, canonical, meta) == [path]
    [(data, kwargs, _)] = _reader.get_reader(path)(path)
    np.testing.assert_array_equal(data, canonical)
    back = kwargs["metadata"]["napari_nir"]
    assert back["parameters"] == small_fit.provenance()["parameters"] and back["layer_name"] == "burst canonical"


def test_writer_records_the_artefact_convention_and_channels(tmp_path, small_fit, monkeypatch):
    from napari_nir._layers import fusion_layer_data
    from napari_nir.core.result import ARTEFACTS

    layers = {kw["name"]: (d, kw) for d, kw, kind in fusion_layer_data(small_fit, "burst") if kind == "image"}
    for role in ("canonical", "frames"):
        data, kwargs = layers[f"burst {role}"]
        path = str(tmp_path / f"{role}.tif")
        _writer.write_image(path, data, kwargs)
        back, record = io.read_tiff(path)
        np.testing.assert_array_equal(back, data)
        assert record["convention"] == ARTEFACTS[role].description and record["output"]["role"] == role
        assert record["layer_name"] == f"burst {role}"

    calls = []
    monkeypatch.setattr(io, "write_tiff", lambda path, array, record, **kw: calls.append((record, kw["channels"])))
    rgb = np.zeros((3, 8, 8, 3), np.float32)
    for output, rgb_flag, channels in ((None, True, True), ({"role": "scene"}, True, True),
                                       ({"role": "scene"}, False, False), ("alpha", True, False),
                                       ({"role": "not an artefact"}, True, True)):
        provenance = {"software": "napari-nir"} if output is None else {"software": "napari-nir", "output": output}
        _writer.write_image(str(tmp_path / "x.tif"), rgb, {"name": "x", "rgb": rgb_flag,
                                                           "metadata": {"napari_nir": provenance}})
        record, flag = calls[-1]
        assert flag is channels, (output, rgb_flag)
        role = output.get("role") if isinstance(output, dict) else output
        assert record.get("convention") == (ARTEFACTS[role].description if role in ARTEFACTS else None)


@pytest.mark.gui
def test_napari_opens_other_files_without_asking_and_saves_results_with_provenance(make_napari_viewer, tmp_path):
    """viewer.open raises MultipleReaderError (napari's GUI shows its "Choose reader" dialog) when two readers
    claim a file: none for a PNG, a CSV, a plain or colour TIFF or a folder of frames."""
    frames = (np.random.default_rng(1).random((2, 16, 16)) * 65535).astype(np.uint16)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        io.write_tiff(folder / f"t{i}.tif", frame, {})
    io.write_png(tmp_path / "frame.png", (frames[0] >> 8).astype(np.uint8))
    io.write_tiff(tmp_path / "stack.tif", frames, {})
    colour = np.random.default_rng(2).random((40, 48, 3)).astype(np.float32)  # napari guesses colour from 31 px on
    io.write_tiff(tmp_path / "canonical.tif", colour, {"output": "canonical"}, channels=True)  # as the CLI writes
    (tmp_path / "points.csv").write_text("index,axis-0,axis-1\n0,1.0,2.0\n")
    viewer = make_napari_viewer()
    for name in ("frame.png", "stack.tif", "frames", "points.csv"):
        assert viewer.open(str(tmp_path / name)), name
    assert viewer.layers["stack"].data.shape == (2, 16, 16)
    [canonical] = viewer.open(str(tmp_path / "canonical.tif"))
    assert canonical.rgb and canonical.data.shape == (40, 48, 3)

    # a result layer saved under the name the writer suggests keeps its provenance, and opens with it
    layer = viewer.add_image(colour, rgb=True, name="burst canonical",
                             metadata={"napari_nir": {"software": "napari-nir", "output": {"role": "canonical"}}})
    path = tmp_path / "burst canonical.nir.tif"
    layer.save(str(path))  # napari's own save: the longest matching extension picks the writer
    assert io.read_tiff(path)[1]["software"] == "napari-nir"
    [back] = viewer.open(str(path), plugin="napari-nir")
    assert back.rgb and back.metadata["napari_nir"]["output"]["role"] == "canonical"
