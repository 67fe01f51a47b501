"""Fit results -> napari layers. Pure functions, no Qt: usable from napari's console and from the widgets.

The layers are the result's artefact list (``fit.artefacts()``, ``core.result.ARTEFACTS``): every entry with a
napari layer type becomes "<source> <role>", converted by its kind (image, polygons, vectors) and axes.

::

    import napari, napari_nir as nir
    from napari_nir._layers import add_result_to_viewer
    viewer = napari.current_viewer()
    fit = nir.fuse(viewer.layers["burst"].data, steps=300)
    add_result_to_viewer(viewer, fit, "burst")   # "burst canonical", "burst frames", "burst outlines"

Every layer made here carries ``metadata["napari_nir"]`` (the fit's provenance plus which output it is) and
``metadata["napari_nir_owner"] = {"source": ..., "role": ...}``; a later run replaces only layers with
that marker, so a user's own layer called "burst canonical" is never touched.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

    from .core.result import FusionResult

__all__ = ["OWNER_KEY", "META_KEY", "FUSION_ROLES", "fusion_layer_data", "separation_layer_data", "result_layer_data",
           "add_layer_data", "add_fusion_layer_data", "add_result_to_viewer", "owned_layers", "preview_image"]

META_KEY = "napari_nir"
OWNER_KEY = "napari_nir_owner"
# the plugin's samples mark their layers: {"role": "burst" | "ground truth", "task": the separation task or None};
# the widgets never preselect ground truth and start the task menu on the sample's task
SAMPLE_KEY = "napari_nir_sample"


def _layer_roles() -> tuple[str, ...]:
    from .core.result import ARTEFACTS

    return tuple(role for role, spec in ARTEFACTS.items() if spec.layer)


# every output shown as a layer (the artefact table's entries with a napari layer type): a later fit of the same
# source replaces these, and removes those the new result has not got (outlines after a flow fit)
FUSION_ROLES = _layer_roles()

# edge colours of the frame outlines (matplotlib's tab10), cycled over the frames
OUTLINE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf")

LayerDataTuple = tuple[Any, dict, str]


def _spatial_and_time(values: Sequence[float] | None, default: float) -> tuple[float, tuple[float, float]]:
    """(T value, (Y, X) values) from a source layer's scale/translate: (T, Y, X) or (Y, X); None -> defaults."""
    if values is None:
        return default, (default, default)
    v = [float(x) for x in values]
    if len(v) == 2:
        return default, (v[0], v[1])
    if len(v) == 3:
        return v[0], (v[1], v[2])
    raise ValueError(f"scale/translate must have 2 values (Y, X) or 3 (T, Y, X) - the source layer's, without "
                     f"a colour axis; got {len(v)}: {list(values)}")


def _marker(source_name: str, role: str) -> dict:
    return {"source": source_name, "role": role}


def _metadata(provenance: dict, source_name: str, role: str, **output) -> dict:
    record = copy.deepcopy(provenance)
    record["output"] = {"role": role, **output}
    return {META_KEY: record, OWNER_KEY: _marker(source_name, role)}


@dataclass(frozen=True)
class _Placement:
    """Where the source layer sits: its T and (Y, X) scale and translate, and whether colour is shown as rgb."""

    t_scale: float
    yx_scale: tuple[float, float]
    t_shift: float
    yx_shift: tuple[float, float]
    rgb: bool

    def axes(self, time: bool) -> tuple[list[float], list[float]]:
        """(scale, translate) for (T, Y, X) data (``time``) or (Y, X)."""
        if time:
            return [self.t_scale, *self.yx_scale], [self.t_shift, *self.yx_shift]
        return list(self.yx_scale), list(self.yx_shift)


def result_layer_data(fit: FusionResult, source_name: str = "burst", *, scale: Sequence[float] | None = None,
                      translate: Sequence[float] | None = None, rgb: bool | None = None,
                      should_stop=None) -> list[LayerDataTuple] | None:
    """A result as napari LayerDataTuples ``(data, kwargs, layer_type)``: one per entry of
    ``fit.artefacts("union", 1.0)`` that has a napari layer type, in that order, named "<source> <role>".

    fit: a FusionResult (``napari_nir.fuse``) or a SeparationResult (``napari_nir.separate``).
    source_name: the input layer's name; outputs are e.g. "<source> canonical", "<source> frames",
        "<source> outlines" (homography), "<source> flow vectors" (flow models), "<source> scene" (separation).
    scale, translate: the source layer's, for its non-colour axes: (T, Y, X), or (Y, X). Images with a T axis
        (frames, scene, flow magnitude, ...) and the flow vectors keep it; the canonical views and the
        outlines drop it.
    rgb: whether the last axis is colour; None: True when the burst had 3 or 4 channels.

    Images: a multichannel, non-RGB burst (C not shown as colour) gets its channel axis in front of Y, X
    (canonical (C, H', W'), frames (T, C, H, W)); a single channel is squeezed away; the artefact's display
    hints (colormap, contrast limits) become layer arguments. Polygons (outlines): every frame's border drawn
    on the canonical view, one colour per frame (cycling), labelled with the frame index, transparent faces.
    Vectors (flow): arrows (t, row, col) on the frames' grid. Each layer's ``metadata["napari_nir"]`` is the
    fit's provenance with ``"output": {"role": ..., "convention": ..., <view>}``.
    should_stop(): asked before each output is rendered (a GUI's cancel); None is returned when it says so.
    """
    from napari_nir import Stopped

    channels = fit.channels if fit.input_layout == "THWC" else 0
    if rgb is None:
        rgb = channels in (3, 4)
    if rgb and channels not in (3, 4):
        raise ValueError(f"rgb=True needs a burst with 3 or 4 colour channels; this one has {channels or 'none'}")
    t_scale, yx_scale = _spatial_and_time(scale, 1.0)
    t_shift, yx_shift = _spatial_and_time(translate, 0.0)
    place = _Placement(t_scale, yx_scale, t_shift, yx_shift, bool(rgb))
    provenance = fit.provenance()
    try:
        artefacts = [a for a in fit.artefacts("union", 1.0, should_stop=should_stop) if a.layer]
    except Stopped:
        return None
    canonical = next((a for a in artefacts if a.role == "canonical"), None)
    view_size = max(np.shape(canonical.data)[:2]) if canonical is not None else None
    out: list[LayerDataTuple] = []
    for artefact in artefacts:
        convert = _CONVERTERS.get(artefact.layer)
        if convert is None:
            raise ValueError(f"artefact {artefact.role!r}: no napari layer type {artefact.layer!r}")
        data, kwargs = convert(artefact, place, view_size)
        kwargs = {"name": f"{source_name} {artefact.role}", **kwargs, "visible": bool(artefact.visible),
                  "metadata": _metadata(provenance, source_name, artefact.role, **artefact.metadata)}
        out.append((data, kwargs, artefact.layer))
    return out


def fusion_layer_data(fit: FusionResult, source_name: str = "burst", *, scale: Sequence[float] | None = None,
                      translate: Sequence[float] | None = None, rgb: bool | None = None,
                      should_stop=None) -> list[LayerDataTuple] | None:
    """A fusion result as LayerDataTuples: "<source> canonical", "<source> frames" and the alignment
    ("<source> outlines" for a homography; "<source> flow vectors", "<source> flow magnitude" [, "<source>
    occlusion w"] for the flow models). The same as ``result_layer_data`` (see there)."""
    return result_layer_data(fit, source_name, scale=scale, translate=translate, rgb=rgb, should_stop=should_stop)


def separation_layer_data(sep, source_name: str = "burst", *, scale: Sequence[float] | None = None,
                          translate: Sequence[float] | None = None, rgb: bool | None = None,
                          should_stop=None) -> list[LayerDataTuple] | None:
    """A SeparationResult as LayerDataTuples: "<source> scene", "<source> interference" [, "<source> alpha"]
    (T, H, W[, C]) per frame, "<source> interference canonical" where the interference has a rigid layer, plus
    the scene's fusion layers (canonical, frames, alignment; hidden but the canonical). The same as
    ``result_layer_data`` (see there)."""
    return result_layer_data(sep, source_name, scale=scale, translate=translate, rgb=rgb, should_stop=should_stop)


def _image(artefact, place: _Placement, view_size) -> tuple[Any, dict]:
    axes = artefact.spec.axes
    if axes == "source":  # the input's own axes (registered): a burst's layout, or e.g. T x C x Y x X
        source = artefact.metadata.get("axes", "TYX")
        # it sits where its pixels are on the canonical view (whose first pixel is at the source's translate)
        row, col = artefact.metadata.get("origin_in_canonical", (0.0, 0.0))
        place = replace(place, yx_shift=(place.yx_shift[0] + row * place.yx_scale[0],
                                         place.yx_shift[1] + col * place.yx_scale[1]))
        if source not in ("TYX", "TYXC"):
            return _any_axes(artefact, place, source)
        axes = "TYX[C]"
    block = artefact.metadata.get("input_pixels_per_pixel", 1.0)  # data on a reduced grid (the residual map)
    if block != 1.0:  # pixel centres of k x k blocks: scaled by k, shifted by (k - 1) / 2 input pixels
        place = replace(place, yx_scale=tuple(v * block for v in place.yx_scale),
                        yx_shift=tuple(s + (block - 1) / 2 * v for s, v in zip(place.yx_shift, place.yx_scale)))
    scale, translate = place.axes(time=axes.startswith("T"))
    data = artefact.data
    shown_rgb = False
    if artefact.channels:
        n = np.shape(data)[-1]
        shown_rgb = place.rgb and axes.endswith("[C]") and n in (3, 4)
        data, scale, translate = _channel_axes(data, n, shown_rgb, scale, translate)
    return data, {"rgb": shown_rgb, "scale": scale, "translate": translate, **artefact.spec.display}


def _any_axes(artefact, place: _Placement, axes: str) -> tuple[Any, dict]:
    """An image in an axes order such as "TCYX": T, Y, X placed like the source layer, other axes at unit scale."""
    scale = {"T": place.t_scale, "Y": place.yx_scale[0], "X": place.yx_scale[1]}
    shift = {"T": place.t_shift, "Y": place.yx_shift[0], "X": place.yx_shift[1]}
    return artefact.data, {"rgb": False, "scale": [scale.get(a, 1.0) for a in axes],
                           "translate": [shift.get(a, 0.0) for a in axes], **artefact.spec.display}


def _polygons(artefact, place: _Placement, view_size) -> tuple[Any, dict]:
    corners = [np.asarray(c, dtype=np.float64) for c in artefact.data]  # T x (4, 2) (row, col) canonical pixels
    n = len(corners)
    if view_size is None:
        points = np.concatenate(corners) if corners else np.zeros((1, 2))
        view_size = float(np.max(np.ptp(points, axis=0)))
    scale, translate = place.axes(time=False)
    kwargs = {"shape_type": "polygon", "edge_color": [OUTLINE_COLOURS[i % len(OUTLINE_COLOURS)] for i in range(n)],
              "face_color": "transparent", "edge_width": max(1.0, 0.006 * view_size), "scale": scale,
              "translate": translate, "features": {"frame": np.arange(n)},
              "text": {"string": "{frame}", "color": "white", "size": 9, "anchor": "upper_left"}}
    return corners, {**kwargs, **artefact.spec.display}


def _vectors(artefact, place: _Placement, view_size) -> tuple[Any, dict]:
    scale, translate = place.axes(time=True)  # (N, 2, 3): start and direction in (t, row, col) pixels
    return np.asarray(artefact.data, dtype=np.float32), {"edge_width": 0.6, "length": 1.0, "scale": scale,
                                                          "translate": translate, **artefact.spec.display}


_CONVERTERS = {"image": _image, "shapes": _polygons, "vectors": _vectors}


def _channel_axes(data: np.ndarray, channels: int, rgb: bool, scale, translate):
    """(..., H, W, C) data and its (..., Y, X) scale/translate as napari should show them: (data, scale,
    translate). Colour (rgb) and grey (no channel axis) stay; a single channel is squeezed away; several
    channels move in front of Y, X, so that napari shows a (C,) slider, not a width-C image."""
    scale, translate = list(scale), list(translate)
    if not channels or rgb:
        return data, scale, translate
    if channels == 1:
        return data[..., 0], scale, translate
    return np.moveaxis(data, -1, -3), [*scale[:-2], 1.0, *scale[-2:]], [*translate[:-2], 0.0, *translate[-2:]]


def owned_layers(viewer: napari.Viewer, source_name: str | None = None, role: str | None = None) -> list[Layer]:
    """The viewer's layers made by napari-nir (optionally: for this source name and/or output role)."""
    found = []
    for layer in viewer.layers:
        marker = layer.metadata.get(OWNER_KEY) if isinstance(layer.metadata, dict) else None
        if not marker:
            continue
        if source_name is not None and marker.get("source") != source_name:
            continue
        if role is not None and marker.get("role") != role:
            continue
        found.append(layer)
    return found


def _find_own(viewer: napari.Viewer, name: str, marker: dict) -> Layer | None:
    """Our layer to replace: the one with this exact name if it is ours, else ours for the same source/role
    (napari renamed it "<name> [1]" because a user layer already had the name)."""
    if name in viewer.layers:
        layer = viewer.layers[name]
        if layer.metadata.get(OWNER_KEY):
            return layer
    candidates = owned_layers(viewer, marker.get("source"), marker.get("role"))
    return candidates[0] if candidates else None


def add_layer_data(viewer: napari.Viewer, layer_data: Sequence[LayerDataTuple]) -> list[Layer]:
    """Add LayerDataTuples (with the owner marker in their metadata) to ``viewer``, replacing our own layers.

    An image layer of ours with the same name is updated in place (keeps its place, colormap and
    visibility; contrast limits are reset to the new data); other layers of ours are replaced at the same
    position. Layers without the marker are never modified. Returns the layers, in order.
    """
    from napari.layers import Image, Layer

    layers = []
    for data, kwargs, layer_type in layer_data:
        kwargs = dict(kwargs)
        marker = kwargs.get("metadata", {}).get(OWNER_KEY)
        if not marker:
            raise ValueError(f"layer {kwargs.get('name')!r} has no metadata[{OWNER_KEY!r}] marker; add it so that "
                             "re-runs can find and replace it")
        existing = _find_own(viewer, kwargs["name"], marker)
        if (existing is not None and layer_type == "image" and isinstance(existing, Image)
                and bool(existing.rgb) == bool(kwargs.get("rgb")) and existing.data.ndim == np.ndim(data)):
            existing.data = data
            existing.metadata = kwargs["metadata"]
            existing.scale = kwargs.get("scale", existing.scale)
            existing.translate = kwargs.get("translate", existing.translate)
            existing.reset_contrast_limits_range()
            existing.reset_contrast_limits()
            layers.append(existing)
            continue
        if existing is not None and _update_in_place(existing, data, kwargs, layer_type):
            layers.append(existing)
            continue
        if existing is not None:
            kwargs["visible"] = existing.visible  # the user's choice survives a re-run
        new = Layer.create(data, kwargs, layer_type)
        if existing is not None:
            index = viewer.layers.index(existing)
            viewer.layers.remove(existing)
            viewer.layers.insert(index, new)
        else:
            viewer.layers.append(new)
        layers.append(new)
    return layers


def _update_in_place(existing: Layer, data, kwargs: dict, layer_type: str) -> bool:
    """Update a shapes layer of ours with as many shapes, or a vectors layer, in place; False for anything else.

    Replacing a layer removes one, and napari runs a full garbage collection on every removal (0.3 s and more in
    a session with torch loaded: benchmarks/RESULTS.md "napari"), so a re-run updates what it can."""
    from napari.layers import Shapes, Vectors

    if layer_type == "shapes" and isinstance(existing, Shapes) and existing.nshapes == len(data):
        existing.data = data
        existing.edge_color = kwargs.get("edge_color", existing.edge_color)
        existing.edge_width = kwargs.get("edge_width", existing.edge_width)
    elif layer_type == "vectors" and isinstance(existing, Vectors):
        existing.data = data
    else:
        return False
    existing.metadata = kwargs["metadata"]
    existing.scale = kwargs.get("scale", existing.scale)
    existing.translate = kwargs.get("translate", existing.translate)
    return True


def add_result_to_viewer(viewer: napari.Viewer, fit: FusionResult, source_name: str = "burst", *,
                         scale: Sequence[float] | None = None, translate: Sequence[float] | None = None,
                         rgb: bool | None = None) -> list[Layer]:
    """Show a fit in ``viewer``: add, or replace (ours only), its layers ("<source> canonical", "<source> frames",
    "<source> outlines" for a homography, ...; see ``result_layer_data``). The console helper::

        fit = napari_nir.fuse(viewer.layers["burst"].data)
        add_result_to_viewer(viewer, fit, "burst")

    scale/translate: the source layer's (T, Y, X) or (Y, X); when None and a layer named ``source_name`` is
    in the viewer, they are taken from it (as is ``rgb``). Returns the layers.
    Layers of ours for this source that this fit has not got (outlines after a flow fit) are removed.
    """
    from napari.layers import Image

    if source_name in viewer.layers:
        source = viewer.layers[source_name]
        if isinstance(source, Image) and source.ndim >= 3:
            scale = source.scale[-3:] if scale is None else scale
            translate = source.translate[-3:] if translate is None else translate
            if rgb is None and source.rgb and fit.input_layout == "THWC" and fit.channels in (3, 4):
                rgb = True
    return add_fusion_layer_data(viewer, source_name,
                                 result_layer_data(fit, source_name, scale=scale, translate=translate, rgb=rgb))


def add_fusion_layer_data(viewer: napari.Viewer, source_name: str, layer_data: Sequence[LayerDataTuple]) -> list[Layer]:
    """``add_layer_data`` for the output of ``result_layer_data`` (``fusion_layer_data``), first removing our
    layers of this source (roles in ``FUSION_ROLES``) that the new result does not have (outlines after a flow
    fit). Returns the layers."""
    remove_stale_layers(viewer, source_name, layer_data)
    return add_layer_data(viewer, layer_data)


def remove_stale_layers(viewer: napari.Viewer, source_name: str, layer_data: Sequence[LayerDataTuple]) -> None:
    """Remove our layers of this source whose roles (``FUSION_ROLES``) the new ``layer_data`` has not got."""
    made = {kwargs["metadata"][OWNER_KEY]["role"] for _, kwargs, _ in layer_data}
    for role in _layer_roles():  # read at each call: the table is the truth, not a copy made at import
        if role not in made:
            for layer in owned_layers(viewer, source_name, role):
                viewer.layers.remove(layer)


def preview_image(preview: np.ndarray) -> tuple[np.ndarray, bool]:
    """A ``ProgressEvent.preview`` (h, w, C) in [0, 1] -> (image, rgb) to show: colour for 3/4 channels,
    else the first channel (h, w)."""
    preview = np.asarray(preview, dtype=np.float32)
    if preview.ndim == 3 and preview.shape[-1] in (3, 4):
        return preview, True
    if preview.ndim == 3:
        return preview[..., 0], False
    return preview, False
