"""Fit results -> napari layers. Pure functions, no Qt: usable from napari's console and from the widgets.

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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

    from .core.result import FusionResult

__all__ = ["OWNER_KEY", "META_KEY", "fusion_layer_data", "add_layer_data", "add_fusion_layer_data",
           "add_result_to_viewer", "owned_layers", "preview_image"]

META_KEY = "napari_nir"
OWNER_KEY = "napari_nir_owner"
FUSION_ROLES = ("canonical", "frames", "outlines", "flow", "flow magnitude", "occlusion w",
                "interference canonical")  # a later fit of the same source replaces these

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


def _metadata(fit: FusionResult, source_name: str, role: str, **output) -> dict:
    provenance = fit.provenance()
    provenance["output"] = {"role": role, **output}
    return {META_KEY: provenance, OWNER_KEY: _marker(source_name, role)}


def fusion_layer_data(fit: FusionResult, source_name: str = "burst", *, scale: Sequence[float] | None = None,
                      translate: Sequence[float] | None = None, rgb: bool | None = None) -> list[LayerDataTuple]:
    """A fusion result as napari LayerDataTuples ``(data, kwargs, layer_type)``.

    fit: a FusionResult (``napari_nir.fuse``; a SeparationResult works too: its scene stream).
    source_name: the input layer's name; outputs are "<source> canonical", "<source> frames" and, for
        motion="homography", "<source> outlines".
    scale, translate: the source layer's, for its non-colour axes: (T, Y, X), or (Y, X). The canonical view
        and the outlines drop the T axis; the frames keep it.
    rgb: whether the last axis is colour; None: True when the burst had 3 or 4 channels.

    Returns a list of
      - ``(canonical, {...}, "image")``: (H', W'[, C]) in the burst's dtype and units, union extent, scale 1;
      - ``(frames, {...}, "image")``: (T, H, W[, C]) per-frame reconstructions;
      - ``(outlines, {...}, "shapes")`` (homography only): T polygons of 4 (row, col) corners, every frame's
        border drawn on the canonical view, one colour per frame (cycling), transparent faces.
    A multichannel, non-RGB burst (C not shown as colour) gets its channel axis in front of Y, X:
    canonical (C, H', W'), frames (T, C, H, W); a single channel is squeezed away.
    """
    b = fit._burst
    channels = b.C if b.layout == "THWC" else 0
    if rgb is None:
        rgb = channels in (3, 4)
    if rgb and channels not in (3, 4):
        raise ValueError(f"rgb=True needs a burst with 3 or 4 colour channels; this one has {channels or 'none'}")
    t_scale, yx_scale = _spatial_and_time(scale, 1.0)
    t_shift, yx_shift = _spatial_and_time(translate, 0.0)

    canonical, can_scale, can_shift = _channel_axes(fit.canonical("union", 1.0), channels, rgb, yx_scale, yx_shift)
    frames, fr_scale, fr_shift = _channel_axes(fit.frames(), channels, rgb, [t_scale, *yx_scale],
                                               [t_shift, *yx_shift])

    out: list[LayerDataTuple] = [
        (canonical, {"name": f"{source_name} canonical", "rgb": bool(rgb), "scale": can_scale,
                     "translate": can_shift,
                     "metadata": _metadata(fit, source_name, "canonical", extent="union", scale=1.0)}, "image"),
        (frames, {"name": f"{source_name} frames", "rgb": bool(rgb), "scale": fr_scale, "translate": fr_shift,
                  "visible": False, "metadata": _metadata(fit, source_name, "frames")}, "image"),
    ]
    if fit.is_flow:
        out += flow_layer_data(fit, source_name, t_scale=t_scale, t_shift=t_shift, yx_scale=yx_scale,
                               yx_shift=yx_shift)
    else:
        corners = fit.outlines("union", 1.0)  # (T, 4, 2) (row, col) pixels of the canonical view
        size = max(canonical.shape[-2:] if not rgb else canonical.shape[:2])
        n = len(corners)
        colours = [OUTLINE_COLOURS[i % len(OUTLINE_COLOURS)] for i in range(n)]
        out.append((
            [c.astype(np.float64) for c in corners],
            {"name": f"{source_name} outlines", "shape_type": "polygon", "edge_color": colours,
             "face_color": "transparent", "edge_width": max(1.0, 0.006 * size), "scale": list(yx_scale),
             "translate": list(yx_shift), "features": {"frame": np.arange(n)},
             "text": {"string": "{frame}", "color": "white", "size": 9, "anchor": "upper_left"},
             "metadata": _metadata(fit, source_name, "outlines", extent="union", scale=1.0)},
            "shapes",
        ))
    return out


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


def flow_layer_data(fit: FusionResult, source_name: str, *, t_scale=1.0, t_shift=0.0, yx_scale=(1.0, 1.0),
                    yx_shift=(0.0, 0.0), step: int | None = None) -> list[LayerDataTuple]:
    """Flow models: "<source> flow" Vectors (arrows every ``step`` pixels, per frame, frame -> canonical) and
    "<source> flow magnitude" (T, H, W) float32 pixels, both on the frames' grid; the occlusion model adds
    "<source> occlusion w" (T, H, W) float32 in [-1, 1]: the depth slice of every pixel (moving objects apart from
    the background's 0)."""
    flow = fit.flow()  # (T, H, W, 2) (d_row, d_col)
    t, h, w, _ = flow.shape
    step = step or max(4, min(h, w) // 24)
    rows, cols = np.mgrid[step // 2:h:step, step // 2:w:step]
    vectors = []
    for k in range(t):
        d = flow[k, rows, cols]  # (n_r, n_c, 2)
        start = np.stack([np.full(rows.size, k), rows.ravel(), cols.ravel()], 1)
        direction = np.concatenate([np.zeros((rows.size, 1)), d.reshape(-1, 2)], 1)
        vectors.append(np.stack([start, direction], 1))
    scale3, shift3 = [t_scale, *yx_scale], [t_shift, *yx_shift]
    return [
        (np.concatenate(vectors).astype(np.float32),
         {"name": f"{source_name} flow", "edge_color": "yellow", "edge_width": 0.6, "length": 1.0,
          "scale": scale3, "translate": shift3, "metadata": _metadata(fit, source_name, "flow", step=step)},
         "vectors"),
        (np.hypot(flow[..., 0], flow[..., 1]).astype(np.float32),
         {"name": f"{source_name} flow magnitude", "colormap": "magma", "visible": False, "scale": scale3,
          "translate": shift3, "metadata": _metadata(fit, source_name, "flow magnitude", unit="pixels")}, "image"),
    ] + ([] if fit.motion != "occlusion" else [
        (fit.occlusion_w(),
         {"name": f"{source_name} occlusion w", "colormap": "twilight_shifted", "contrast_limits": (-1.0, 1.0),
          "visible": False, "scale": scale3, "translate": shift3,
          "metadata": _metadata(fit, source_name, "occlusion w", unit="depth coordinate in [-1, 1]")}, "image")])


def separation_layer_data(sep, source_name: str = "burst", *, scale: Sequence[float] | None = None,
                          translate: Sequence[float] | None = None, rgb: bool | None = None) -> list[LayerDataTuple]:
    """A SeparationResult as LayerDataTuples: "<source> scene", "<source> interference" [, "<source> alpha"]
    (T, H, W[, C]) per frame, plus the scene's fusion layers (canonical, frames, alignment)."""
    b = sep._burst
    channels = b.C if b.layout == "THWC" else 0
    if rgb is None:
        rgb = channels in (3, 4)
    t_scale, yx_scale = _spatial_and_time(scale, 1.0)
    t_shift, yx_shift = _spatial_and_time(translate, 0.0)
    scale3, shift3 = [t_scale, *yx_scale], [t_shift, *yx_shift]
    out: list[LayerDataTuple] = []
    for name, data in sep.layers().items():
        is_alpha = name == "alpha"
        layer_rgb = bool(rgb) and not is_alpha
        if channels and not layer_rgb and not is_alpha:
            data = data[..., 0] if channels == 1 else data  # multichannel: left as (T, H, W, C) without rgb
        kwargs = {"name": f"{source_name} {name}", "rgb": layer_rgb, "scale": scale3, "translate": shift3,
                  "visible": name == "scene", "metadata": _metadata(sep, source_name, name)}
        out.append((data, kwargs, "image"))
    reflection = sep.interference_canonical()
    if reflection is not None:  # the interference's rigid layer (a reflection) fused in its own coordinates
        reflection, ref_scale, ref_shift = _channel_axes(reflection, channels, rgb, yx_scale, yx_shift)
        out.append((reflection, {"name": f"{source_name} interference canonical", "rgb": bool(rgb),
                                 "scale": ref_scale, "translate": ref_shift, "visible": False,
                                 "metadata": _metadata(sep, source_name, "interference canonical")}, "image"))
    fused = fusion_layer_data(sep, source_name, scale=scale, translate=translate, rgb=rgb)
    for data, kwargs, kind in fused:
        kwargs["visible"] = False if kind != "image" or not kwargs["name"].endswith("canonical") else True
    return out + fused


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


def add_result_to_viewer(viewer: napari.Viewer, fit: FusionResult, source_name: str = "burst", *,
                         scale: Sequence[float] | None = None, translate: Sequence[float] | None = None,
                         rgb: bool | None = None) -> list[Layer]:
    """Show a fit in ``viewer``: add, or replace (ours only), "<source> canonical", "<source> frames" and
    "<source> outlines" (homography). The console helper::

        fit = napari_nir.fuse(viewer.layers["burst"].data)
        add_result_to_viewer(viewer, fit, "burst")

    scale/translate: the source layer's (T, Y, X) or (Y, X); when None and a layer named ``source_name`` is
    in the viewer, they are taken from it (as is ``rgb``). Returns the layers.
    An outlines layer of ours left from an earlier homography run is removed when this fit has none.
    """
    from napari.layers import Image

    if source_name in viewer.layers:
        source = viewer.layers[source_name]
        if isinstance(source, Image) and source.ndim >= 3:
            scale = source.scale[-3:] if scale is None else scale
            translate = source.translate[-3:] if translate is None else translate
            if rgb is None and source.rgb and fit._burst.C in (3, 4):
                rgb = True
    to_layers = separation_layer_data if hasattr(fit, "layers") else fusion_layer_data
    return add_fusion_layer_data(viewer, source_name,
                                 to_layers(fit, source_name, scale=scale, translate=translate, rgb=rgb))


def add_fusion_layer_data(viewer: napari.Viewer, source_name: str, layer_data: Sequence[LayerDataTuple]) -> list[Layer]:
    """``add_layer_data`` for the output of ``fusion_layer_data``, first removing our fusion layers of this
    source that the new result does not have (outlines after a flow fit). Returns the layers."""
    made = {kwargs["metadata"][OWNER_KEY]["role"] for _, kwargs, _ in layer_data}
    for role in FUSION_ROLES:
        if role not in made:
            for layer in owned_layers(viewer, source_name, role):
                viewer.layers.remove(layer)
    return add_layer_data(viewer, layer_data)


def preview_image(preview: np.ndarray) -> tuple[np.ndarray, bool]:
    """A ``ProgressEvent.preview`` (h, w, C) in [0, 1] -> (image, rgb) to show: colour for 3/4 channels,
    else the first channel (h, w)."""
    preview = np.asarray(preview, dtype=np.float32)
    if preview.ndim == 3 and preview.shape[-1] in (3, 4):
        return preview, True
    if preview.ndim == 3:
        return preview[..., 0], False
    return preview, False
