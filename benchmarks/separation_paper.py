"""Side by side with the paper: our fast preset on the NIR paper's own separation bursts, next to the official
code's outputs (../shared/data/nir_official, read in place; see its README for frame order and sizes).

The official outputs are what the paper's method produced (3000-5000 steps on a GPU), not ground truth: the PSNR
and SSIM between our scene and theirs is a similarity. For reference each row also gives the same similarity for
the input itself: a scene closer to the official one than the input is moved the same way the paper's did.

Frame order: the official reflection notebook sorted file names as strings, so its frame k is
``10, 11, 12, 13, 9.jpg``[k]; the others follow the natural order. Sizes: the official reflection frames were
resized to 576 x 848 and the fence's to 960 x 544 (W x H); our scene (rendered at the input's full size) is resized
to theirs, anti-aliased, before comparing.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

import napari_nir as nir

from .fusion import psnr
from .separation import DATA, ssim, write_strip

OFFICIAL = DATA / "nir_official"
WORKING_SIZE = 512  # the paper's bursts are fitted at most this long side (working_size), rendered at full size
# name: (folder, task, official scene video or None, official frame k -> our frame index)
BURSTS = {
    "reflection": ("reflection", "reflection", "reflection_scene.mp4", (1, 2, 3, 4, 0)),
    "fence": ("fence", "fence", "fence_scene.mp4", None),
    "rain": ("rain", "rain", "rain_scene.mp4", None),
    "moire": ("moire", "moire", None, None),
    "ranbow_1": ("ranbow_1", "moire", "ranbow_1_moire_scene.mp4", None),
    "ranbow_2": ("ranbow_2", "moire", "ranbow_2_moire_scene.mp4", None),
}


def _natural(path: Path):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def read_burst(folder: str) -> np.ndarray:
    """(5, H, W, 3) float32 in [0, 1], frames in natural order (9, 10, ..., 13)."""
    import imageio.v3 as iio

    files = sorted((p for p in (OFFICIAL / folder).iterdir() if p.suffix.lower() in (".jpg", ".png")), key=_natural)
    return np.stack([iio.imread(p)[..., :3] for p in files]).astype(np.float32) / 255


def read_official(video: str, order) -> np.ndarray:
    """(5, H, W, 3) float32 official scene frames, reordered to our frame order."""
    import imageio.v3 as iio

    frames = iio.imread(OFFICIAL / "official" / video, plugin="pyav").astype(np.float32) / 255
    if order is None:
        return frames
    out = np.empty_like(frames)
    for k, ours in enumerate(order):
        out[ours] = frames[k]
    return out


def _resized(x: np.ndarray, shape) -> np.ndarray:
    from skimage.transform import resize

    if x.shape[1:3] == tuple(shape):
        return x
    return np.stack([resize(f, shape, anti_aliasing=True) for f in x]).astype(np.float32)


def run(quick: bool, device: str, image_dir: Path | None = None) -> list[dict]:
    if not OFFICIAL.exists():
        return []
    rows = []
    names = ("ranbow_1",) if quick else tuple(BURSTS)
    for name in names:
        folder, task, video, order = BURSTS[name]
        frames = read_burst(folder)
        t0 = time.perf_counter()
        sep = nir.separate(frames, task, preset="fast", device=device, seed=0, working_size=WORKING_SIZE,
                           steps=100 if quick else None)
        wall = time.perf_counter() - t0
        scene = sep.layers(dtype="float32")["scene"]
        found = sep.diagnostics()
        middle = len(frames) // 2
        image = None
        if video is not None:
            official = read_official(video, order)
            ours = _resized(scene, official.shape[1:3])
            given = _resized(frames, official.shape[1:3])
            ours = np.clip(ours, 0, 1)  # compared as the images they are, like the official 8-bit video
            similarity = [f"{psnr(ours, official):.2f} / {ssim(ours, official):.3f}",
                          f"{psnr(given, official):.2f} / {ssim(given, official):.3f}"]
            panels = [given[middle], ours[middle], official[middle]]
        else:
            similarity = ["no official output", "-"]
            panels = [frames[middle], scene[middle]]
        if image_dir is not None:
            image = image_dir / f"paper_{name}.png"
            write_strip(panels, image)
        rows.append([name, task, "x".join(map(str, frames.shape)), f"{wall:.1f}"] + similarity
                    + [found.verdict, "-" if image is None else f"docs/images/{image.name}"])
    notes = [f"fast preset, seed 0, fitted at working_size {WORKING_SIZE} and rendered at the input's size; official: "
             "the official notebooks' outputs (paper hyper-parameters, 3000-5000 GPU steps), mp4 (lossy)",
             "a similarity, not a ground truth: PSNR dB / SSIM between our scene (resized to the official video's "
             "size) and the official scene, pooled over the 5 frames; 'input vs official' is the same for the input",
             "images: the middle frame, input | ours | official (moire: input | ours)"]
    if quick:
        notes.append("--quick: 100 steps, ranbow_1 only")
    return [{"title": f"Side by side with the paper: its bursts, our scene against the official scene, device {device}",
             "header": ["burst", "task", "frames", "wall s", "ours vs official PSNR / SSIM",
                        "input vs official PSNR / SSIM", "verdict", "image (input | ours | official)"],
             "rows": rows, "notes": notes}]
