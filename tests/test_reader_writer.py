"""napari reader and writer contributions: folders of frames open as one burst; result layers round-trip."""
from __future__ import annotations

import numpy as np
import pytest

from napari_nir import _reader, _writer, io


def test_folder_of_frames_reads_as_one_burst(tmp_path):
    frames = (np.random.default_rng(0).random((3, 16, 20, 3)) * 255).astype(np.uint8)
    for i, frame in enumerate(frames):
        io.write_png(tmp_path / f"frame{i + 1}.png", frame)
    reader = _reader.get_reader(str(tmp_path))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(tmp_path))
    assert kind == "image" and kwargs["rgb"] is True
    np.testing.assert_array_equal(data, frames)
    assert _reader.get_reader(str(tmp_path / "frame1.png")) is None  # single images: napari's own reader
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _reader.get_reader(str(empty)) is None


def test_writer_round_trip_keeps_data_and_provenance(tmp_path, small_fit):
    canonical = small_fit.canonical()
    meta = {"name": "burst canonical", "rgb": True, "metadata": {"napari_nir": small_fit.provenance()}}
    path = str(tmp_path / "canonical.tif")
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
def test_viewer_opens_a_folder_with_the_plugin(make_napari_viewer, tmp_path):
    frames = (np.random.default_rng(1).random((2, 16, 16)) * 65535).astype(np.uint16)
    for i, frame in enumerate(frames):
        io.write_tiff(tmp_path / f"t{i}.tif", frame, {})
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path), plugin="napari-nir")
    assert len(layers) == 1 and layers[0].data.shape == (2, 16, 16)
