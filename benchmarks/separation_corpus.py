"""Layer separation on the held-out half of the evaluation corpus (benchmarks/corpus.py).

Per task, the 10 held-out bursts (odd indices; photographs never used while tuning), fast preset, seed 0, one
fit each. Scores per burst, all against the true scene with a border of H/16 excluded, pooled over frames:

* PSNR of our scene, of the input and of the best classical baseline (frames aligned by ORB + RANSAC
  homographies, per-pixel temporal median / minimum (reflection) / mean, ``separation.aligned_baselines``);
  for the additive tasks (reflection, moire) every candidate is DC-matched first (each frame's and channel's mean
  set to the truth's): an additive split leaves a constant free between the layers, and the input carries the
  interference's mean, which is not what a reader means by "worse";
* where the interference leaves pixels untouched (fence, rain: alpha <= 1/255): our PSNR there minus the input's
  (the do-no-harm promise, goal >= -0.5 dB);
* on bursts with an object moving by itself: PSNR over the object's pixels, ours minus the input's;
* the verdict of ``diagnostics()``.

Then the no-interference check: held-out bursts 1 and 3 of every task made without their interference (the same
scene, motion and noise): our scene against the input, and the verdict (goal: >= input - 0.5 dB and "ok").
"""
from __future__ import annotations

import time

import numpy as np

import napari_nir as nir

from .corpus import HELD_OUT, KINDS, TASK_NAMES, make_burst
from .fusion import psnr
from .separation import _baseline_names, aligned_baselines

ADDITIVE = ("reflection", "moire")
CLEAN_CHECK = (1, 3)  # held-out bursts also fitted without their interference
QUICK_COUNT = 2       # --quick: the first two held-out bursts per task, 100 steps


def _dc_matched(x: np.ndarray, truth: np.ndarray) -> np.ndarray:
    axes = (1, 2)
    return x - x.mean(axis=axes, keepdims=True) + truth.mean(axis=axes, keepdims=True)


def _score(x, truth, region, additive: bool) -> float:
    """PSNR dB of ``x`` against ``truth`` over the bool ``region`` (T, H, W) (DC-matched first if additive)."""
    if additive:
        x = _dc_matched(x, truth)
    mask = np.broadcast_to(region[..., None], x.shape) if x.ndim == 4 else region
    return psnr(x[mask], truth[mask]) if mask.any() else float("nan")


def _fit(frames, task, device, quick):
    t0 = time.perf_counter()
    sep = nir.separate(frames, task, preset="fast", device=device, seed=0, steps=100 if quick else None)
    return sep, sep.layers(dtype="float32")["scene"], time.perf_counter() - t0


def evaluate(task: str, index: int, device: str = "cpu", quick: bool = False) -> dict:
    """One corpus burst: the scores described in the module docstring."""
    b = make_burst(task, index)
    sep, scene, wall = _fit(b.frames, task, device, quick)
    t, h, w = b.frames.shape[:3]
    border = max(2, h // 16)
    inner = np.zeros((t, h, w), bool)
    inner[:, border:-border, border:-border] = True
    additive = task in ADDITIVE
    baselines = aligned_baselines(b.frames)
    base = {n: _score(baselines[n], b.clean, inner, additive) for n in _baseline_names(task)}
    best = max(base, key=base.get)
    out = {"task": task, "index": index, "info": b.info, "wall": wall,
           "ours": _score(scene, b.clean, inner, additive), "input": _score(b.frames, b.clean, inner, additive),
           "baseline": base[best], "baseline_name": best, "verdict": sep.diagnostics().verdict,
           "reasons": sep.diagnostics().reasons}
    untouched = inner & ~b.interference_mask
    if untouched.any() and not additive:
        out["untouched"] = (_score(scene, b.clean, untouched, False), _score(b.frames, b.clean, untouched, False))
    if b.object_mask is not None:
        region = inner & b.object_mask
        out["object"] = (_score(scene, b.clean, region, additive), _score(b.frames, b.clean, region, additive))
    return out


def evaluate_clean(task: str, index: int, device: str = "cpu", quick: bool = False) -> dict:
    """A corpus burst without its interference: our scene and the input against the noiseless scene."""
    b = make_burst(task, index, with_interference=False)
    sep, scene, wall = _fit(b.frames, task, device, quick)
    h = b.frames.shape[1]
    border = max(2, h // 16)
    inner = np.zeros(b.frames.shape[:3], bool)
    inner[:, border:-border, border:-border] = True
    return {"task": task, "index": index, "wall": wall, "ours": _score(scene, b.clean, inner, False),
            "input": _score(b.frames, b.clean, inner, False), "verdict": sep.diagnostics().verdict,
            "reasons": sep.diagnostics().reasons}


def _describe(info: dict) -> str:
    size = "x".join(map(str, info["shape"]))
    return f"{size} {'grey' if info['grey'] else 'RGB'}, {info['kind']}, {info['camera_motion']} motion"


def run(quick: bool, device: str) -> list[dict]:
    indices = HELD_OUT[:QUICK_COUNT] if quick else HELD_OUT
    results = {task: [evaluate(task, i, device, quick) for i in indices] for task in TASK_NAMES}
    rows = []
    for task, found in results.items():
        for r in found:
            untouched = r.get("untouched")
            obj = r.get("object")
            rows.append([task, str(r["index"]), _describe(r["info"]), f"{r['wall']:.1f}", f"{r['ours']:.2f}",
                         f"{r['input']:.2f}", f"{r['baseline']:.2f} ({r['baseline_name']})",
                         f"{r['ours'] - r['input']:+.2f}", f"{r['ours'] - r['baseline']:+.2f}",
                         "-" if untouched is None else f"{untouched[0] - untouched[1]:+.2f}",
                         "-" if obj is None else f"{obj[0] - obj[1]:+.2f}", r["verdict"]])
    per_burst = {
        "title": f"Layer separation, held-out corpus: {len(indices)} bursts per task, 5 frames each, fast preset, "
                 f"device {device}",
        "header": ["task", "burst", "size, colour, content, camera", "wall s", "ours dB", "input dB",
                   "best baseline dB", "ours - input", "ours - baseline", "untouched pixels: ours - input",
                   "moving object: ours - input", "verdict"],
        "rows": rows,
        "notes": ["benchmarks/corpus.py makes the bursts (odd indices: the held-out half, photographs never used "
                  "while tuning); PSNR against the true scene, H/16 border excluded, pooled over frames; reflection "
                  "and moire DC-matched per frame and channel (every candidate)",
                  "untouched pixels: where the interference changes nothing (alpha tasks); moving object: the pixels "
                  "of the object that moves by itself",
                  "baseline: frames aligned onto each frame (ORB + RANSAC homographies), per-pixel temporal median / "
                  "minimum (reflection) / mean, the best of them per burst"]}
    summary_rows = []
    for task, found in results.items():
        gain = np.array([r["ours"] - r["input"] for r in found])
        over = np.array([r["ours"] - r["baseline"] for r in found])
        untouched = [r["untouched"][0] - r["untouched"][1] for r in found if "untouched" in r]
        doubtful = sum(r["verdict"] != "ok" for r in found)
        worse = int((gain < 0).sum())
        summary_rows.append([task, f"{np.median(gain):+.2f}", f"{gain.min():+.2f}", f"{np.median(over):+.2f}",
                             f"{over.min():+.2f}", f"{worse} of {len(found)}",
                             "-" if not untouched else f"{np.median(untouched):+.2f} / {min(untouched):+.2f}",
                             f"{doubtful} of {len(found)}",
                             f"{np.median([r['wall'] for r in found]):.0f} / {max(r['wall'] for r in found):.0f}"])
    summary = {"title": "Layer separation, held-out corpus: summary per task (targets: median gain >= +5 dB over the "
                        "input and >= +1 dB over the best baseline, worst >= the input)",
               "header": ["task", "median ours - input dB", "worst", "median ours - baseline dB", "worst",
                          "bursts made worse", "untouched pixels median / worst dB", "doubtful verdicts",
                          "wall s median / max"],
               "rows": summary_rows, "notes": ["from the per-burst table below"]}
    clean_rows = []
    for task in TASK_NAMES:
        for i in (CLEAN_CHECK[:1] if quick else CLEAN_CHECK):
            r = evaluate_clean(task, i, device, quick)
            clean_rows.append([task, str(i), f"{r['wall']:.1f}", f"{r['ours']:.2f}", f"{r['input']:.2f}",
                               f"{r['ours'] - r['input']:+.2f}", r["verdict"],
                               "; ".join(r["reasons"]) if r["reasons"] else "-"])
    clean = {"title": "Layer separation on held-out bursts without any interference (goal: scene >= input - 0.5 dB, "
                      "verdict ok)",
             "header": ["task", "burst", "wall s", "ours dB", "input dB", "ours - input", "verdict", "reasons"],
             "rows": clean_rows,
             "notes": ["the held-out burst made without its interference (same scene, motion, noise); PSNR against "
                       "the noiseless scene, H/16 border excluded"]}
    camera = camera_table(device, quick)
    if quick:
        for table in (summary, per_burst, clean, camera):
            table["notes"].append("--quick: 100 steps per fit and fewer bursts; not the reported figures")
    return [summary, per_burst, clean, camera]


def camera_table(device: str, quick: bool) -> dict:
    """Does the camera's motion follow the scene, not an object moving by itself? ``nir.fuse`` (homography, fast
    preset) on the held-out moving-object bursts made without interference: median corner error against the true
    camera motion (the frame -> frame-0 maps), and the verdict."""
    from napari_nir._sample_data import corner_error

    rows, errors = [], []
    moving = [i for i in HELD_OUT if KINDS[(i // 2) % len(KINDS)] == "moving"]
    for task in TASK_NAMES[:1] if quick else TASK_NAMES:
        for i in moving[:1] if quick else moving:
            b = make_burst(task, i, with_interference=False)
            t0 = time.perf_counter()
            fit = nir.fuse(b.frames, "homography", device=device, seed=0, steps=100 if quick else None)
            wall = time.perf_counter() - t0
            truth = np.stack([np.linalg.inv(b.homographies[0]) @ m for m in b.homographies])
            est = np.stack([fit.frame_to_frame(t, 0) for t in range(len(b.frames))])
            error = float(np.median(corner_error(est, truth, b.frames.shape[1:3])))
            errors.append(error)
            verdict = fit.diagnostics().verdict
            rows.append([f"{task} #{i}", _describe(b.info), f"{wall:.1f}", f"{error:.2f}", verdict,
                         "yes" if error > 1.0 and verdict == "ok" else "no"])
    off = sum(e > 1.0 for e in errors)
    silent = sum(r[5] == "yes" for r in rows)
    return {"title": "Camera motion under an object moving by itself: fuse on the held-out moving-object bursts "
                     f"without interference, device {device}",
            "header": ["burst", "size, colour, content, camera", "wall s", "median corner error px", "verdict",
                       "silently wrong (> 1 px, ok)"],
            "rows": rows,
            "notes": [f"{off} of {len(errors)} more than 1 px off the true camera motion, {silent} of them with the "
                      "verdict ok; the object covers a tenth of the frame (issue 13: the start and the warm-up must "
                      "follow the scene)"]}
