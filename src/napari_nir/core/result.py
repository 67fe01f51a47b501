"""Result objects: what ``napari_nir.fuse`` returns, and their safe save/load.

The save format is a NumPy ``.npz`` archive of plain numeric arrays plus one JSON document; it is read with
``allow_pickle=False``, so loading a file can never execute code.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np
import torch

from .._version import __version__
from . import render
from .burst import Burst
from .fit import FitConfig, make_model
from .motion import Normaliser

FORMAT = "napari-nir-result"
FORMAT_VERSION = 1


class FusionResult:
    """A fitted burst: canonical field + motion. Arrays come back in the burst's layout, units and dtype.

    Attributes: ``history`` (list of dicts: step, seconds, loss, psnr), ``config`` (FitConfig),
    ``final_psnr`` (dB, all frames re-rendered against the working input; None after load).
    """

    def __init__(self, model, burst: Burst, config: FitConfig, history: list[dict], device: torch.device,
                 final_psnr: float | None = None, seconds: float | None = None, completed: bool = True):
        self._model = model.eval()
        self._burst = burst
        self.config = config
        self.history = history
        self._device = device
        self.final_psnr = final_psnr
        self.seconds = seconds
        self.completed = completed
        self._input_norm = Normaliser(burst.H, burst.W)

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def motion(self) -> str:
        return self.config.motion

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
        return self.motion in ("flow", "occlusion")

    @property
    def homographies(self) -> np.ndarray | None:
        """(T, 3, 3) float64: frame-t pixel (col, row, 1) -> pixel of ``canonical(extent="union", scale=1)``.
        None for the flow models (see ``flow()``)."""
        if self.is_flow:
            return None
        to_union = np.linalg.inv(self.canonical_transform("union", 1.0))
        h = np.einsum("ij,tjk,kl->til", to_union, self._normalised_matrices(), self._input_norm.matrix)
        return h / h[:, 2:3, 2:3]

    def frame_to_frame(self, t: int, s: int) -> np.ndarray:
        """3x3 homography mapping frame-t pixels to frame-s pixels (homography model)."""
        if self.is_flow:
            raise ValueError(f"frame_to_frame is for motion='homography'; this result used {self.motion!r}: "
                             "use flow_between(t, s)")
        h = self.homographies
        m = np.linalg.inv(h[s]) @ h[t]
        return m / m[2, 2]

    def outlines(self, extent: str = "union", scale: float = 1.0) -> np.ndarray:
        """(T, 4, 2) every frame's corners as (row, col) pixels of ``canonical(extent, scale)`` (napari order).
        Homography model only."""
        if self.is_flow:
            raise ValueError("outlines() is for motion='homography'; for flow models use flow()")
        to_out = np.linalg.inv(self.canonical_transform(extent, scale))
        n = self._input_norm
        hx, hy = n.half_extent()
        corners = np.array([[-hx, -hy, 1], [hx, -hy, 1], [hx, hy, 1], [-hx, hy, 1]]).T
        pts = np.einsum("ij,tjk,kl->til", to_out, self._normalised_matrices(), corners)
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
                                                self._device, extent=extent, scale=scale, w=w)
            return self._burst.restore(view, dtype=dtype)
        view = render.render_canonical(self._model, self._normalised_matrices(), self._input_norm,
                                       self.config.value_range, self._device, extent=extent, scale=scale)
        return self._burst.restore(view, dtype=dtype)

    def _require_flow(self, what: str) -> None:
        if not self.is_flow:
            raise ValueError(f"{what} is available for motion='flow' or 'occlusion'; this result used "
                             f"motion={self.motion!r}: use .homographies")

    def _frame_points(self) -> torch.Tensor:
        return torch.as_tensor(render.pixel_grid(self._burst.H, self._burst.W, self._input_norm))

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
        start = render.apply_homography(rel, torch.zeros(len(xy), dtype=torch.long), xy.double())
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
        if self.motion != "occlusion":
            raise ValueError(f"occlusion_w() needs motion='occlusion'; this result used {self.motion!r}")
        b, xy = self._burst, self._frame_points()
        return np.stack([render.warp_points(self._model, t, xy, self._device)[:, 2].numpy().reshape(b.H, b.W)
                         for t in range(b.T)]).astype(np.float32)

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
            "final_psnr_db": None if self.final_psnr is None else round(float(self.final_psnr), 4),
            "seconds": None if self.seconds is None else round(float(self.seconds), 3),
            "steps_run": self.history[-1]["step"] if self.history else 0,
            "completed": self.completed,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write this result to ``path`` (.npz: numeric arrays + JSON, never pickle). Atomic."""
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
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

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
        xy = torch.as_tensor(render.pixel_grid(b.H, b.W, self._input_norm))
        out = np.empty((b.H * b.W, b.C), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(xy), render.CHUNK):
                chunk = xy[start:start + render.CHUNK].to(self._device)
                out[start:start + len(chunk)] = self._model.rigid_layer_at(chunk).cpu().numpy()
        return b.restore(out.reshape(b.H, b.W, b.C), dtype=dtype)

    def layers(self, *, dtype: str = "input") -> dict[str, np.ndarray]:
        """{"scene", "interference"[, "alpha"]}: (T, H, W[, C]) in the burst's layout, units and dtype.

        "alpha" (fence, rain) is (T, H, W) float32 in [0, 1]. Additive interference (reflection, moire) is
        its contribution on a black background: value * range + burst minimum (negative moire values clip
        for integer dtypes; ask for dtype="float32" to keep them).
        """
        b = self._burst
        xy = torch.as_tensor(render.pixel_grid(b.H, b.W, self._input_norm))
        scene = np.empty((b.T, b.H, b.W, b.C), dtype=np.float32)
        interference = np.empty_like(scene)
        alpha = np.empty((b.T, b.H, b.W), dtype=np.float32) if "alpha" in self._model.task.layers else None
        lo, hi = self.config.value_range
        with torch.no_grad():
            for t in range(b.T):
                for start in range(0, len(xy), render.CHUNK):
                    chunk = xy[start:start + render.CHUNK].to(self._device)
                    index = torch.full((len(chunk),), t, dtype=torch.long, device=self._device)
                    _, s, layers = self._model.layers_at(index, chunk)
                    rows = slice(start, start + len(chunk))
                    scene[t].reshape(-1, b.C)[rows] = ((s - lo) / (hi - lo)).cpu().numpy()
                    interference[t].reshape(-1, b.C)[rows] = layers["interference"].cpu().numpy()
                    if alpha is not None:
                        alpha[t].reshape(-1)[rows] = layers["alpha"][:, 0].cpu().numpy()
        out = {"scene": b.restore(scene, dtype=dtype), "interference": b.restore(interference, dtype=dtype)}
        if alpha is not None:
            out["alpha"] = alpha
        return out

    def provenance(self) -> dict:
        prov = super().provenance()
        prov["task"] = f"separate:{self.task}"
        if self.config.interference_motion != "none":
            prov["rigid_layer"] = self.rigid_layer()
        return prov

    def rigid_layer(self) -> dict:
        """{"found": bool, "score": float | None}: whether the interference got a rigidly moving layer of its
        own (``interference_motion``), and the residuals' correlation score it was decided on (None if the
        run stopped before its warm-up ended)."""
        model = self._model
        score = float(getattr(model, "rigid_score", float("nan")))
        return {"found": self.interference_homographies is not None,
                "score": None if not np.isfinite(score) else round(score, 4)}

    def __repr__(self) -> str:
        return super().__repr__().replace("<FusionResult", f"<SeparationResult task={self.task!r}")


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


def load(path: str | os.PathLike, *, device: str = "cpu") -> FusionResult:
    """Read a result written by ``save``. Never unpickles; a damaged or foreign file raises ValueError."""
    from .fit import resolve_device

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such result file: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable napari-nir result ({exc}); it may be truncated or not a "
                         "file written by FusionResult.save") from None
    if "meta" not in arrays or arrays["meta"].dtype != np.uint8:
        raise ValueError(f"{path} is not a napari-nir result: its metadata record is missing")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: metadata is corrupt ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r} version {meta.get('format_version')!r}")
    try:
        cfg = dict(meta["config"])
        cfg["value_range"] = tuple(cfg["value_range"])
        config = FitConfig(**cfg)
        b = meta["burst"]
        dev = resolve_device(device)
        model = make_model(config, tuple(meta["working_shape"]), meta["domain"])
        state = {k[len("param:"):]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("param:")}
        model.load_state_dict(state, strict=True)
        burst = Burst(data=np.broadcast_to(np.float32(0), (b["T"], b["H"], b["W"], b["C"])), layout=b["layout"],
                      dtype=np.dtype(b["dtype"]), lo=np.asarray(b["lo"], dtype=np.float64),
                      scale=np.asarray(b["scale"], dtype=np.float64),
                      lo_exact=None if b.get("lo_exact") is None else tuple(int(v) for v in b["lo_exact"]))
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path}: result file is inconsistent or edited ({type(exc).__name__}: {exc})") from None
    kind = SeparationResult if config.task else FusionResult
    return kind(model.to(dev), burst, config, meta.get("history", []), dev,
                        final_psnr=meta.get("final_psnr"), seconds=meta.get("seconds"),
                        completed=meta.get("completed", True))
