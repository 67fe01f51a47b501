"""Verdicts: large motion, good fits (false alarms) and blank or saturated frames (core/diagnostics.py,
motion.robust_start, the blank_weight option).

Every burst here is held out: the diagnostics' thresholds are physical (2 px, 20 % overlap), fixed before any of
these ran; robust_start's correlation floor (0.3) and unwrap margin (0.1) likewise; blank_weight (0.1) was chosen
on homography_burst seeds 0-2 at 128^2 (benchmarks/DECISIONS.md, "blank and saturated frames"), and is reported
here on other seeds and sizes.

Large motion: frames of 384 x 384 cut from an image (scikit-image's, resized to 1400 x 1400) at a drift of 200 px
per frame plus up to +-25 px of jitter in both directions; the error of a pair (t, t+1) is the RMS over a 9 x 9
grid of frame-(t+1) points that land in frame t of the distance between the fitted map and the true translation.
A wrong answer is silent when the error exceeds 0.5 px and the verdict is "ok".
"""
from __future__ import annotations

import time

import numpy as np

import napari_nir as nir
from napari_nir._sample_data import homography_burst, microscopy_drift_stack

DRIFT_IMAGES = ("astronaut", "camera", "coffee", "cell", "immunohistochemistry", "moon")


def drift_burst(image: str, step: int = 200, side: int = 384, frames: int = 5, seed: int = 0):
    """(T, side, side) float32 frames drifting ``step`` px per frame (+-25 px jitter) and their (row, col) offsets."""
    from skimage import data, transform

    img = getattr(data, image)()
    img = img.mean(-1) if img.ndim == 3 else img.astype(np.float64)
    base = transform.resize(img, (1400, 1400), order=1)
    rng = np.random.default_rng(seed)
    offsets = [(int(100 + rng.integers(-25, 26)), int(50 + t * step + rng.integers(-25, 26))) for t in range(frames)]
    stack = np.stack([base[r:r + side, c:c + side] for r, c in offsets]).astype(np.float32)
    stack += rng.normal(0, 0.01, stack.shape).astype(np.float32)
    return stack, offsets


def pair_errors(fit, offsets, side: int) -> list[float]:
    """RMS px error of each consecutive pair's fitted map frame t+1 -> frame t against the true translation."""
    out = []
    for t in range(len(offsets) - 1):
        d_row, d_col = offsets[t + 1][0] - offsets[t][0], offsets[t + 1][1] - offsets[t][1]
        cols = np.linspace(max(0, -d_col), min(side - 1, side - 1 - d_col), 9)
        rows = np.linspace(max(0, -d_row), min(side - 1, side - 1 - d_row), 9)
        cc, rr = np.meshgrid(cols, rows)
        pts = np.stack([cc.ravel(), rr.ravel(), np.ones(cc.size)])
        mapped = fit.frame_to_frame(t + 1, t) @ pts
        mapped = mapped[:2] / mapped[2]
        truth = pts[:2] + np.array([[d_col], [d_row]])
        out.append(float(np.sqrt(np.mean(np.sum((mapped - truth) ** 2, axis=0)))))
    return out


def large_drift(quick: bool, device: str) -> dict:
    from napari_nir.core.motion import robust_start

    rows = []
    silent = 0
    for image in DRIFT_IMAGES[:2] if quick else DRIFT_IMAGES:
        stack, offsets = drift_burst(image)
        work = (stack - stack.min()) / (stack.max() - stack.min())
        _, report = robust_start(work)
        start = time.perf_counter()
        fit = nir.fuse(stack, "homography", device=device, preview_every=0, steps=100 if quick else None)
        seconds = time.perf_counter() - start
        found = fit.diagnostics()
        errors = pair_errors(fit, offsets, stack.shape[1])
        wrong = max(errors) > 0.5
        silent += wrong and found.verdict == "ok"
        rows.append([image, f"{len(report['features'])} / {len(report['phase'])} / {len(report['failed'])}",
                     f"{np.median(errors):.2f}", f"{max(errors):.2f}", found.verdict,
                     "yes" if wrong and found.verdict == "ok" else "no", f"{seconds:.0f}"])
    return {"title": "Large motion: 5 x 384^2 frames drifting 200 px per frame (+-25 px jitter), homography, defaults",
            "header": ["image", "start links: features / phase / none", "median pair error px",
                       "worst pair error px", "verdict", "silent wrong answer", "fit s"],
            "rows": rows,
            "notes": [f"silent wrong answers (worst pair error > 0.5 px with a 'good' verdict): {silent} of "
                      f"{len(rows)}; target: none, with error <= 0.5 px or a 'doubtful' verdict",
                      "pair error: RMS over 9 x 9 points of frame t+1 that land in frame t, fitted map against the "
                      "true translation"]}


def false_alarms(quick: bool, device: str) -> dict:
    """Verdicts on fits that are right: generated bursts with known motion (their errors are in the fusion and
    registration tables) and drifting stacks."""
    rows = []
    cases = [(f"homography_burst seed {s}, 7 x 160^2", lambda s=s: homography_burst(7, (160, 160), seed=s).frames,
              "homography") for s in (20, 21, 22)]
    cases += [(f"microscopy_drift_stack {img}, 20 x 256^2", lambda img=img: microscopy_drift_stack(
        20, (256, 256), image=img, seed=3).frames[:, 0], "rigid") for img in ("cell", "immunohistochemistry")]
    for name, make, motion in cases[:2] if quick else cases:
        fit = nir.fuse(make(), motion, device=device, preview_every=0, steps=100 if quick else None)
        found = fit.diagnostics()
        rows.append([name, motion, found.verdict, "; ".join(found.reasons) or "-"])
    doubtful = sum(r[2] != "ok" for r in rows)
    return {"title": "Verdicts on good fits (false alarms)", "header": ["burst", "motion", "verdict", "reasons"],
            "rows": rows, "notes": [f"doubtful verdicts on these right fits: {doubtful} of {len(rows)}"]}


def _corner_errors(fit, truth, shape) -> np.ndarray:
    h, w = shape
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [w - 1, h - 1, 1], [0, h - 1, 1]], float).T
    out = []
    for t in range(len(truth)):
        a = np.linalg.inv(fit.homographies[0]) @ fit.homographies[t]
        b = np.linalg.inv(truth[0]) @ truth[t]
        pa, pb = a @ corners, b @ corners
        out.append(np.mean(np.hypot(*(pa[:2] / pa[2] - pb[:2] / pb[2]))))
    return np.asarray(out)


def bad_frames(quick: bool, device: str) -> dict:
    """One blank or saturated frame (frame 3) in a burst of 7: the other frames' alignment, with and without
    drawing the blank frame less often."""
    rows = []
    for seed in (30, 31) if quick else (30, 31, 32, 33, 34, 35):
        sample = homography_burst(7, (160, 160), seed=seed)
        frames = np.asarray(sample.frames, dtype=np.float32)
        blank = frames.copy()
        blank[3] = frames.mean()
        saturated = frames.copy()
        saturated[3] = np.clip(frames[3] * 3.0, 0, frames.max())
        for label, burst, weight in (("none", frames, 0.1), ("blank", blank, 1.0), ("blank", blank, 0.1),
                                     ("saturated", saturated, 0.1)):
            fit = nir.fuse(burst, device=device, preview_every=0, blank_weight=weight,
                           steps=100 if quick else None)
            errors = _corner_errors(fit, sample.homographies, burst.shape[1:3])
            others = np.delete(errors, [0, 3])
            found = fit.diagnostics()
            rows.append([seed, label, weight, f"{others.mean():.3f}", f"{others.max():.3f}", f"{errors[3]:.2f}",
                         ", ".join(f"{k}: {v}" for k, v in fit.down_weighted.items()) or "-", found.verdict])
    return {"title": "One blank or saturated frame in 7 (homography_burst, 160^2, held-out seeds)",
            "header": ["seed", "bad frame", "blank_weight", "others' mean corner error px",
                       "others' worst px", "bad frame's error px", "drawn less often", "verdict"],
            "rows": rows,
            "notes": ["corner error: mean distance of the frame's corners mapped to frame 0 by the fitted and the "
                      "true homographies; a blank frame has no content to align, so its own error means nothing"]}


def run(quick: bool, device: str) -> list[dict]:
    return [large_drift(quick, device), false_alarms(quick, device), bad_frames(quick, device)]
