"""Does a fit explain its frames? A verdict, the reasons behind it and a residual map (numpy/scipy, no torch).

A fit can converge and still be wrong: frames that a wrong start placed side by side in the canonical view are
each reconstructed well (the field has room for all of them), so the reconstruction PSNR alone says nothing.
:func:`alignment_diagnostics` therefore checks what a wrong alignment cannot hide, on frames reduced to at most
``DIAGNOSTIC_SIDE`` pixels:

- **pairs**: frame t+1 warped into frame t by the fitted motion must line up with frame t. The remaining shift
  is measured by masked normalised cross-correlation over the pair's overlap (scikit-image's
  ``phase_cross_correlation`` with masks, Padfield 2012: integer pixels of the reduced frames); a shift of
  ``PAIR_SHIFT_PX`` input pixels or more means the fitted map is wrong by about that much;
- **matches**: where the start matched features (ORB + RANSAC inliers), the fitted map between the pair must
  agree with them: a systematic offset (the median residual vector) of ``MATCH_PX`` input pixels or more says the
  fit drifted from what the frames' own features say (or that the matches were wrong: either way, look);
- **overlap**: a pair that shares less than ``MIN_OVERLAP`` of the frame constrains its alignment weakly;
- **agreement**: the pair's correlation over the overlap, against the burst's median pair;
- **unusable frames**: blank (almost no contrast) or saturated (a large part clipped at the burst's extremes);
- **residual**: the per-frame mean absolute residual of the reconstruction, against the burst's median.

Any finding makes the verdict "doubtful"; none, "ok". The thresholds are physical (pixels, fractions), not
tuned on a sample; their check is tests/core/test_diagnostics.py and benchmarks/diagnostics.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import map_coordinates

__all__ = ["Diagnostics", "alignment_diagnostics", "separation_diagnostics", "SEPARATION_THRESHOLDS",
           "unusable_frames", "reduce_frames", "correlation", "match_residuals", "warp_into", "DIAGNOSTIC_SIDE"]

DIAGNOSTIC_SIDE = 256       # frames are reduced (block means) to at most this many pixels per side
PAIR_SHIFT_PX = 2.0         # remaining shift between aligned neighbours, input pixels
MATCH_PX = 1.0              # median distance of the fitted pair map from the start's feature matches, input pixels
MIN_MATCHES = 10
MIN_OVERLAP = 0.2           # fraction of frame t covered by frame t+1 under the fitted map
AGREEMENT_DROP = 0.5        # a pair correlating below this fraction of the median pair (and below 0.5)
RESIDUAL_RATIO = 3.0        # a frame's mean residual above this multiple of the median frame's
SATURATED_FRACTION = 0.3    # pixels at the burst's own minimum or maximum
BLANK_CONTRAST = 0.02       # frame standard deviation below this fraction of the median frame's


@dataclass
class Diagnostics:
    """verdict: "ok" or "doubtful"; reasons: one sentence per finding; frames: one dict per frame (psnr_db,
    residual, and for t < T-1 the pair (t, t+1): shift_px, overlap, correlation); residual: (T, h, w) float32
    mean absolute residual over channels in working units [0, 1], on frames reduced by ``scale`` (reduced
    pixels per input pixel); unusable: {frame: "blank" | "saturated"}."""

    verdict: str
    reasons: list[str]
    frames: list[dict]
    residual: np.ndarray = field(repr=False)
    scale: float
    unusable: dict[int, str]
    checks: dict | None = None  # separation: the measured quantities behind the verdict

    def __getitem__(self, key: str):
        """Mapping access to the fields: ``found["verdict"]``, ``found["reasons"]``, ``found["residual"]``."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return self.__dataclass_fields__.keys()

    def summary(self) -> dict:
        """JSON-able: everything but the residual map."""
        if self.checks is not None:
            return {"verdict": self.verdict, "reasons": list(self.reasons), "frames": self.frames,
                    "checks": self.checks, "residual_scale": self.scale,
                    "thresholds": dict(SEPARATION_THRESHOLDS)}
        return {"verdict": self.verdict, "reasons": list(self.reasons), "frames": self.frames,
                "unusable_frames": {str(k): v for k, v in self.unusable.items()},
                "residual_scale": self.scale,
                "thresholds": {"pair_shift_px": PAIR_SHIFT_PX, "min_overlap": MIN_OVERLAP,
                               "agreement_drop": AGREEMENT_DROP, "residual_ratio": RESIDUAL_RATIO,
                               "saturated_fraction": SATURATED_FRACTION, "blank_contrast": BLANK_CONTRAST}}


def reduce_frames(frames: np.ndarray, side: int = DIAGNOSTIC_SIDE) -> tuple[np.ndarray, int]:
    """(T, H, W[, C]) -> ((T, H // k, W // k) channel-mean block means, k) with k the smallest factor that brings
    the longer side to at most ``side``."""
    grey = frames.mean(-1, dtype=np.float32) if frames.ndim == 4 else np.asarray(frames, np.float32)
    t, h, w = grey.shape
    k = max(1, math.ceil(max(h, w) / side))
    return grey[:, :h // k * k, :w // k * k].reshape(t, h // k, k, w // k, k).mean((2, 4)), k


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Zero-mean normalised cross-correlation of two equally shaped arrays (0 when either is constant)."""
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else 0.0


def unusable_frames(frames: np.ndarray) -> dict[int, str]:
    """{frame: "blank" | "saturated"} for (T, h, w) grey frames in working units (the burst's range is [0, 1])."""
    std = frames.std(axis=(1, 2))
    typical = float(np.median(std))
    clipped = np.mean((frames <= 0.002) | (frames >= 0.998), axis=(1, 2))
    typical_clipped = float(np.median(clipped))
    out = {}
    for t in range(len(frames)):
        if typical > 0 and std[t] < BLANK_CONTRAST * typical:
            out[t] = "blank"
        elif clipped[t] >= SATURATED_FRACTION and clipped[t] > 3 * typical_clipped:
            out[t] = "saturated"
    return out


def warp_into(frame: np.ndarray, pair_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame s, (h, w) or (h, w, C), resampled (linearly) onto frame t's pixels through ``pair_map`` (3x3, frame-t
    pixel (col, row, 1) -> frame-s pixel): float32 of the same shape, and the (h, w) mask of frame-t pixels that
    land inside frame s."""
    h, w = frame.shape[:2]
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = pair_map @ np.stack([cols.ravel(), rows.ravel(), np.ones(h * w)])
    x, y = pts[0] / pts[2], pts[1] / pts[2]
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    planes = frame[..., None] if frame.ndim == 2 else frame
    warped = np.stack([map_coordinates(planes[..., k], [y, x], order=1, mode="nearest").reshape(h, w)
                       for k in range(planes.shape[-1])], -1)
    return warped.reshape(frame.shape).astype(np.float32), inside.reshape(h, w)


def _pair(first: np.ndarray, second: np.ndarray, pair_map: np.ndarray, k: int) -> dict:
    """The pair check of ``alignment_diagnostics`` for reduced frames t, t+1 and the reduced map t -> t+1."""
    from skimage.registration import phase_cross_correlation

    warped, mask = warp_into(second, pair_map)
    overlap = float(mask.mean())
    out = {"overlap": round(overlap, 4), "shift_px": None, "correlation": None}
    if mask.sum() < 64:
        return out
    out["correlation"] = round(correlation(first[mask], warped[mask]), 4)
    if overlap >= MIN_OVERLAP:
        shift = phase_cross_correlation(first, warped, reference_mask=mask, moving_mask=mask,
                                        overlap_ratio=0.3)
        shift = shift[0] if isinstance(shift, tuple) else shift
        out["shift_px"] = round(float(np.hypot(*np.asarray(shift, dtype=float))) * k, 3)
    return out


def match_residuals(pair_maps: np.ndarray, matches: dict) -> dict[int, tuple[float, int]]:
    """{t: (px, number of matches)} of each pair (t, t+1): how far the fitted map frame t -> frame t+1
    (``pair_maps[t]``, input pixels) sits from the matches {t + 1: (frame-(t+1) points, frame-t points)}, (N, 2)
    (col, row) input pixels: the length of the per-axis median of the matches' residual vectors. The median vector,
    not the median distance: keypoints are found to about half a pixel, which the median distance keeps (0.6-0.8 px
    on a fit right to 0.03 px) and the median vector averages out, while an error of the map shifts them all."""
    out = {}
    for later, (src, dst) in matches.items():
        t = later - 1
        back = np.linalg.inv(pair_maps[t])  # frame t+1 -> frame t
        q = back @ np.vstack([np.asarray(src, float).T, np.ones(len(src))])
        offset = np.median(q[:2] / q[2] - np.asarray(dst, float).T, axis=1)
        out[t] = (float(np.hypot(*offset)), len(src))
    return out


def alignment_diagnostics(frames: np.ndarray, rendered: np.ndarray, pair_maps: np.ndarray | None,
                          k: int, down_weighted: dict | None = None,
                          matched: dict[int, tuple[float, int]] | None = None) -> Diagnostics:
    """frames, rendered: (T, h, w) reduced grey input and reconstruction, working units; pair_maps: (T-1, 3, 3)
    reduced frame-t pixel -> frame-(t+1) pixel maps of the fit (None for flow models: pairs are not checked);
    k: input pixels per reduced pixel; down_weighted: {frame: kind} the fit drew less often (api); matched:
    ``match_residuals`` of the pairs the start matched. See the module docstring for what is checked."""
    t_count = len(frames)
    residual = np.abs(rendered - frames).astype(np.float32)
    mean_residual = residual.mean(axis=(1, 2))
    mse = np.mean((rendered - frames) ** 2, axis=(1, 2))
    unusable = unusable_frames(frames)
    rows = [{"frame": t, "psnr_db": round(float(-10 * np.log10(max(mse[t], 1e-12))), 2),
             "residual": round(float(mean_residual[t]), 5)} for t in range(t_count)]
    reasons = []
    for t, kind in unusable.items():
        what = "has almost no contrast" if kind == "blank" else "is largely clipped at the burst's extremes"
        done = ("the fit drew its pixels less often (blank_weight), so it pulls the others little" if t in
                (down_weighted or {}) else "it may pull the others")
        reasons.append(f"frame {t} {what} ({kind}): its alignment rests on little and {done}; check it, or leave "
                       f"it out")
    if pair_maps is not None:
        for t in range(t_count - 1):
            rows[t].update(_pair(frames[t], frames[t + 1], pair_maps[t], k))
            if matched and t in matched:
                rows[t].update(match_px=round(matched[t][0], 3), matches=matched[t][1])
        pairs = [r for r in rows[:-1] if r["frame"] not in unusable and r["frame"] + 1 not in unusable]
        correlations = [r["correlation"] for r in pairs if r["correlation"] is not None]
        typical = float(np.median(correlations)) if correlations else None
        for r in pairs:
            t = r["frame"]
            if r["overlap"] < MIN_OVERLAP:
                reasons.append(f"frames {t} and {t + 1} overlap by only {100 * r['overlap']:.0f} % under the fitted "
                               f"motion: the alignment between them is weakly constrained")
            elif r["shift_px"] is not None and r["shift_px"] >= PAIR_SHIFT_PX:
                reasons.append(f"frames {t} and {t + 1} still differ by a shift of about {r['shift_px']:.0f} px "
                               f"after alignment: the fitted motion between them is wrong")
            elif r.get("matches", 0) >= MIN_MATCHES and r["match_px"] >= MATCH_PX:
                reasons.append(f"frames {t} and {t + 1}: the fitted motion between them sits {r['match_px']:.1f} px "
                               f"from their {r['matches']} feature matches (median offset)")
            elif (typical is not None and r["correlation"] is not None and r["correlation"] < 0.5
                  and r["correlation"] < AGREEMENT_DROP * typical):
                reasons.append(f"frames {t} and {t + 1} agree poorly after alignment (correlation "
                               f"{r['correlation']:.2f}, median pair {typical:.2f})")
    typical_residual = float(np.median(mean_residual))
    for t in range(t_count):
        if t not in unusable and typical_residual > 0 and mean_residual[t] > RESIDUAL_RATIO * typical_residual:
            reasons.append(f"frame {t} is explained {mean_residual[t] / typical_residual:.1f}x worse than the median "
                           f"frame (mean residual {mean_residual[t]:.3f})")
    return Diagnostics("doubtful" if reasons else "ok", reasons, rows, residual, 1.0 / k, unusable)


# -- layer separation -----------------------------------------------------------------------------------------
UNEXPLAINED_LEVEL = 0.1     # a pixel is unexplained when |frame - reconstruction| exceeds this (working units)
UNEXPLAINED_FRACTION = 0.2  # ... and a frame is unexplained when more than this fraction of its pixels are
INTERFERENCE_SHARE = 0.5    # the interference carries more than this share of the frames' variance: swapped?
COVERAGE = 0.5              # an obstruction or rain alpha above 1/2 on more than this fraction of the pixels
STILL_PX = 0.5              # the scene moves less than this (input pixels) over the burst ...
STILL_VARIATION = 0.2       # ... and the interference changes by less than this fraction of its own size
CLAIMED = 0.01              # mean |interference contribution| below this: the fit found no interference
KEPT_FRACTION = 0.01        # pixels keeping the frame's own values (core/guard.py)
DENSE_REMOVAL = 0.01        # sparse tasks: the median pixel's |frame - scene| above this (working units)
SEPARATION_THRESHOLDS = {"unexplained_level": UNEXPLAINED_LEVEL, "unexplained_fraction": UNEXPLAINED_FRACTION,
                         "interference_share": INTERFERENCE_SHARE, "coverage": COVERAGE, "still_px": STILL_PX,
                         "still_variation": STILL_VARIATION, "claimed": CLAIMED, "kept_fraction": KEPT_FRACTION,
                         "dense_removal": DENSE_REMOVAL}


def separation_diagnostics(frames: np.ndarray, reconstruction: np.ndarray, scene: np.ndarray,
                           alpha: np.ndarray | None, *, sparse: bool, scene_motion_px: float | None,
                           kept: np.ndarray | None = None) -> Diagnostics:
    """Does a layer separation explain its frames, and does it look like one?

    frames, reconstruction, scene: (T, H, W, C) working units [0, 1]: the input, the networks' recomposed
    frames and the scene as returned (after detail transfer); alpha: (T, H, W) for compositing tasks, else None;
    sparse: the task expects a sparse alpha (fence, rain); scene_motion_px: how far the scene's frame corners
    move over the burst in input pixels (None for flow scenes: not checked); kept: (T, H, W) bool, pixels where
    the scene keeps the frame's own values (core/guard.py), or None. Findings, each making the verdict "doubtful":

    - **unexplained frames**: more than ``UNEXPLAINED_FRACTION`` of a frame's pixels differ from the
      reconstruction by more than ``UNEXPLAINED_LEVEL``: the formation model does not hold there (things that
      move by themselves, a wrong motion, an interference the task does not describe); the detail transfer
      gives part of the frame back to the scene there, interference included;
    - **swapped layers**: what the result takes out of the frames (frame - scene) carries more than
      ``INTERFERENCE_SHARE`` of their variance: the "interference" holds most of the picture;
    - **not sparse**: an obstruction or rain alpha above 1/2 on more than ``COVERAGE`` of the pixels;
    - **dense removal** (sparse tasks): the median pixel's |frame - scene| exceeds ``DENSE_REMOVAL``: where the
      interference should touch few pixels, the scene differs from the frames nearly everywhere, so it is smoother
      than they are (detail or noise went into the interference) and may be worse than the input;
    - **kept pixels**: more than ``KEPT_FRACTION`` of the pixels keep the frame's values because the alpha formed
      blobs there (core/guard.py): the interference stays in those pixels;
    - **nothing moves**: the scene moves less than ``STILL_PX`` over the burst while the interference the fit
      claims (at least ``CLAIMED`` on average) barely changes between frames (``STILL_VARIATION``): two layers
      that move alike cannot be told apart, so the split between them is arbitrary.

    A burst without interference, whose scene the fit explains, passes every check: its interference is empty.
    The thresholds are physical fractions of the burst's range and pixels, set before any corpus run
    (benchmarks/separation_corpus.py counts the verdicts on the held-out corpus).
    """
    t_count = len(frames)
    error = frames - reconstruction
    residual = np.abs(error).mean(-1).astype(np.float32)
    mse = (error.astype(np.float64) ** 2).mean(axis=(1, 2, 3))
    unexplained = (residual > UNEXPLAINED_LEVEL).mean(axis=(1, 2))
    rows = [{"frame": t, "psnr_db": round(float(-10 * np.log10(max(mse[t], 1e-12))), 2),
             "residual": round(float(residual[t].mean()), 5), "unexplained": round(float(unexplained[t]), 4)}
            for t in range(t_count)]
    taken = frames - scene
    variance = float(frames.reshape(-1, frames.shape[-1]).var(0).sum())
    share = float(taken.reshape(-1, taken.shape[-1]).var(0).sum()) / variance if variance > 0 else 0.0
    claimed = float(np.abs(taken).mean())
    variation = float(taken.std(0).mean()) / claimed if claimed > 0 else 0.0
    checks = {"unexplained_fraction": round(float(unexplained.mean()), 4), "interference_share": round(share, 4),
              "interference_mean": round(claimed, 5), "interference_variation": round(variation, 4),
              "scene_motion_px": None if scene_motion_px is None else round(scene_motion_px, 3)}
    reasons = []
    bad = [t for t in range(t_count) if unexplained[t] > UNEXPLAINED_FRACTION]
    if bad:
        worst = max(bad, key=lambda t: unexplained[t])
        reasons.append(f"the fit does not explain frame(s) {', '.join(map(str, bad))}: up to "
                       f"{100 * unexplained[worst]:.0f} % of a frame's pixels differ from the reconstruction by more "
                       f"than {100 * UNEXPLAINED_LEVEL:.0f} % of the range: the formation model does not hold there "
                       "(see the residual)")
    if share > INTERFERENCE_SHARE:
        reasons.append(f"the interference holds {100 * share:.0f} % of the frames' variance, more than the scene: "
                       "the layers may be swapped")
    if alpha is not None and sparse:
        coverage = float((alpha > 0.5).mean())
        checks["alpha_coverage"] = round(coverage, 4)
        if coverage > COVERAGE:
            reasons.append(f"the interference covers {100 * coverage:.0f} % of the pixels (alpha > 1/2), where the "
                           "task expects it sparse: the layers may be swapped or the task may be the wrong one")
    if sparse:
        typical = float(np.median(np.abs(taken).mean(-1)))
        checks["median_removal"] = round(typical, 5)
        if typical > DENSE_REMOVAL:
            reasons.append(f"the scene differs from the frames by {100 * typical:.1f} % of the range at the median "
                           "pixel, where the interference should touch few pixels: the scene is smoother than the "
                           "frames (detail or noise went into the interference) and may be worse than the input")
    if kept is not None:
        fraction = float(np.mean(kept))
        checks["kept_fraction"] = round(fraction, 4)
        if fraction > KEPT_FRACTION:
            reasons.append(f"{100 * fraction:.1f} % of the pixels keep the frame's own values, interference included: "
                           "there the alpha forms blobs, not wires or streaks (an object moving by itself, or a scene "
                           "the motion model does not hold)")
    if (scene_motion_px is not None and scene_motion_px < STILL_PX and claimed >= CLAIMED
            and variation < STILL_VARIATION):
        reasons.append(f"neither layer moves between the frames (scene {scene_motion_px:.2f} px, interference "
                       f"changing by {100 * variation:.0f} % of its size): layers that move alike cannot be told "
                       "apart, so the split between them is arbitrary")
    unusable = unusable_frames(frames.mean(-1))
    return Diagnostics("doubtful" if reasons else "ok", reasons, rows, residual, 1.0, unusable, checks)
