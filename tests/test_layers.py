"""Results -> napari layers: one layer per artefact with a napari layer type, converted by kind and axes."""
from __future__ import annotations

import numpy as np
import pytest

from napari_nir._layers import FUSION_ROLES, META_KEY, OWNER_KEY, fusion_layer_data, separation_layer_data
from napari_nir.core.result import ARTEFACTS

TINY = {"steps": 10, "device": "cpu", "batch": 1024, "preview_every": 0}


@pytest.fixture(scope="module")
def fits():
    """Tiny fits (3 x 24 x 24): an RGB homography, a grey occlusion, a two-channel flow, a rain separation."""
    import napari_nir as nir
    from napari_nir._sample_data import flow_burst, homography_burst, separation_burst

    rgb = homography_burst(3, (24, 24), seed=1).frames
    moving = flow_burst(3, (24, 24)).frames
    return {
        "homography": nir.fuse(rgb, "homography", **TINY),
        "occlusion grey": nir.fuse(moving.mean(-1), "occlusion", **TINY),
        "flow 2 channels": nir.fuse(moving[..., :2], "flow", **TINY),
        "rain": nir.separate(separation_burst("rain", 3, (24, 24)).frames, "rain", **TINY),
    }


def test_fusion_roles_are_the_artefacts_with_a_layer():
    assert FUSION_ROLES == tuple(role for role, spec in ARTEFACTS.items() if spec.layer)
    assert {"canonical", "frames", "outlines", "flow vectors", "scene"} <= set(FUSION_ROLES)


@pytest.mark.parametrize("name", ["homography", "occlusion grey", "flow 2 channels", "rain"])
def test_layers_correspond_one_to_one_to_the_artefacts_with_a_layer(fits, name):
    from napari.layers import Layer

    fit = fits[name]
    artefacts = [a for a in fit.artefacts("union", 1.0) if a.layer]
    data = fusion_layer_data(fit, "src", scale=(1.0, 2.0, 3.0), translate=(0.0, 10.0, 20.0))
    assert [kw["name"] for _, kw, _ in data] == [f"src {a.role}" for a in artefacts]
    assert [kind for _, _, kind in data] == [a.layer for a in artefacts]
    assert [kw["visible"] for _, kw, _ in data] == [a.visible for a in artefacts]
    assert [kw["name"] for _, kw, _ in separation_layer_data(fit, "src")] == [kw["name"] for _, kw, _ in data]
    provenance = fit.provenance()
    for (layer_data, kwargs, kind), artefact in zip(data, artefacts):
        record = kwargs["metadata"][META_KEY]
        assert kwargs["metadata"][OWNER_KEY] == {"source": "src", "role": artefact.role}
        assert record["output"] == {"role": artefact.role, **artefact.metadata}
        assert record["output"]["convention"] == ARTEFACTS[artefact.role].description
        assert record["parameters"] == provenance["parameters"]
        for key, value in artefact.spec.display.items():
            assert kwargs[key] == value
        layer = Layer.create(layer_data, kwargs, kind)  # napari accepts every argument
        # the registered stack sits where its pixels are on the canonical view; everything else at the source's place
        row, col = artefact.metadata.get("origin_in_canonical", (0.0, 0.0))
        assert list(layer.scale[-2:]) == [2.0, 3.0]
        np.testing.assert_allclose(layer.translate[-2:], [10.0 + 2.0 * row, 20.0 + 3.0 * col])
        axes = artefact.spec.axes
        if kind == "vectors" or (kind == "image" and (axes.startswith("T") or axes == "source")):
            assert layer.ndim >= 3 and layer.scale[0] == 1.0  # a T axis, with the source's T scale
        else:
            assert layer.ndim == 2 or (kind == "image" and not layer.rgb and layer.ndim == 3)  # (C, Y, X)
        if kind == "image":
            assert layer.rgb == (name in ("homography", "rain") and (axes.endswith("[C]") or axes == "source"))


def test_channel_handling(fits):
    two = fits["flow 2 channels"]
    by_name = {kw["name"]: (d, kw) for d, kw, _ in fusion_layer_data(two, "b", scale=(1.0, 2.0, 2.0))}
    canonical, kwargs = by_name["b canonical"]
    assert canonical.ndim == 3 and canonical.shape[0] == 2 and not kwargs["rgb"]  # (C, H', W'): a C slider
    assert kwargs["scale"] == [1.0, 2.0, 2.0]
    frames, kwargs = by_name["b frames"]
    assert frames.shape == (3, 2, 24, 24) and kwargs["scale"] == [1.0, 1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="rgb=True needs"):
        fusion_layer_data(two, "b", rgb=True)
    grey = {kw["name"]: d for d, kw, _ in fusion_layer_data(fits["occlusion grey"], "g")}
    assert grey["g canonical"].ndim == 2 and grey["g frames"].shape == (3, 24, 24)
    assert grey["g occlusion w"].shape == (3, 24, 24)
    shown = {kw["name"]: d for d, kw, _ in fusion_layer_data(fits["homography"], "h", rgb=False)}
    assert shown["h canonical"].shape[0] == 3 and shown["h frames"].shape[:2] == (3, 3)  # colour as channels


def test_names_and_visibility_of_each_kind_of_result(fits):
    def shown(fit):
        return {kw["name"].split(" ", 1)[1]: kw["visible"] for _, kw, _ in fusion_layer_data(fit, "burst")}

    assert shown(fits["homography"]) == {"canonical": True, "frames": False, "registered": False, "outlines": True,
                                         "residual": False}
    assert shown(fits["flow 2 channels"]) == {"canonical": True, "frames": False, "registered": False,
                                              "flow vectors": True, "flow magnitude": False, "residual": False}
    assert shown(fits["occlusion grey"])["occlusion w"] is False
    assert shown(fits["rain"]) == {"scene": True, "interference": False, "alpha": False, "kept frame pixels": False,
                                   "canonical": True, "frames": False, "registered": False, "outlines": False,
                                   "residual": False}
    outlines = next((d, kw) for d, kw, kind in fusion_layer_data(fits["homography"], "burst") if kind == "shapes")
    assert len(outlines[0]) == 3 and all(np.shape(c) == (4, 2) for c in outlines[0])
    assert list(outlines[1]["features"]["frame"]) == [0, 1, 2] and outlines[1]["face_color"] == "transparent"


def test_a_new_output_is_one_artefact_entry(tmp_path, monkeypatch):
    """Adding an output is one entry in the artefact table: the CLI writes it and napari gets a layer of it."""
    import json

    import napari_nir as nir
    from napari_nir import cli, io
    from napari_nir._sample_data import homography_burst
    from napari_nir.core import result

    toy = result.ArtefactSpec("toy brightness", "image", "TYX", "mean of the fit's frames over the channels",
                              "toy_brightness.tif", "image", lambda r, v: r.frames(dtype="float32").mean(-1))
    monkeypatch.setitem(result.ARTEFACTS, toy.role, toy)
    burst = homography_burst(3, (24, 24), seed=1).frames
    fit = nir.fuse(burst, **TINY)
    names = [kwargs["name"] for _, kwargs, _ in fusion_layer_data(fit, "src")]
    assert "src toy brightness" in names
    io.write_tiff(tmp_path / "burst.tif", burst, {}, channels=True)
    assert cli.main(["fuse", str(tmp_path / "burst.tif"), "-o", str(tmp_path / "out"), "--steps", "5",
                     "--device", "cpu", "--quiet"]) == 0
    written, meta = io.read_tiff(tmp_path / "out" / "toy_brightness.tif")
    assert written.shape == (3, 24, 24) and meta["output"] == "toy brightness"
    assert "toy_brightness.tif" in json.loads((tmp_path / "out" / "provenance.json").read_text())["outputs"]


def test_reduced_residual_sits_on_the_frames():
    """The residual map is on frames reduced by k x k block means: each of its pixels covers k x k input pixels, so
    its layer is scaled by k and shifted by (k - 1) / 2 input pixels from the source layer's placement."""
    from napari_nir._layers import _image, _Placement
    from napari_nir.core.result import Artefact

    spec = ARTEFACTS["residual"]
    artefact = Artefact(spec, np.zeros((3, 8, 8), np.float32), False, {"input_pixels_per_pixel": 4.0}, False)
    _, kwargs = _image(artefact, _Placement(1.0, (2.0, 3.0), 0.0, (10.0, 20.0), False), 64)
    assert kwargs["scale"] == [1.0, 8.0, 12.0]
    assert kwargs["translate"] == [0.0, 10.0 + 1.5 * 2.0, 20.0 + 1.5 * 3.0]
