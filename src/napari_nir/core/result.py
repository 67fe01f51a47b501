"""Result objects: what ``napari_nir.fuse`` returns, and their safe save/load.

The save format is a NumPy ``.npz`` archive of plain numeric arrays plus one JSON document; it is read with
``allow_pickle=False``, so loading a file can never execute code.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .._version import __version__
from . import diagnostics as diagnostics_module
from . import guard, registration, render
from .build import make_model
from .burst import Burst
from .config import FitConfig
from .geometry import Normaliser, apply_homography, frame_corners, pixel_grid
from .motions import get_motion
from .stages import Stopped
from .tasks import get_task
from .train import resolve_device

FORMAT = "napari-nir-result"
FORMAT_VERSION = 1


class FusionResult:
    """A fitted burst: canonical field + motion. Arrays come back in the burst's layout, units and dtype.

    Attributes: ``history`` (list of dicts: step, seconds, loss, psnr), ``config`` (FitConfig),
    ``final_psnr`` (dB, all frames re-rendered against the working input; None after load).
    """

    def __init__(self, model, burst: Burst, config: FitConfig, history: list[dict], device: torch.device,
                 final_psnr: float | None = None, seconds: float | None = None, completed: bool = True,
                 source=None, source_axes: str | None = None, registered_on: str = "",
                 initial_transforms: np.ndarray | None = None):
        self._model = model.eval()
        # the caller's array (a reference, never written): what registered() resamples, in its own axes
        self._source = source
        self.source_axes = source_axes or ("TYX" if burst.layout == "THW" else "TYXC")
        self.registered_on = registered_on
        self.initial_transforms = initial_transforms
        self.polish_report: dict | None = None  # drift motions: what polish.polish_matrices did (api sets it)
        self.down_weighted: dict[int, str] = {}  # frames found blank or saturated, drawn less often (api sets it)
        self._burst = burst
        self.config = config
        self.history = history
        self._device = device
        self.final_psnr = final_psnr
        self.seconds = seconds
        self.completed = completed
        self._input_norm = Normaliser(burst.H, burst.W)
        self._diagnostics: diagnostics_module.Diagnostics | None = None

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def motion(self) -> str:
        """The motion model's name (an entry of ``core.motions.MOTIONS``)."""
        return self.config.motion.model

    # -- the input, for adapters ----------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        """The burst's shape: (T, H, W) or (T, H, W, C)."""
        return self._burst.shape

    @property
    def input_layout(self) -> str:
        """"THW" (grey, no channel axis) or "THWC"."""
        return self._burst.layout

    @property
    def channels(self) -> int:
        """Channels of the burst (1 for "THW")."""
        return self._burst.C

    def _normalised_matrices(self) -> np.ndarray:
        with torch.no_grad():
            return self._model.motion.matrices().detach().cpu().numpy().astype(np.float64)

    def canonical_transform(self, extent: str = "union", scale: float = 1.0) -> np.ndarray:
        """3x3 map from pixels of ``canonical(extent, scale)`` (col, row, 1) to normalised canonical coordinates."""
        to_norm, _ = render.canonical_grid(self._normalised_matrices(), self._input_norm, self._model.domain,
                                           _check_extent(extent), _check_scale(scale))
        return to_norm

    @property
    def is_flow(self) -> bool:
        """True when the motion reports per-pixel flow (``flow()``), False for homographies (the motion table's
        ``alignment``)."""
        return get_motion(self.motion).alignment == "flow"

    @property
    def homographies(self) -> np.ndarray | None:
        """(T, 3, 3) float64: frame-t pixel (col, row, 1) -> pixel of ``canonical(extent="union", scale=1)``.
        None for the flow models (see ``flow()``)."""
        return None if self.is_flow else self.homographies_to("union", 1.0)

    def frame_to_frame(self, t: int, s: int) -> np.ndarray:
        """3x3 homography mapping frame-t pixels to frame-s pixels (homography model)."""
        if self.is_flow:
            raise ValueError(f"frame_to_frame is for motion='homography'; this result used {self.motion!r}: "
                             "use flow_between(t, s)")
        h = self.homographies
        m = np.linalg.inv(h[s]) @ h[t]
        return m / m[2, 2]

    def homographies_to(self, extent: str = "union", scale: float = 1.0) -> np.ndarray:
        """(T, 3, 3) float64: frame-t pixel (col, row, 1) -> pixel of ``canonical(extent, scale)`` (homography
        motion; ``homographies`` is the union view at scale 1)."""
        if self.is_flow:
            raise ValueError(f"homographies_to is for homography motion; this result used {self.motion!r}: use flow()")
        to_view = np.linalg.inv(self.canonical_transform(extent, scale))
        h = np.einsum("ij,tjk,kl->til", to_view, self._normalised_matrices(), self._input_norm.matrix)
        return h / h[:, 2:3, 2:3]

    def outlines(self, extent: str = "union", scale: float = 1.0) -> np.ndarray:
        """(T, 4, 2) every frame's corners as (row, col) pixels of ``canonical(extent, scale)`` (napari order).
        Homography model only."""
        if self.is_flow:
            raise ValueError("outlines() is for motion='homography'; for flow models use flow()")
        to_out = np.linalg.inv(self.canonical_transform(extent, scale))
        pts = np.einsum("ij,tjk,kl->til", to_out, self._normalised_matrices(), frame_corners(self._input_norm))
        pts = pts[:, :2] / pts[:, 2:3]
        return np.stack([pts[:, 1], pts[:, 0]], -1)

    # -- rendering --------------------------------------------------------------------------------
    def frames(self, *, dtype: str = "input") -> np.ndarray:
        """(T, H, W[, C]) per-frame reconstructions in the burst's layout, units and dtype (or "float32")."""
        b = self._burst
        _check_dtype(dtype)
        out = np.empty((b.T, b.H, b.W, b.C), dtype=np.float32)
        for t in range(b.T):
            out[t] = render.render_frame(self._model, t, b.H, b.W, self.config.value_range, self._device)
        return b.restore(out, dtype=dtype)

    def canonical(self, extent: str = "union", scale: float = 1.0, *, w: float | None = None,
                  dtype: str = "input") -> np.ndarray:
        """The fused view (H', W'[, C]).

        extent "union": covers every frame (a panorama when the frames move a lot; pixels no frame saw are
        the burst's minimum); "first": frame 0's field of view. scale: output pixels per input pixel
        (2 = burst super-resolution). w (motion="occlusion" only): the depth slice of the 3-D canonical,
        in [-1, 1]; None renders the burst's dominant slice (the background).
        Homography: a projective grid (frame 0's pixels for "first"); flow models: an axis-aligned grid in
        canonical pixels (the frames' average pose).
        """
        extent, scale = _check_extent(extent), _check_scale(scale)
        _check_dtype(dtype)
        if self.is_flow:
            view = render.render_canonical_flow(self._model, self._input_norm, self.config.value_range,
                                                self._device, depth=get_motion(self.motion).depth, extent=extent,
                                                scale=scale, w=w)
            return self._burst.restore(view, dtype=dtype)
        view = render.render_canonical(self._model, self._normalised_matrices(), self._input_norm,
                                       self.config.value_range, self._device, extent=extent, scale=scale)
        return self._burst.restore(view, dtype=dtype)

    def _require_flow(self, what: str) -> None:
        if not self.is_flow:
            raise ValueError(f"{what} is available for motion='flow' or 'occlusion'; this result used "
                             f"motion={self.motion!r}: use .homographies")

    def _frame_points(self) -> torch.Tensor:
        return torch.as_tensor(pixel_grid(self._burst.H, self._burst.W, self._input_norm))

    def flow(self) -> np.ndarray:
        """(T, H, W, 2) float32 displacement (d_row, d_col) in pixels, frame -> canonical.

        Canonical pixels: the grid of the frames' average pose (same pixel size as the input), so the
        displacements of all frames average to about zero.
        """
        self._require_flow("flow()")
        b, xy = self._burst, self._frame_points()
        out = np.empty((b.T, b.H, b.W, 2), dtype=np.float32)
        for t in range(b.T):
            d = (render.warp_points(self._model, t, xy, self._device)[:, :2] - xy).numpy() * self._input_norm.s
            out[t] = d[:, ::-1].reshape(b.H, b.W, 2)
        return out

    def flow_between(self, t: int, s: int) -> np.ndarray:
        """(H, W, 2) float32 optical flow (d_row, d_col) in pixels from frame t to frame s: pixel x of frame t
        shows the same scene point as x + flow[x] in frame s (what other optical-flow tools report)."""
        self._require_flow("flow_between()")
        b, xy = self._burst, self._frame_points()
        for name, index in (("t", t), ("s", s)):
            if not 0 <= int(index) < b.T:
                raise ValueError(f"frame index {name}={index} is out of range 0..{b.T - 1}")
        p = render.warp_points(self._model, int(t), xy, self._device)[:, :2]
        # start Newton at x moved by the homography parts: the right preimage where a flow folds
        m = self._model.motion.matrices().detach().cpu()
        rel = (torch.linalg.inv(m[int(s)]) @ m[int(t)])[None]
        start = apply_homography(rel, torch.zeros(len(xy), dtype=torch.long), xy.double())
        x_s = render.unwarp_points(self._model, int(s), p, self._device, start=start)
        d = (x_s - xy).numpy() * self._input_norm.s
        return d[:, ::-1].reshape(b.H, b.W, 2).astype(np.float32)

    def canonical_in_frame(self, t: int = 0, *, w: float | None = None, dtype: str = "input") -> np.ndarray:
        """(H, W[, C]) the canonical view resampled on frame t's pixel grid: f(W_t(x)) with the occlusion
        coordinate replaced by ``w`` (default: the dominant one), i.e. what frame t would show without the
        things the occlusion model put on other w slices (the background behind a moving object)."""
        _check_dtype(dtype)
        b = self._burst
        if not 0 <= int(t) < b.T:
            raise ValueError(f"frame index t={t} is out of range 0..{b.T - 1}")
        xy = self._frame_points()
        p = render.warp_points(self._model, int(t), xy, self._device)
        if p.shape[1] == 3:
            if w is None:
                w = render.dominant_w(self._model, self._input_norm, self._device)
            p[:, 2] = float(w)
        values = render.render_points(self._model, None, p, self.config.value_range, self._device)
        return b.restore(values.reshape(b.H, b.W, -1), dtype=dtype)

    def occlusion_w(self) -> np.ndarray:
        """(T, H, W) float32 in [-1, 1]: the occlusion coordinate w of every frame's pixels (motion="occlusion");
        pixels of a moving object get a different w from the background they hide."""
        if not get_motion(self.motion).depth:
            raise ValueError(f"occlusion_w() needs motion='occlusion'; this result used {self.motion!r}")
        b, xy = self._burst, self._frame_points()
        return np.stack([render.warp_points(self._model, t, xy, self._device)[:, 2].numpy().reshape(b.H, b.W)
                         for t in range(b.T)]).astype(np.float32)

    # -- registration ---------------------------------------------------------------------------------
    def registration_grid(self, reference="canonical", extent: str = "frame") -> registration.ReferenceGrid:
        """Where ``registered()`` and ``apply()`` put the frames (``core.registration`` for the conventions):
        reference "canonical" (the frames' average pose) or a frame index; extent "frame" (the input's size)
        or "union" (grown to hold every frame)."""
        b = self._burst
        reference = registration.check_reference(reference, b.T)
        extent = registration.check_extent(extent)
        n = self._input_norm.matrix
        n_inv = np.linalg.inv(n)
        if not self.is_flow:
            m = self._normalised_matrices()
            if reference != "canonical":
                m = np.einsum("ij,tjk->tik", np.linalg.inv(m[reference]), m)
            return registration.matrices_grid(np.einsum("ij,tjk,kl->til", n_inv, m, n), (b.H, b.W), extent)
        if extent == "union":
            if reference != "canonical":
                raise ValueError("extent='union' with a flow motion needs reference='canonical'")
            to_canonical, shape = render.flow_canonical_grid(self._model, self._input_norm, self._device, "union",
                                                             1.0)
        else:
            shape, to_canonical = (b.H, b.W), n

        def positions(t: int, grid_xy: np.ndarray) -> np.ndarray:
            p = torch.as_tensor(registration.transform_points(to_canonical, grid_xy), dtype=torch.float32)
            if reference != "canonical":
                p = render.warp_points(self._model, reference, p, self._device)[:, :2]
            x = render.unwarp_points(self._model, t, p, self._device).double().numpy()
            return registration.transform_points(n_inv, x)

        return registration.ReferenceGrid(shape, None, positions)

    def registered_origin(self, extent: str = "union", scale: float = 1.0) -> tuple[float, float]:
        """(row, col) of ``registered()``'s first pixel (reference "canonical", extent "frame") in pixels of
        ``canonical(extent, scale)``: where the registered stack sits on the canonical view (napari places it
        there)."""
        extent, scale = _check_extent(extent), _check_scale(scale)
        if self.is_flow:
            to_norm, _ = render.flow_canonical_grid(self._model, self._input_norm, self._device, extent, scale)
        else:
            to_norm = self.canonical_transform(extent, scale)
        point = np.linalg.inv(to_norm) @ self._input_norm.matrix @ np.array([0.0, 0.0, 1.0])
        return float(point[1] / point[2]), float(point[0] / point[2])

    def transforms(self, reference="canonical", *, convention: str = "napari-nir",
                   extent: str = "frame") -> np.ndarray:
        """(T, 3, 3) float64 alignment of every frame to the reference grid of ``registered(reference, extent)``.

        convention "napari-nir": frame-t pixel (col, row, 1) -> reference-grid pixel (divide by w).
        "pystackreg": the inverse, reference-grid pixel -> frame-t pixel (x = col, y = row), as
        ``StackReg.transform_stack(stack, tmats=...)`` reads it; extent "frame" only (pystackreg keeps the
        input's size). Matrix motions only (flow models: ``flow()``)."""
        if self.is_flow:
            raise ValueError(f"transforms() is for matrix motions; this result used {self.motion!r}: use flow()")
        if convention not in registration.CONVENTIONS:
            raise ValueError(f"convention must be one of {', '.join(registration.CONVENTIONS)}, got {convention!r}")
        if convention == "pystackreg" and extent != "frame":
            raise ValueError("pystackreg transforms describe a grid of the input's size: use extent='frame'")
        m = self.registration_grid(reference, extent).transforms
        return registration.convert_transforms(m, "napari-nir", convention)

    def diagnostics(self) -> diagnostics_module.Diagnostics:
        """Does the fit explain its frames? A verdict ("ok" or "doubtful"), one sentence per finding, a table per
        frame and a (T, h, w) residual map on frames reduced to at most 256 px (core/diagnostics.py says what is
        checked: neighbours that still disagree after alignment, weak overlaps, blank or saturated frames, frames
        explained worse than the rest). Computed once, on demand. Needs the input: not after ``load``."""
        if self._diagnostics is not None:
            return self._diagnostics
        b = self._burst
        if self._source is None:
            raise ValueError("this result does not hold its input (it was loaded from a file): diagnostics need the "
                             "frames; re-run the fit to diagnose it")
        frames, k = diagnostics_module.reduce_frames(b.data)
        h, w = frames.shape[1:]
        rows, cols = np.mgrid[0:h, 0:w].astype(np.float64) * k + (k - 1) / 2  # block centres, input pixels
        n = self._input_norm
        xy = np.stack([(cols.ravel() - n.cx) / n.s, (rows.ravel() - n.cy) / n.s], 1).astype(np.float32)
        rendered = np.stack([render.render_points(self._model, t, xy, self.config.value_range, self._device)
                             .mean(-1).reshape(h, w) for t in range(b.T)])
        pair_maps = matched = None
        if not self.is_flow and not self.config.task:  # separation: the frames hold the interference too
            to_view = self.homographies  # frame_to_frame(t, t + 1) for every t, from one computation of these
            input_maps = np.stack([np.linalg.inv(to_view[t + 1]) @ to_view[t] for t in range(b.T - 1)])
            input_maps /= input_maps[:, 2:3, 2:3]
            reduced = np.array([[k, 0, (k - 1) / 2], [0, k, (k - 1) / 2], [0, 0, 1.0]])
            pair_maps = np.linalg.inv(reduced) @ input_maps @ reduced
            matches = getattr(self._model, "start_matches", None)
            if matches:
                n = self._model.normaliser  # the start matched the working frames: their pixels -> input pixels
                factor = np.array([b.W / n.width, b.H / n.height])
                to_input = {t: ((src + 0.5) * factor - 0.5, (dst + 0.5) * factor - 0.5)
                            for t, (src, dst) in matches.items()}
                matched = diagnostics_module.match_residuals(input_maps, to_input)
        self._diagnostics = diagnostics_module.alignment_diagnostics(frames, rendered, pair_maps, k,
                                                                     down_weighted=self.down_weighted, matched=matched)
        return self._diagnostics

    def registered(self, reference="canonical", *, order: int = 1, extent: str = "frame", fill: float = 0.0):
        """The input resampled onto one common grid: every frame (every channel and plane of the input, in its
        own axes order, ``source_axes``) in the input's dtype, Y and X replaced by the grid's size. Values never
        leave each frame's range (cubic overshoot clipped, integers rounded); pixels no frame covers are
        ``fill``. order 0 nearest, 1 linear, 3 cubic. A dask input gives a lazy dask array (one task per frame).
        Equal to ``apply(input)``; after ``load`` the input is not stored: use ``apply(array)``."""
        if self._source is None:
            raise ValueError("this result does not hold its input (it was loaded from a file): use "
                             "fit.apply(array) with the burst's array")
        return self.apply(self._source, axes=self.source_axes, order=order, reference=reference, extent=extent,
                          fill=fill)

    def apply(self, array, *, axes: str | None = None, order: int = 1, reference="canonical",
              extent: str = "frame", scale: float | None = None, fill: float = 0.0):
        """Apply the fitted alignment to another array of the same frames: other channels, planes, a labels
        layer (``order=0``: labels are copied, never blended), or another resolution of the same data.

        array: T, Y, X in the positions ``axes`` names (any further C / Z axes); numpy, dask or zarr, any real
        dtype. axes: default the input's (``source_axes``) when the shape matches, else "TYX" / "TYXC".
        scale: pixels of ``array`` per fitted pixel (default: from the Y, X sizes). Returns the same kind of
        array as ``registered()``: same axes order and dtype, Y, X the grid's (times ``scale``); numpy for numpy,
        a lazy dask array (one task per frame) for dask and zarr inputs, so that a stack larger than memory is
        registered and written frame by frame (``dask.array.to_zarr``, ``tifffile`` with an iterator)."""
        order = registration.check_order(order)
        shape = tuple(int(s) for s in np.shape(array))
        if axes is None and self._source is not None and shape == tuple(np.shape(self._source)):
            axes = self.source_axes
        letters = registration.parse_axes(axes, shape)
        if getattr(array, "dtype", None) is None or np.dtype(array.dtype).kind not in "fiub":
            raise TypeError(f"apply() needs a real numeric array, got {type(array).__name__} of dtype "
                            f"{getattr(array, 'dtype', None)}")
        b = self._burst
        t, y, x = (shape[letters.index(a)] for a in "TYX")
        if t != b.T:
            raise ValueError(f"the array has {t} frames on its T axis ({letters!r}, shape {shape}); the fit has {b.T}")
        factor = y / b.H if scale is None else float(scale)
        if not np.isfinite(factor) or factor <= 0 or (round(b.H * factor), round(b.W * factor)) != (y, x):
            raise ValueError(f"the array's frames are {y} x {x} pixels; the fit's are {b.H} x {b.W}" +
                             ("" if scale is None else f" (times scale={scale})") + ": give an array of the "
                             "same frames (another channel, plane, labels, or a resolution with the same aspect)")
        grid = self.registration_grid(reference, extent).scaled(factor, (y, x))
        if type(array).__module__.startswith("zarr"):  # chunked on disk: read and register it frame by frame
            import dask.array as da

            array = da.from_array(array, chunks=array.chunks)
        if _is_dask(array):
            return _lazy_resample(array, letters, grid, order, float(fill))
        return registration.resample_stack(array, letters, grid, order, float(fill))

    # -- every output, as one list -----------------------------------------------------------------
    def artefacts(self, extent: str = "union", scale: float = 1.0, roles=None, *,
                  should_stop: Callable[[], bool] | None = None) -> list[Artefact]:
        """Every output of this result, in display order (see ``ARTEFACTS``): what the CLI writes, the napari
        layers show and the npe2 writer records. ``extent``, ``scale``: the canonical view's (and the
        alignment drawn on it); roles: only these (default: all that apply). Data are computed here;
        ``should_stop()`` is asked before each one, and ``Stopped`` raised when it says so (a GUI's cancel)."""
        extent, scale = _check_extent(extent), _check_scale(scale)
        cache: dict = {}
        out = []
        for spec in ARTEFACTS.values():
            if (roles is not None and spec.role not in roles) or not spec.applies(self.config):
                continue
            if should_stop is not None and should_stop():
                raise Stopped(f"stopped before rendering {spec.role!r}")
            made = spec.make(self, _View(extent, scale, cache))
            if made is None:
                continue
            data, extra = made if isinstance(made, tuple) else (made, {})
            separating = bool(self.config.task)
            visible = spec.visible if not separating or spec.visible_separating is None else spec.visible_separating
            # the last axis is channels: the burst's ("[C]", when it has them) or the flow's two components
            channels = ((spec.axes.endswith("[C]") and self.input_layout == "THWC") or spec.axes.endswith("2")
                        or (spec.axes == "source" and self.source_axes == "TYXC"))
            out.append(Artefact(spec, data, channels, {"convention": spec.description, **extra}, visible))
        return out

    # -- provenance and files ---------------------------------------------------------------------
    def provenance(self) -> dict:
        """JSON-able record of how this result was made (re-running with it reproduces the result)."""
        b = self._burst
        return {
            "software": "napari-nir",
            "version": __version__,
            "task": "fuse",
            "parameters": self.config.to_dict(),
            "seed": self.config.seed,
            "device": str(self._device),
            "input": {"shape": [b.T, b.H, b.W] + ([b.C] if b.layout == "THWC" else []), "dtype": str(b.dtype),
                      "layout": b.layout},
            **self._registration_provenance(),
            "final_psnr_db": None if self.final_psnr is None else round(float(self.final_psnr), 4),
            "seconds": None if self.seconds is None else round(float(self.seconds), 3),
            "steps_run": self.history[-1]["step"] if self.history else 0,
            "completed": self.completed,
        }

    def _registration_provenance(self) -> dict:
        """What the fit read of a C / Z axis and the transforms it started from, when the call gave them."""
        out = {}
        if self.source_axes not in ("TYX", "TYXC"):
            out["axes"] = {"input": self.source_axes, "registered_on": self.registered_on}
        if self.initial_transforms is not None:
            out["initial_transforms"] = np.asarray(self.initial_transforms).tolist()
        if self.down_weighted:
            out["down_weighted_frames"] = {str(k): v for k, v in sorted(self.down_weighted.items())}
        if self.polish_report is not None:
            out["polish"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in self.polish_report.items()}
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write this result to ``path`` (.npz: numeric arrays + JSON, never pickle). Atomic and durable: a hidden
        temporary file in the same folder, fsynced, renamed over ``path``, then the folder fsynced; the file's mode
        follows the umask (0o644 under umask 022) like the CLI's outputs."""
        b = self._burst
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "provenance": self.provenance(),
            "config": self.config.to_dict(), "history": self.history, "domain": list(self._model.domain),
            "working_shape": list(self._working_shape()),
            "burst": {"T": b.T, "H": b.H, "W": b.W, "C": b.C, "layout": b.layout, "dtype": np.dtype(b.dtype).str,
                      "lo": b.lo.tolist(), "scale": b.scale.tolist(),
                      "lo_exact": None if b.lo_exact is None else [int(v) for v in b.lo_exact]},
            "final_psnr": self.final_psnr, "seconds": self.seconds, "completed": self.completed,
        }
        arrays = {f"param:{k}": v.detach().cpu().numpy() for k, v in self._model.state_dict().items()}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".nir-", suffix=".npz.part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600: give it a normally created file's mode
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_folder(folder)  # so that the rename itself survives a crash

    def _working_shape(self) -> tuple[int, int, int, int]:
        n = self._model.normaliser
        return (self._burst.T, n.height, n.width, self._burst.C)

    def __repr__(self) -> str:
        b = self._burst
        psnr = "?" if self.final_psnr is None else f"{self.final_psnr:.2f} dB"
        return (f"<FusionResult motion={self.motion!r} preset={self.config.preset!r} frames={b.T} "
                f"size={b.H}x{b.W} channels={b.C} psnr={psnr}>")


class SeparationResult(FusionResult):
    """A separated burst: ``layers()`` per frame, ``canonical()`` the scene, ``frames()`` the recomposed input.

    Flow, homographies and outlines are the scene stream's.
    """

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def interference_homographies(self) -> np.ndarray | None:
        """(T, 3, 3) float64: frame-t pixel (col, row, 1) -> pixel of the interference's rigid layer (a
        reflection's own alignment; its pixel grid is frame-sized, centred on the burst's average pose), or
        None when the interference has no rigid layer (``interference_motion`` "none", or "auto" that found
        none)."""
        matrices = self._model.interference_homographies()
        if matrices is None:
            return None
        n = self._input_norm.matrix
        h = np.einsum("ij,tjk,kl->til", np.linalg.inv(n), matrices, n)
        return h / h[:, 2:3, 2:3]

    def interference_canonical(self, *, dtype: str = "input") -> np.ndarray | None:
        """(H, W[, C]) the interference's rigid layer (a reflection) fused over the burst, on the frame-sized
        pixel grid of ``interference_homographies``, in the burst's units like ``layers()["interference"]``;
        None without a rigid layer."""
        if self.interference_homographies is None:
            return None
        b = self._burst
        xy = torch.as_tensor(pixel_grid(b.H, b.W, self._input_norm))
        out = np.empty((b.H * b.W, b.C), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(xy), render.CHUNK):
                chunk = xy[start:start + render.CHUNK].to(self._device)
                out[start:start + len(chunk)] = self._model.rigid_layer_at(chunk).cpu().numpy()
        return b.restore(out.reshape(b.H, b.W, b.C), dtype=dtype)

    def _rendered_layers(self) -> dict[str, np.ndarray]:
        """The networks' layers at every input pixel, once: "scene" and "reconstruction" (T, H, W, C) in working
        units, "interference" (T, H, W, C) as the task composes it, "alpha" (T, H, W) for compositing tasks, and
        "gate" (T, H, W, 1) where the residual may return to the scene (``Task.detail_gate``; 1 if None)."""
        cached = getattr(self, "_layer_cache", None)
        if cached is not None:
            return cached
        b = self._burst
        task = self._model.task
        xy = torch.as_tensor(pixel_grid(b.H, b.W, self._input_norm))
        shape = (b.T, b.H, b.W, b.C)
        out = {"scene": np.empty(shape, np.float32), "reconstruction": np.empty(shape, np.float32),
               "interference": np.empty(shape, np.float32), "gate": np.ones((b.T, b.H, b.W, 1), np.float32)}
        if "alpha" in task.layers:
            out["alpha"] = np.empty((b.T, b.H, b.W), np.float32)
        lo, hi = self.config.value_range
        with torch.no_grad():
            for t in range(b.T):
                for start in range(0, len(xy), render.CHUNK):
                    chunk = xy[start:start + render.CHUNK].to(self._device)
                    index = torch.full((len(chunk),), t, dtype=torch.long, device=self._device)
                    image, s, layers = self._model.layers_at(index, chunk)
                    rows = slice(start, start + len(chunk))
                    out["scene"][t].reshape(-1, b.C)[rows] = ((s - lo) / (hi - lo)).cpu().numpy()
                    out["reconstruction"][t].reshape(-1, b.C)[rows] = ((image - lo) / (hi - lo)).cpu().numpy()
                    out["interference"][t].reshape(-1, b.C)[rows] = layers["interference"].cpu().numpy()
                    if "alpha" in out:
                        out["alpha"][t].reshape(-1)[rows] = layers["alpha"][:, 0].cpu().numpy()
                    if task.detail_gate is not None:
                        out["gate"][t].reshape(-1)[rows] = task.detail_gate(layers)[:, 0].cpu().numpy()
        self._layer_cache = out
        return out

    def _scene_working(self, networks_only: bool = False) -> np.ndarray:
        """(T, H, W, C) the scene in working units: the networks' scene, then the configuration's do-no-harm rules
        (core/guard.py): plus ``detail_transfer`` x the gated residual (frame - reconstruction), plus the scene
        consensus, and the frame's own values where the thick-alpha guard keeps them. ``networks_only``: none of
        them. The rules read the frames: a result without its input (after ``load``) needs ``networks_only``."""
        rendered = self._rendered_layers()
        scene = rendered["scene"]
        if networks_only:
            return scene
        cached = getattr(self, "_scene_cache", None)  # layers() and diagnostics() both need it
        if cached is not None:
            return cached
        if self._source is None:
            raise ValueError("this result does not hold its input (it was loaded from a file): the scene's do-no-harm "
                             "rules (detail transfer, scene consensus, thick-alpha guard) read the frames; use "
                             "layers(networks_only=True) for the networks' own scene, or re-run the fit")
        s = self.config.separation
        if s.detail_transfer > 0:
            residual = self._burst.data - rendered["reconstruction"]
            scene = scene + np.float32(s.detail_transfer) * rendered["gate"] * residual
        if s.scene_consensus and not self.is_flow:
            scene = scene + guard.scene_consensus(self._burst.data - scene, self.homographies).astype(np.float32)
        kept = self.kept_frame_pixels()
        if kept.any():
            scene = np.where(kept[..., None], self._burst.data, scene)
        self._scene_cache = scene
        return scene

    def kept_frame_pixels(self) -> np.ndarray:
        """(T, H, W) bool: pixels where the scene keeps the frame's own values because the alpha forms blobs much
        thicker than the burst's wires or streaks (``thick_alpha_guard``, core/guard.py); all False without the
        guard or an alpha."""
        rendered = self._rendered_layers()
        if not self.config.separation.thick_alpha_guard or "alpha" not in rendered:
            return np.zeros(self._burst.data.shape[:3], bool)
        if getattr(self, "_kept", None) is None:
            self._kept = guard.thick_alpha(rendered["alpha"])[0]
        return self._kept

    def layers(self, *, dtype: str = "input", networks_only: bool = False) -> dict[str, np.ndarray]:
        """{"scene", "interference"[, "alpha"]}: (T, H, W[, C]) in the burst's layout, units and dtype.

        "scene" is the networks' scene after the configuration's do-no-harm rules (core/guard.py,
        docs/guide.md): ``detail_transfer`` x what the fit leaves unexplained (frame - reconstruction) where the
        interference leaves the scene visible, the scene consensus (what the other frames remove at the same scene
        point is given back) and the thick-alpha guard (the frame's own values where the alpha forms blobs).
        ``networks_only=True``: the networks' own scene, none of the rules (the only scene after ``load``, which
        keeps no input). "alpha" (fence, rain) is (T, H, W) float32 in [0, 1]. Additive interference (reflection,
        moire) is its contribution on a black background: value * range + burst minimum (negative moire values
        clip for integer dtypes; ask for dtype="float32" to keep them).
        """
        b = self._burst
        scene = self._scene_working(networks_only)
        rendered = self._rendered_layers()
        out = {"scene": b.restore(scene, dtype=dtype), "interference": b.restore(rendered["interference"], dtype=dtype)}
        if "alpha" in rendered:
            out["alpha"] = rendered["alpha"].copy()
        return out

    def diagnostics(self) -> diagnostics_module.Diagnostics:
        """Does the separation explain its frames, and does it look like a separation? A verdict ("ok" or
        "doubtful"), one sentence per finding, and ``residual`` (T, H, W) float32: |frame - reconstruction|
        averaged over channels, in working units, at full size (core/diagnostics.py, ``separation_diagnostics``,
        says what is checked). Mapping access works too: ``diagnostics()["verdict"]``. Needs the input: not after
        ``load``."""
        if self._diagnostics is not None:
            return self._diagnostics
        if self._source is None:
            raise ValueError("this result does not hold its input (it was loaded from a file): diagnostics need the "
                             "frames; re-run the fit to diagnose it")
        rendered = self._rendered_layers()
        scene = self._scene_working()
        motion_px = None
        if not self.is_flow:
            corners = self.outlines()  # (T, 4, 2) each frame's corners in the canonical view's pixels
            motion_px = float(np.abs(corners - corners.mean(0)).max())
        task = self._model.task
        self._diagnostics = diagnostics_module.separation_diagnostics(
            self._burst.data, rendered["reconstruction"], scene, rendered.get("alpha"),
            sparse=task.sparse_of is not None and "alpha" in task.layers, scene_motion_px=motion_px,
            kept=self.kept_frame_pixels())
        return self._diagnostics

    def provenance(self) -> dict:
        prov = super().provenance()
        prov["task"] = f"separate:{self.task}"
        if self.config.separation.interference_motion != "none":
            prov["rigid_layer"] = self.rigid_layer()
        return prov

    def rigid_layer(self) -> dict:
        """{"found": bool, "score": float | None}: whether the interference got a rigidly moving layer of its
        own (``interference_motion``), and the residuals' correlation score it was decided on (None if the
        run stopped before its warm-up ended)."""
        model = self._model
        score = model.rigid_layer_score()
        return {"found": self.interference_homographies is not None,
                "score": None if not np.isfinite(score) else round(score, 4)}

    def __repr__(self) -> str:
        return super().__repr__().replace("<FusionResult", f"<SeparationResult task={self.task!r}")


def _is_dask(array) -> bool:
    return type(array).__module__.startswith("dask.")


def _lazy_resample(array, axes: str, grid, order: int, fill: float):
    """``registration.resample_stack`` as a dask array: one task per frame, nothing computed here."""
    import dask
    import dask.array as da

    t_axis = axes.index("T")
    out_shape = list(array.shape)
    out_shape[axes.index("Y")], out_shape[axes.index("X")] = grid.shape
    out_shape[t_axis] = 1
    frames = []
    for t in range(array.shape[t_axis]):
        key = [slice(None)] * array.ndim
        key[t_axis] = slice(t, t + 1)
        block = dask.delayed(registration.resample_stack)(array[tuple(key)], axes, grid, order, fill, first_frame=t)
        frames.append(da.from_delayed(block, tuple(out_shape), dtype=array.dtype))
    return da.concatenate(frames, axis=t_axis)


def _check_dtype(dtype) -> None:
    if dtype not in ("input", "float32"):
        raise ValueError(f"unknown output dtype {dtype!r}; use 'input' (the burst's dtype) or 'float32'")


def _check_extent(extent: str) -> str:
    if extent not in ("union", "first"):
        raise ValueError(f"unknown extent {extent!r}; use 'union' (covers every frame) or 'first' (frame 0's view)")
    return extent


def _check_scale(scale: float) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a number such as 1.0 or 2.0, got {scale!r}") from None
    if not np.isfinite(value) or value <= 0 or value > 16:
        raise ValueError(f"scale must be > 0 and <= 16 (output pixels per input pixel), got {scale!r}")
    return value


_META_LIMIT = 16 << 20  # bytes of metadata JSON a result may hold (its history takes ~90 bytes per step)
_MAX_SIDE = 1 << 20     # the most frames, pixels per side or channels a result may describe


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status); elsewhere it is
    set to 0o077 (never looser) and restored at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def fsync_folder(folder: str) -> None:
    """fsync a folder (a rename in it is durable after this); a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _member_headers(path: str, archive: zipfile.ZipFile) -> dict[str, tuple[zipfile.ZipInfo, tuple, np.dtype]]:
    """{member name: (ZipInfo, shape, dtype)} from the zip directory and each member's .npy header (nothing else is
    read). ValueError for: names other than ``meta.npy`` and ``param:<name>.npy`` (<name>: ASCII letters, digits,
    '_', '.'), a name twice, members declaring more bytes in all than the file holds (a compressed bomb, members
    sharing data), compressed or encrypted members (``save`` stores them as they are), .npy versions other than
    1.0 / 2.0, dtypes other than bool, integer and float, and a declared size other than the header plus
    prod(shape) * itemsize."""
    infos = archive.infolist()
    if len({info.filename for info in infos}) != len(infos):
        raise ValueError(f"{path}: the archive holds a member name twice")
    if sum(info.file_size for info in infos) > os.path.getsize(path):
        raise ValueError(f"{path}: its members declare {sum(info.file_size for info in infos)} bytes, more than the "
                         f"file's {os.path.getsize(path)}: a compressed or crafted archive, not a saved result")
    headers = {}
    for info in infos:
        name = info.filename
        key = name[len("param:"):-len(".npy")] if name.startswith("param:") and name.endswith(".npy") else ""
        if name != "meta.npy" and not (key.isascii() and key.replace("_", "a").replace(".", "a").isalnum()):
            raise ValueError(f"{path}: unexpected member {name!r}; a result holds meta.npy and param:<name>.npy")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            raise ValueError(f"{path}: member {name} is compressed or encrypted; FusionResult.save stores members as "
                             "they are")
        try:
            with archive.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f".npy format version {version}")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(fh)
                start = fh.tell()
        except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: member {name} is not a readable .npy array ({exc})") from None
        if dtype.kind not in "biuf":
            raise ValueError(f"{path}: member {name} has dtype {dtype}; a result holds only numbers")
        count = 1
        for n in shape:
            count *= n
        if info.file_size != start + count * dtype.itemsize:
            raise ValueError(f"{path}: member {name} declares shape {shape} of {dtype} ({count * dtype.itemsize} "
                             f"bytes) but holds {info.file_size - start}")
        headers[name] = (info, shape, dtype)
    return headers


def _read_member(path: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One member's array (its header already checked by ``_member_headers``; the CRC is checked at its end)."""
    try:
        with archive.open(info) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: member {info.filename} cannot be read ({exc})") from None


def _checked_meta(path: str, meta) -> tuple[FitConfig, Burst, tuple[int, int, int, int], tuple[float, ...]]:
    """(config, burst, working shape (T, h, w, C), domain (xmin, xmax, ymin, ymax)) of a metadata record, every
    field checked: a dict of the right format; burst T, H, W, C whole numbers in 1..2**20, layout "THW" (C 1) or
    "THWC", dtype an integer or float dtype, lo and scale C finite numbers, lo_exact None or C integers;
    working_shape 4 whole numbers with the burst's T and C; domain 4 finite numbers, min < max; config a valid
    ``FitConfig``; history a list of dicts with an int "step", final_psnr and seconds None or numbers, completed a
    bool."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a napari-nir result: its metadata is a {type(meta).__name__}, not a record")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r} version {meta.get('format_version')!r}")

    def fail(why: str) -> ValueError:
        return ValueError(f"{path}: result file is inconsistent or edited: {why}")

    def whole(v, high=_MAX_SIDE) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= high

    def numbers(v, n: int) -> bool:  # abs(nan) and abs(inf) fail the comparison
        return isinstance(v, list) and len(v) == n and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) <= 1e308 for x in v)

    missing = [k for k in ("config", "burst", "working_shape", "domain") if k not in meta]
    if missing:
        raise fail(f"its metadata lacks {', '.join(missing)}")
    b = meta["burst"]
    if not isinstance(b, dict) or not all(whole(b.get(k)) for k in "THWC"):
        raise fail(f"burst size T, H, W, C must be whole numbers in 1..{_MAX_SIDE}")
    t, c = b["T"], b["C"]
    if b.get("layout") not in ("THW", "THWC") or (b["layout"] == "THW" and c != 1):
        raise fail(f"burst layout {b.get('layout')!r} with {c} channel(s)")
    try:
        dtype = np.dtype(b.get("dtype")) if isinstance(b.get("dtype"), str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in "iuf":
        raise fail(f"burst dtype {b.get('dtype')!r} is not an integer or float dtype")
    if not (numbers(b.get("lo"), c) and numbers(b.get("scale"), c)):
        raise fail(f"burst lo and scale must be {c} finite numbers each")
    lo_exact = b.get("lo_exact")
    if lo_exact is not None and not (isinstance(lo_exact, list) and len(lo_exact) == c and all(
            isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1 << 64 for v in lo_exact)):
        raise fail(f"burst lo_exact must be None or {c} integers")
    working = meta["working_shape"]
    if not (isinstance(working, list) and len(working) == 4 and all(whole(v) for v in working)
            and (working[0], working[3]) == (t, c)):
        raise fail(f"working_shape {working!r} is not (T, h, w, C) of the burst's {t} frames and {c} channel(s)")
    domain = meta["domain"]
    if not (numbers(domain, 4) and domain[0] < domain[1] and domain[2] < domain[3]):
        raise fail(f"domain {domain!r} is not (xmin, xmax, ymin, ymax)")
    if not isinstance(meta["config"], dict):
        raise fail("its configuration is not a record")
    try:
        config = FitConfig.from_dict(meta["config"]).validate()
    except (TypeError, ValueError, KeyError) as exc:
        raise fail(f"its configuration is refused ({exc})") from None
    history = meta.get("history", [])
    if not (isinstance(history, list) and all(isinstance(h, dict) and isinstance(h.get("step"), int)
                                              for h in history)):
        raise fail("history is not a list of records with their step")
    if not all(meta.get(k) is None or numbers([meta[k]], 1) for k in ("final_psnr", "seconds")) or \
            not isinstance(meta.get("completed", True), bool):
        raise fail("final_psnr, seconds or completed has the wrong type")
    burst = Burst(data=np.broadcast_to(np.float32(0), (t, b["H"], b["W"], c)), layout=b["layout"], dtype=dtype,
                  lo=np.asarray(b["lo"], dtype=np.float64), scale=np.asarray(b["scale"], dtype=np.float64),
                  lo_exact=None if lo_exact is None else tuple(lo_exact))
    return config, burst, tuple(working), tuple(float(v) for v in domain)


def _check_networks(path: str, config: FitConfig, working, domain, params: dict) -> None:
    """Refuse (ValueError naming the first mismatching member) a file whose param members ({name: (info, shape,
    dtype)}) are not the state (names, shapes, dtypes) of the networks its config builds for ``working`` and
    ``domain``. The networks are built on the meta device: shapes only, no memory, however large they would be."""
    def fail(why: str) -> ValueError:
        return ValueError(f"{path}: result file is inconsistent or edited: {why}")

    # every grid level or network layer is at least one stored tensor: a count beyond the members is refused
    # before building (a meta model still makes Python objects per level)
    counts = (config.field.options.get("levels"), config.field.options.get("hidden_layers"),
              config.separation.interference_options.get("levels"),
              config.separation.interference_options.get("hidden_layers"), config.motion.flow_levels)
    if any(isinstance(n, (int, float)) and n > len(params) for n in counts):
        raise fail(f"its configuration asks for more grid levels or layers than the file's {len(params)} arrays")
    try:
        with torch.device("meta"):  # make_model seeds inside its own torch.random.fork_rng (build.py)
            model = make_model(config, working, domain)
    except Exception as exc:  # anything the file's configuration makes the construction raise
        raise fail(f"its configuration builds no networks ({type(exc).__name__}: {exc})") from None
    state = model.state_dict()
    for name, tensor in state.items():
        if name not in params:
            raise fail(f"member param:{name}.npy is missing")
        want = (tuple(tensor.shape), torch.empty(0, dtype=tensor.dtype).numpy().dtype)
        if params[name][1:] != want:
            raise fail(f"member param:{name}.npy holds {params[name][1]} of {params[name][2]}; its configuration "
                       f"builds {want[0]} of {want[1]}")
    extra = [name for name in params if name not in state]
    if extra:
        raise fail(f"member param:{extra[0]}.npy is not part of the networks its configuration builds")
    held = sum(info.file_size for info, _, _ in params.values())
    needed = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if needed > held + (1 << 20):  # beyond the stored state: only a few small non-persistent buffers
        raise fail(f"its networks need {needed} bytes, more than the file holds")


def load(path: str | os.PathLike, *, device: str = "cpu") -> FusionResult:
    """Read a result written by ``save``. Never unpickles; a damaged, foreign or edited file raises ValueError
    naming it, and is refused before anything is allocated for its contents:

    1. the zip directory and each member's .npy header (``_member_headers``): the members ``meta.npy`` and
       ``param:<name>.npy``, stored, each declaring header + prod(shape) * itemsize bytes, in all no more than
       the file's size;
    2. the metadata (``meta.npy``: uint8 (n,), n <= 16 MiB of JSON) and its fields (``_checked_meta``);
    3. the networks its config builds, on the meta device (no memory): their state's names, shapes and dtypes must
       be the param members' (``_check_networks``).

    Then the networks are built and the members read into them one at a time: a load needs the networks' size
    plus its largest member, under twice what the file holds. A missing file raises FileNotFoundError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such result file: {path}")
    dev = resolve_device(device)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable napari-nir result ({exc}); it may be truncated or not a "
                         "file written by FusionResult.save") from None
    with archive:
        headers = _member_headers(path, archive)
        meta_info = headers.pop("meta.npy", None)
        if meta_info is None:
            raise ValueError(f"{path} is not a napari-nir result: its metadata record is missing")
        info, shape, dtype = meta_info
        if dtype != np.uint8 or len(shape) != 1 or shape[0] > _META_LIMIT:
            raise ValueError(f"{path}: its metadata member is {shape} of {dtype}, not at most {_META_LIMIT} bytes")
        try:
            meta = json.loads(_read_member(path, archive, info).tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{path}: metadata is corrupt ({exc})") from None
        config, burst, working, domain = _checked_meta(path, meta)
        params = {name[len("param:"):-len(".npy")]: header for name, header in headers.items()}
        _check_networks(path, config, working, domain, params)
        model = make_model(config, working, domain)
        state = model.state_dict()
        with torch.no_grad():
            for name, (info, _, _) in params.items():
                state[name].copy_(torch.from_numpy(_read_member(path, archive, info)))
    kind = SeparationResult if config.task else FusionResult
    return kind(model.to(dev), burst, config, meta.get("history", []), dev, final_psnr=meta.get("final_psnr"),
                seconds=meta.get("seconds"), completed=meta.get("completed", True))


# -- the artefact table ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArtefactSpec:
    """One kind of output.

    role: its name (napari layer "<source> <role>", provenance "output").
    kind: "image" (an array: TIFF, napari image), "matrices" (a JSON record of (T, 3, 3) matrices),
        "polygons" (T polygons of 4 (row, col) corners on the canonical view), "vectors" ((N, 2, 3) napari
        vectors: start and direction in (t, row, col) pixels), "colour images" ((T, H, W, 3) uint8 shown side
        by side), "record" (a JSON-able dict).
    axes: of an image's data ("YX[C]", "TYX[C]", "TYX", "TYX2"; "[C]": the burst's channels when it has them;
        "source": the input's own axes, ``FusionResult.source_axes``, e.g. "TCYX").
    description: its convention (units, axes, what maps to what), stored with it.
    file: the file the CLI writes (None: napari only); layer: the napari layer type (None: files only).
    visible: shown when added to napari (``visible_separating``: for a separation result, None: the same).
    display: display hints for viewers (colormap, contrast_limits).
    applies(config): whether a result of this config has it (known before fitting: the CLI checks its files).
    make(result, view) -> data, (data, extra provenance) or None (this result has none).
    """

    role: str
    kind: Literal["image", "matrices", "polygons", "vectors", "colour images", "record", "array"]
    axes: str
    description: str
    file: str | None
    layer: str | None
    make: Callable[[Any, Any], Any]
    applies: Callable[[FitConfig], bool] = lambda config: True
    visible: bool = False
    visible_separating: bool | None = None
    display: dict = field(default_factory=dict)


@dataclass
class Artefact:
    """One output of one result: its ``spec``, ``data``, whether the last axis of ``data`` is channels
    (``channels``), extra provenance (``metadata``: its convention and view) and its visibility."""

    spec: ArtefactSpec
    data: Any
    channels: bool
    metadata: dict
    visible: bool

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def file(self) -> str | None:
        return self.spec.file

    @property
    def layer(self) -> str | None:
        return self.spec.layer


@dataclass
class _View:
    extent: str
    scale: float
    cache: dict


def _motion_has(role: str) -> Callable[[FitConfig], bool]:
    return lambda config: role in get_motion(config.motion.model).artefacts


def _task_has(role: str) -> Callable[[FitConfig], bool]:
    return lambda config: bool(config.task) and role in get_task(config.task).layers


def _rigid_layer(config: FitConfig) -> bool:
    return bool(config.task) and config.separation.interference_motion != "none"


def _cached(view: _View, key: str, make: Callable[[], Any]):
    if key not in view.cache:
        view.cache[key] = make()
    return view.cache[key]


def _canonical(result, view: _View):
    data = _cached(view, "canonical", lambda: result.canonical(view.extent, view.scale))
    return data, {"extent": view.extent, "scale": view.scale, "shape": list(np.shape(data))}


def _homographies(result, view: _View):
    record = {"convention": HOMOGRAPHY_CONVENTION,
              "canonical": {"file": "canonical.tif", "extent": view.extent, "scale": view.scale},
              "homographies": result.homographies_to(view.extent, view.scale).tolist()}
    return record


def _flow(result, view: _View) -> np.ndarray:
    return _cached(view, "flow", lambda: np.asarray(result.flow(), dtype=np.float32))


def _flow_colour(result, view: _View) -> np.ndarray:
    flow = _flow(result, view)
    return np.stack([render.flow_to_rgb(f, max_magnitude=np.abs(flow).max() + 1e-6) for f in flow])


def _flow_vectors(result, view: _View):
    flow = _flow(result, view)
    t, h, w, _ = flow.shape
    step = max(4, min(h, w) // 24)
    rows, cols = np.mgrid[step // 2:h:step, step // 2:w:step]
    vectors = []
    for k in range(t):
        d = flow[k, rows, cols]
        start = np.stack([np.full(rows.size, k), rows.ravel(), cols.ravel()], 1)
        direction = np.concatenate([np.zeros((rows.size, 1)), d.reshape(-1, 2)], 1)
        vectors.append(np.stack([start, direction], 1))
    return np.concatenate(vectors).astype(np.float32), {"step": step}


def _separated(result, view: _View, name: str):
    # a loaded result keeps no input: its scene is the networks' own (no do-no-harm rules)
    make = result.layers if result._source is not None else (lambda: result.layers(networks_only=True))
    return _cached(view, "layers", make)[name]


def _thick_alpha_guarded(config: FitConfig) -> bool:
    return bool(config.task) and config.separation.thick_alpha_guard and "alpha" in get_task(config.task).layers


def _kept(result, view: _View):
    if result._source is None:  # a loaded result keeps no input, so no frame values either
        return None
    kept = result.kept_frame_pixels()
    return kept.astype(np.uint8), {"fraction": round(float(kept.mean()), 5)}


KEPT_CONVENTION = ("(T, H, W) uint8, 1 where the scene keeps the frame's own values (interference included) because "
                   "the alpha formed blobs there, much thicker than the burst's wires or streaks (core/guard.py)")


def _registered(result, view: _View):
    if result._source is None:  # a loaded result does not hold its input
        return None
    origin = result.registered_origin(view.extent, view.scale)
    return result.registered(), {"reference": "canonical", "extent": "frame", "order": 1,
                                 "axes": result.source_axes, "origin_in_canonical": [round(v, 4) for v in origin]}


def _transforms_record(result, view: _View) -> dict:
    b = result._burst
    return {"convention": TRANSFORMS_CONVENTION, "reference": "canonical", "extent": "frame",
            "grid_shape": [b.H, b.W], "registered": {"file": "registered.tif"},
            "napari-nir": result.transforms().tolist(),
            "pystackreg": result.transforms(convention="pystackreg").tolist()}


def _diagnostics_record(result, view: _View):
    return None if result._source is None else result.diagnostics().summary()


def _residual(result, view: _View):
    if result._source is None:
        return None
    found = result.diagnostics()
    return found.residual, {"verdict": found.verdict, "input_pixels_per_pixel": round(1 / found.scale, 6)}


RESIDUAL_CONVENTION = (
    "|frame - its reconstruction| averaged over channels, in working units (1 = the burst's range per channel), "
    "on frames reduced by block means of input_pixels_per_pixel x input_pixels_per_pixel pixels: bright where the "
    "fit does not explain the frames")


def _interference_homographies(result, view: _View):
    matrices = result.interference_homographies
    return {"convention": INTERFERENCE_HOMOGRAPHY_CONVENTION, **result.rigid_layer(),
            "homographies": None if matrices is None else matrices.tolist()}


HOMOGRAPHY_CONVENTION = (
    "homographies[t] is a 3x3 matrix mapping a pixel (col, row, 1) of input frame t to the pixel (col, row, w) of "
    "the canonical view described under 'canonical' (divide by w); pixel centres are at integer coordinates, "
    "(0, 0) is the centre of the top-left pixel; frame t -> frame s is inv(H[s]) @ H[t]")
INTERFERENCE_HOMOGRAPHY_CONVENTION = (
    "the interference's rigid layer (a reflection), if 'found': homographies[t] maps a pixel (col, row, 1) of input "
    "frame t to the pixel (col, row, w) of that layer's own frame-sized view (divide by w); frame t -> frame s is "
    "inv(H[s]) @ H[t]; 'score' is how far the residuals' correlation peak stood out, in standard deviations "
    "(>= rigid_layer_score, 10 by default: found)")
TRANSFORMS_CONVENTION = (
    "'napari-nir'[t] is a 3x3 matrix mapping a pixel (col, row, 1) of input frame t to the pixel (col, row, w) of the "
    "registered stack (registered.tif: a grid of the input's size at the frames' average pose; divide by w); pixel "
    "centres are at integer coordinates. 'pystackreg'[t] is its inverse (registered pixel (x=col, y=row, 1) -> "
    "frame-t pixel), the tmats that pystackreg's StackReg.transform_stack(stack, tmats=...) reads")
OCCLUSION_W_CONVENTION = ("(T, H, W) float32 in [-1, 1]: each frame pixel's depth coordinate w in the occlusion "
                          "model's 3-D canonical; the background sits at 0, moving objects elsewhere")
FLOW_CONVENTION = ("(T, H, W, 2) float32: the displacement (d_row, d_col) in pixels from each frame pixel to the "
                   "canonical view")

ARTEFACTS: dict[str, ArtefactSpec] = {
    spec.role: spec
    for spec in (
        # a separation result's own layers first: they are what its user came for
        ArtefactSpec("scene", "image", "TYX[C]", "the scene layer of every frame, in the burst's units and dtype",
                     "scene.tif", "image", lambda r, v: _separated(r, v, "scene"), _task_has("scene"), visible=True),
        ArtefactSpec("interference", "image", "TYX[C]",
                     "the interference layer of every frame (additive tasks: its contribution on black)",
                     "interference.tif", "image", lambda r, v: _separated(r, v, "interference"),
                     _task_has("interference")),
        ArtefactSpec("alpha", "image", "TYX", "the interference's opacity in [0, 1] per frame pixel (float32)",
                     "alpha.tif", "image", lambda r, v: _separated(r, v, "alpha"), _task_has("alpha")),
        ArtefactSpec("kept frame pixels", "image", "TYX", KEPT_CONVENTION, "kept.tif", "image", _kept,
                     _thick_alpha_guarded, display={"colormap": "red", "opacity": 0.5, "contrast_limits": (0, 1)}),
        ArtefactSpec("interference canonical", "image", "YX[C]",
                     "the interference's rigid layer (a reflection) fused over the burst, on the frame-sized grid "
                     "of interference_homographies", "interference_canonical.tif", "image",
                     lambda r, v: r.interference_canonical(), _rigid_layer),
        ArtefactSpec("interference homographies", "matrices", "T33", INTERFERENCE_HOMOGRAPHY_CONVENTION,
                     "interference_homographies.json", None, _interference_homographies, _rigid_layer),
        # fusion (for a separation: its scene stream)
        ArtefactSpec("canonical", "image", "YX[C]", "the fused view in the burst's units and dtype",
                     "canonical.tif", "image", _canonical, visible=True),
        ArtefactSpec("frames", "image", "TYX[C]", "every frame re-rendered from the fit (the separation's "
                     "recomposed input)", "frames.tif", "image", lambda r, v: r.frames()),
        ArtefactSpec("homographies", "matrices", "T33", HOMOGRAPHY_CONVENTION, "homographies.json", None,
                     _homographies, _motion_has("homographies")),
        # registration: the input itself on one grid, and the transforms that put it there
        ArtefactSpec("registered", "image", "source", "every input frame (all its channels and planes) resampled "
                     "onto one grid of the input's size at the frames' average pose, linear interpolation, in the "
                     "input's dtype; pixels no frame covers are 0", "registered.tif", "image", _registered),
        ArtefactSpec("transforms", "matrices", "T33", TRANSFORMS_CONVENTION, "transforms.json", None,
                     _transforms_record, _motion_has("transforms")),
        ArtefactSpec("transforms array", "array", "T33", "(T, 3, 3) float64, the 'napari-nir' transforms of "
                     "transforms.json", "transforms.npy", None, lambda r, v: r.transforms(),
                     _motion_has("transforms array")),
        ArtefactSpec("pystackreg transforms", "array", "T33", "(T, 3, 3) float64, the 'pystackreg' tmats of "
                     "transforms.json: StackReg(...).transform_stack(stack, tmats=np.load(...)) reproduces "
                     "registered.tif", "transforms_pystackreg.npy", None,
                     lambda r, v: r.transforms(convention="pystackreg"), _motion_has("pystackreg transforms")),
        ArtefactSpec("outlines", "polygons", "T42", "every frame's corners as (row, col) pixels of the canonical view",
                     None, "shapes", lambda r, v: r.outlines(v.extent, v.scale), _motion_has("outlines"),
                     visible=True, visible_separating=False),
        ArtefactSpec("flow", "image", "TYX2", FLOW_CONVENTION, "flow.tif", None, _flow, _motion_has("flow")),
        ArtefactSpec("flow colour", "colour images", "TYX3", "the flow colour-coded (hue: direction, saturation: "
                     "magnitude), one frame after another", "flow.png", None, _flow_colour,
                     _motion_has("flow colour")),
        ArtefactSpec("flow vectors", "vectors", "N23", "arrows from frame pixels to where they land in the canonical "
                     "view, (t, row, col) pixels", None, "vectors", _flow_vectors, _motion_has("flow vectors"),
                     visible=True, visible_separating=False, display={"edge_color": "yellow"}),
        ArtefactSpec("flow magnitude", "image", "TYX", "|flow| in pixels per frame pixel", None, "image",
                     lambda r, v: np.hypot(_flow(r, v)[..., 0], _flow(r, v)[..., 1]).astype(np.float32),
                     _motion_has("flow magnitude"), display={"colormap": "magma"}),
        # does the fit explain its frames (core/diagnostics.py)? A loaded result has no input: neither
        ArtefactSpec("diagnostics", "record", "", "the verdict ('ok' or 'doubtful'), one sentence per finding and a "
                     "table per frame (core/diagnostics.py)", "diagnostics.json", None, _diagnostics_record),
        ArtefactSpec("residual", "image", "TYX", RESIDUAL_CONVENTION, "residual.tif", "image", _residual,
                     display={"colormap": "magma"}),
        ArtefactSpec("occlusion w", "image", "TYX", OCCLUSION_W_CONVENTION, "occlusion_w.tif", "image",
                     lambda r, v: r.occlusion_w(), _motion_has("occlusion w"),
                     display={"colormap": "twilight_shifted", "contrast_limits": (-1.0, 1.0)}),
    )
}


def artefact_files(config: FitConfig) -> list[str]:
    """The files a result of ``config`` may have (known before fitting): the CLI refuses to clobber them."""
    return [spec.file for spec in ARTEFACTS.values() if spec.file and spec.applies(config)]
