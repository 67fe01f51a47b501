"""Drift correction side by side: napari-nir's constrained motions against pystackreg and phase correlation.

Same run, same generated stacks: two-channel microscopy time series from images shipped with scikit-image
(``_sample_data.microscopy_drift_stack``: Poisson-Gaussian noise, a random-walk drift of up to 20 px and a
rotation of up to 2 degrees), registered on channel 0. Every method is timed alone (no other torch process).

Registration error: for pairs of frames (t, s), the points of a 9 x 9 grid over frame t mapped into frame s by
the method's transforms and by the true ones; RMS of the distances in pixels (all pairs up to 60 frames, else
4000 pairs drawn with a fixed seed). The gauge (which common frame a method maps to) cancels in t -> s.

pystackreg (the TurboReg/StackReg port) is a benchmark extra (``pip install pystackreg``); without it its rows
say "not installed". Phase correlation: scikit-image's ``phase_cross_correlation`` with upsample_factor=100,
every frame against frame 0 (translation only).
"""
from __future__ import annotations

import time

import numpy as np

import napari_nir as nir
from napari_nir._sample_data import microscopy_drift_stack

# held out: the drift defaults were chosen on retina (seed 10) and hubble_deep_field (seed 11) stacks
# (benchmarks/DECISIONS.md, "drift correction"); these two images and seeds were not looked at before
IMAGES = ("immunohistochemistry", "cell")  # a stained tissue section and a phase-contrast cell image


def pair_error(estimate: np.ndarray, truth: np.ndarray, shape, max_pairs: int = 4000, seed: int = 0) -> float:
    """RMS (px) of frame t -> frame s point maps, estimate against truth; both (T, 3, 3) frame -> common."""
    n = len(truth)
    h, w = shape
    cc, rr = np.meshgrid(np.linspace(0, w - 1, 9), np.linspace(0, h - 1, 9))
    points = np.stack([cc.ravel(), rr.ravel(), np.ones(cc.size)])
    pairs = np.array([(t, s) for t in range(n) for s in range(n) if t != s])
    if len(pairs) > max_pairs:
        pairs = pairs[np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)]
    inv_e, inv_g = np.linalg.inv(estimate), np.linalg.inv(truth)
    a = np.einsum("pij,pjk,kn->pin", inv_e[pairs[:, 1]], estimate[pairs[:, 0]], points)
    b = np.einsum("pij,pjk,kn->pin", inv_g[pairs[:, 1]], truth[pairs[:, 0]], points)
    d = a[:, :2] / a[:, 2:3] - b[:, :2] / b[:, 2:3]
    return float(np.sqrt(np.mean(np.sum(d ** 2, axis=1))))


def _nir(stack, motion: str, device: str):
    start = time.perf_counter()
    fit = nir.fuse(stack, motion, axes="TCYX", register_on=0, device=device, preview_every=0)
    seconds = time.perf_counter() - start
    return fit.transforms(), seconds


def _pystackreg(stack, kind: str, reference: str):
    from pystackreg import StackReg

    channel = stack[:, 0].astype(np.float64)
    start = time.perf_counter()
    tmats = StackReg(getattr(StackReg, kind)).register_stack(channel, reference=reference,
                                                             suppress_axis_warning=True)
    seconds = time.perf_counter() - start
    return np.linalg.inv(tmats), seconds  # their tmats: reference pixel -> frame pixel


def _phase_correlation(stack):
    from skimage.registration import phase_cross_correlation

    channel = stack[:, 0].astype(np.float64)
    start = time.perf_counter()
    out = np.repeat(np.eye(3)[None], len(channel), 0)
    for t in range(1, len(channel)):
        shift, _, _ = phase_cross_correlation(channel[0], channel[t], upsample_factor=100)
        out[t, 0, 2], out[t, 1, 2] = shift[1], shift[0]  # moving pixel + shift -> reference pixel
    return out, time.perf_counter() - start


def _have_pystackreg() -> bool:
    try:
        import pystackreg  # noqa: F401
    except ImportError:
        return False
    return True


def methods(device: str):
    """(name, transformation type, function(stack) -> (T, 3, 3) frame -> common, seconds)."""
    out = [(f"napari-nir {m}", m, lambda s, m=m: _nir(s, m, device)) for m in ("translation", "rigid", "affine")]
    for kind, label in (("TRANSLATION", "translation"), ("RIGID_BODY", "rigid"), ("AFFINE", "affine")):
        for reference in ("mean", "previous"):
            out.append((f"pystackreg {label}, reference {reference}", label,
                        lambda s, k=kind, r=reference: _pystackreg(s, k, r)))
    out.append(("phase correlation (upsample 100)", "translation", _phase_correlation))
    return out


SIZES = {True: [(20, 256)], False: [(50, 512), (200, 512)]}  # quick / full: (frames, side)


def side_by_side(quick: bool, device: str) -> list[dict]:
    sizes = SIZES[quick]
    tables = []
    have = _have_pystackreg()
    for frames, size in sizes:
        stacks = [microscopy_drift_stack(frames, (size, size), image=image, seed=k)
                  for k, image in enumerate(IMAGES)]
        rows = []
        for name, kind, run in methods(device):
            if name.startswith("pystackreg") and not have:
                rows.append([name, kind, "not installed", "", ""])
                continue
            errors, times = [], []
            for stack in stacks:
                estimate, seconds = run(stack.frames)
                errors.append(pair_error(estimate, stack.homographies, (size, size)))
                times.append(seconds)
                print(f"  {frames} x {size}^2 {name}: {errors[-1]:.4f} px, {seconds:.1f} s", flush=True)
            rows.append([name, kind, " / ".join(f"{e:.3f}" for e in errors), f"{max(errors):.3f}",
                         " / ".join(f"{t:.1f}" for t in times)])
        tables.append({
            "title": f"Drift correction: {frames} x {size}x{size} two-channel uint16 stacks, drift <= 20 px, "
                     f"rotation <= 2 deg, Poisson-Gaussian noise, device {device}",
            "header": ["method", "motion", f"RMS error px ({' / '.join(IMAGES)})", "worst", "seconds (each stack)"],
            "rows": rows,
            "notes": ["napari-nir: fast preset defaults, registered on channel 0 (register_on=0), time of the whole "
                      "fuse() call (phase-correlation start, fit, polish, final PSNR); pystackreg and phase correlation: time of the "
                      "registration call on channel 0 as float64.",
                      "error: RMS over frame pairs of a 9 x 9 point grid mapped t -> s, against the true motion "
                      "(translation models cannot follow the rotation: their floor is the rotation itself)."],
        })
    return tables


LONG_CHILD = r"""
import json, sys, time
import numpy as np
import napari_nir as nir
from napari_nir._sample_data import microscopy_drift_stack
from napari_nir.core.burst import working_shape
from napari_nir.core.memory import estimate_fit_bytes
from napari_nir.core.presets import preset_config

frames, size, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
stack = microscopy_drift_stack(frames, (size, size), image="cell", seed=2).frames[:, 0]  # (T, Y, X) uint16


def rss_mb():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) / 1024


with open("/proc/self/clear_refs", "w") as fh:  # the peak (VmHWM) from here on: not the stack's generation
    fh.write("5")
before = rss_mb()
start = time.perf_counter()
fit = nir.fuse(stack, "rigid", device=device, preview_every=0)
fit_s = time.perf_counter() - start
start = time.perf_counter()
registered = fit.registered()
registered_s = time.perf_counter() - start
config = preset_config("rigid", "fast")
estimate = estimate_fit_bytes(working_shape(stack.shape, config.runtime.working_size), config,
                              input_shape=stack.shape) / 2**20
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) / 1024
print(json.dumps({"fit_s": fit_s, "registered_s": registered_s, "peak_mb": hwm, "before_mb": before,
                  "estimate_mb": estimate, "input_mb": stack.nbytes / 2**20}))
"""


LONG_SIZES = {True: ((10, 20), 128), False: ((50, 200, 500), 512)}  # frames, side


def long_stacks(quick: bool, device: str) -> dict:
    """Time and peak memory of a rigid drift correction against the number of frames (512^2 uint16, one
    channel), each size in a fresh process so that its peak RSS (VmHWM) is its own."""
    import json
    import subprocess
    import sys

    (sizes, size) = LONG_SIZES[quick]
    rows = []
    for frames in sizes:
        out = subprocess.run([sys.executable, "-c", LONG_CHILD, str(frames), str(size), device],
                             capture_output=True, text=True, check=True)
        info = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  long stack {frames} x {size}^2: {info}", flush=True)
        rows.append([frames, f"{info['input_mb']:.0f}", f"{info['fit_s']:.1f}", f"{info['registered_s']:.1f}",
                     f"{info['peak_mb'] - info['before_mb']:.0f}", f"{info['estimate_mb']:.0f}",
                     f"{info['peak_mb']:.0f}"])
    return {"title": f"Long stacks: rigid drift correction of {size}x{size} uint16 frames (cell, one channel), "
                     f"fast preset, device {device}",
            "header": ["frames", "input MB", "fuse s", "registered() s", "fuse + registered peak RSS above the "
                       "input, MB", "fit memory estimate MB", "process peak RSS MB"],
            "rows": rows,
            "notes": ["each size in a fresh process; peak RSS is VmHWM, reset (/proc/self/clear_refs) once the stack "
                      "was generated; 'above the input' subtracts the RSS at that moment (the caller's array); the estimate is core.memory.estimate_fit_bytes, "
                      "which the fit checks before it starts (it counts the polish's chunk; it does not count the "
                      "registered output, a copy of the input in its dtype)."]}


def run(quick: bool, device: str) -> list[dict]:
    return side_by_side(quick, device) + [long_stacks(quick, device)]
