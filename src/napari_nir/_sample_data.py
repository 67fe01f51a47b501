"""Generated bursts with ground truth, from real photographs shipped with scikit-image.

Used by the tests, the benchmarks, the ``napari-nir demo`` command and napari's File > Open Sample.
Nothing is downloaded: every source image is inside the scikit-image wheel.

Conventions: pixel coordinates are (col, row) with pixel centres at integers. A ground-truth homography
``G[t]`` maps frame-t pixel (col, row, 1) to "world" pixels, a frame-sized pixel grid centred on the source
photograph; the frame-to-frame map t -> s is ``inv(G[s]) @ G[t]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._layers import SAMPLE_KEY

SOURCE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "brick", "cell",
                 "retina")


@dataclass
class SampleBurst:
    """A generated burst and its ground truth.

    frames: (T, H, W[, C]) float32 in [0, 1] (noise added when requested, not clipped)
    clean: (T, H, W[, C]) float32, the same frames without noise
    homographies: (T, 3, 3) float64, frame-t pixel (col, row, 1) -> world pixel
    world: (H, W[, C]) float32, the noiseless world view (frame-sized, identity homography)
    """

    frames: np.ndarray
    clean: np.ndarray
    homographies: np.ndarray
    world: np.ndarray
    name: str
    extra: dict = field(default_factory=dict)


def source_image(name: str = "astronaut") -> np.ndarray:
    """A real photograph from scikit-image as float64 in [0, 1]: (H, W, 3) or (H, W)."""
    from skimage import data, img_as_float

    if name not in SOURCE_IMAGES:
        raise ValueError(f"unknown sample image {name!r}; choose one of {', '.join(SOURCE_IMAGES)}")
    image = img_as_float(getattr(data, name)())
    return image[..., :3] if image.ndim == 3 else image


def random_homographies(
    n_frames: int,
    shape: tuple[int, int],
    *,
    translation: float = 0.10,
    rotation_deg: float = 5.0,
    scale: float = 0.05,
    perspective: float = 0.05,
    rng: np.random.Generator,
) -> np.ndarray:
    """(T, 3, 3) random homographies about the frame centre, frame pixel -> world pixel.

    translation: max shift as a fraction of the frame size; rotation_deg: max rotation in degrees;
    scale: max relative zoom; perspective: max foreshortening across the frame (fraction).
    """
    h, w = shape
    centre = np.array([[1, 0, (w - 1) / 2], [0, 1, (h - 1) / 2], [0, 0, 1.0]])
    half = max(h, w) / 2
    out = np.empty((n_frames, 3, 3))
    for t in range(n_frames):
        tx, ty = rng.uniform(-translation, translation, 2) * (w, h)
        angle = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
        zoom = 1 + rng.uniform(-scale, scale)
        px, py = rng.uniform(-perspective, perspective, 2) / half
        rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        persp = np.array([[1, 0, 0], [0, 1, 0], [px, py, 1.0]])
        shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])
        m = centre @ shift @ rot @ np.diag([zoom, zoom, 1]) @ persp @ np.linalg.inv(centre)
        out[t] = m / m[2, 2]
    return out


def render_view(
    source: np.ndarray, homography: np.ndarray, shape: tuple[int, int], *, margin: float = 1.4, supersample: int = 2
) -> np.ndarray:
    """Render one frame of ``shape`` (H, W) seeing ``source`` through ``homography`` (frame px -> world px).

    World pixels are a frame-sized grid centred on the source photo, which is ``margin`` times larger than the
    frame (so moving views stay inside it). Rendered at ``supersample``x then box-averaged: an anti-aliased,
    band-limited frame whose geometry is exactly ``homography``. Returns float32 (H, W[, C]).
    """
    from skimage.transform import ProjectiveTransform, warp

    h, w = shape
    sh, sw = source.shape[:2]
    zoom = min(sh / h, sw / w) / margin  # source pixels per world pixel
    to_source = np.array(
        [[zoom, 0, (sw - 1) / 2 - zoom * (w - 1) / 2], [0, zoom, (sh - 1) / 2 - zoom * (h - 1) / 2], [0, 0, 1.0]]
    )
    k = supersample
    # hi-res pixel C has its centre at frame coordinate (C + 0.5) / k - 0.5
    from_hires = np.array([[1 / k, 0, 0.5 / k - 0.5], [0, 1 / k, 0.5 / k - 0.5], [0, 0, 1.0]])
    matrix = to_source @ homography @ from_hires
    hires = warp(source, ProjectiveTransform(matrix=matrix), output_shape=(h * k, w * k), order=3, mode="reflect")
    frame = hires.reshape(h, k, w, k, *source.shape[2:]).mean(axis=(1, 3))
    return np.clip(frame, 0, 1).astype(np.float32)


def homography_burst(
    n_frames: int = 9,
    shape: tuple[int, int] = (256, 256),
    *,
    image: str = "astronaut",
    grey: bool = False,
    noise: float = 0.0,
    seed: int = 0,
    translation: float = 0.10,
    rotation_deg: float = 5.0,
    scale: float = 0.05,
    perspective: float = 0.05,
) -> SampleBurst:
    """A burst of a real photograph seen through known random homographies.

    noise: Gaussian noise sigma as a fraction of the [0, 1] range (added to ``frames``, not clipped).
    """
    rng = np.random.default_rng(seed)
    source = source_image(image)
    if grey and source.ndim == 3:
        source = source @ np.array([0.2125, 0.7154, 0.0721])
    homs = random_homographies(
        n_frames, shape, translation=translation, rotation_deg=rotation_deg, scale=scale,
        perspective=perspective, rng=rng,
    )
    clean = np.stack([render_view(source, m, shape) for m in homs])
    world = render_view(source, np.eye(3), shape)
    frames = clean + rng.normal(0, noise, clean.shape).astype(np.float32) if noise > 0 else clean.copy()
    return SampleBurst(frames=frames, clean=clean, homographies=homs, world=world, name=f"{image} homography burst",
                       extra={"noise": noise, "seed": seed})


def drift_burst(n_frames: int = 12, shape: tuple[int, int] = (128, 128), *, image: str = "cell",
                step_px: float = 1.5, rotation_deg: float = 0.3, noise: float = 0.02, seed: int = 0) -> SampleBurst:
    """A grey time series drifting like a microscope stage: a random walk of shifts (``step_px`` pixels per frame
    on average, each axis) with a small rotation wobble, plus Gaussian ``noise``. Ground truth as
    ``homography_burst`` (frame pixel -> world pixel); the motion is rigid."""
    rng = np.random.default_rng(seed)
    source = source_image(image)
    if source.ndim == 3:
        source = source @ np.array([0.2125, 0.7154, 0.0721])
    h, w = shape
    centre = np.array([[1, 0, (w - 1) / 2], [0, 1, (h - 1) / 2], [0, 0, 1.0]])
    shifts = np.cumsum(rng.normal(0, step_px, (n_frames, 2)), 0)
    shifts -= shifts.mean(0)
    homs = np.empty((n_frames, 3, 3))
    for t, (dx, dy) in enumerate(shifts):
        angle = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
        rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        homs[t] = centre @ np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]]) @ rot @ np.linalg.inv(centre)
    clean = np.stack([render_view(source, m, shape, margin=1.2) for m in homs])
    world = render_view(source, np.eye(3), shape, margin=1.2)
    frames = clean + rng.normal(0, noise, clean.shape).astype(np.float32) if noise > 0 else clean.copy()
    return SampleBurst(frames=frames, clean=clean, homographies=homs, world=world, name=f"{image} drift burst",
                       extra={"noise": noise, "seed": seed})


def drift_homographies(n_frames: int, shape: tuple[int, int], *, max_shift_px: float, max_rotation_deg: float,
                       rng: np.random.Generator) -> np.ndarray:
    """(T, 3, 3) frame pixel -> world pixel rigid motions drifting like a microscope stage: a random walk of shifts
    scaled so that the largest |shift| over the stack is ``max_shift_px`` (each axis), and a random walk of the
    angle about the frame centre scaled to at most ``max_rotation_deg``; both centred on the stack's mean."""
    h, w = shape
    shifts = np.cumsum(rng.normal(0, 1, (n_frames, 2)), 0)
    shifts -= shifts.mean(0)
    shifts *= max_shift_px / max(np.abs(shifts).max(), 1e-9)
    angles = np.cumsum(rng.normal(0, 1, n_frames))
    angles -= angles.mean()
    angles *= np.deg2rad(max_rotation_deg) / max(np.abs(angles).max(), 1e-9)
    centre = np.array([[1, 0, (w - 1) / 2], [0, 1, (h - 1) / 2], [0, 0, 1.0]])
    out = np.empty((n_frames, 3, 3))
    for t, ((dx, dy), a) in enumerate(zip(shifts, angles)):
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        out[t] = centre @ np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]]) @ rot @ np.linalg.inv(centre)
    return out


MICROSCOPY_IMAGES = ("immunohistochemistry", "cell", "retina", "hubble_deep_field")


def microscopy_channels(image: str = "immunohistochemistry") -> np.ndarray:
    """Two real channels (H, W, 2) float64 in [0, 1] from a microscopy image shipped with scikit-image: colour
    deconvolution (haematoxylin, DAB) for the stained section "immunohistochemistry"; the green channel and its
    local contrast for the others (fundus "retina", "hubble_deep_field"), the image and its inverse for "cell"."""
    from skimage import data, img_as_float
    from skimage.color import rgb2hed
    from skimage.filters import gaussian

    if image not in MICROSCOPY_IMAGES:
        raise ValueError(f"unknown microscopy image {image!r}; choose one of {', '.join(MICROSCOPY_IMAGES)}")
    rgb = img_as_float(getattr(data, image)())
    if image == "immunohistochemistry":
        hed = rgb2hed(rgb)
        channels = [hed[..., 0], hed[..., 2]]
    elif rgb.ndim == 2:
        channels = [rgb, gaussian(rgb, 8) - rgb]
    else:
        green = rgb[..., 1]
        channels = [green, np.abs(green - gaussian(green, 4))]
    out = []
    for c in channels:
        lo, hi = np.percentile(c, [0.5, 99.8])
        out.append(np.clip((c - lo) / max(hi - lo, 1e-9), 0, 1))
    return np.stack(out, -1)


def microscopy_drift_stack(n_frames: int = 30, shape: tuple[int, int] = (256, 256), *,
                           image: str = "immunohistochemistry", max_shift_px: float = 20.0,
                           max_rotation_deg: float = 2.0, photons: float = 300.0, read_noise: float = 2.0,
                           seed: int = 0) -> SampleBurst:
    """A drifting two-channel fluorescence-like time series with known motion: frames (T, 2, H, W) uint16
    (channels-first, as microscopy files hold them), a camera offset of 100 and a gain of 8 counts per photon.

    Noise is Poisson-Gaussian: Poisson photon counts at ``photons`` for the brightest pixel (plus 5 background
    photons), and Gaussian read noise of ``read_noise`` photons. ``clean``: (T, 2, H, W) float32 noise-free
    photon rates; ``homographies``: (T, 3, 3) frame pixel -> world pixel (rigid: ``drift_homographies``)."""
    rng = np.random.default_rng(seed)
    source = microscopy_channels(image)
    homs = drift_homographies(n_frames, shape, max_shift_px=max_shift_px, max_rotation_deg=max_rotation_deg, rng=rng)
    margin = 1.0 + 2.5 * (max_shift_px + np.deg2rad(max_rotation_deg) * max(shape)) / min(shape)
    clean = np.stack([render_view(source, m, shape, margin=margin) for m in homs])  # (T, H, W, 2) in [0, 1]
    rates = clean * photons + 5.0
    counts = rng.poisson(rates).astype(np.float64) + rng.normal(0, read_noise, rates.shape)
    frames = np.clip(np.rint(counts * 8 + 100), 0, 65535).astype(np.uint16)
    world = render_view(source, np.eye(3), shape, margin=margin)
    return SampleBurst(frames=np.moveaxis(frames, -1, 1), clean=np.moveaxis(rates, -1, 1).astype(np.float32),
                       homographies=homs, world=np.moveaxis(world, -1, 0), name=f"{image} microscopy drift stack",
                       extra={"photons": photons, "read_noise": read_noise, "seed": seed, "axes": "TCYX"})


def corner_error(estimated: np.ndarray, truth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Frame-to-frame corner errors in pixels between two sets of (T, 3, 3) frame -> common-space homographies.

    For every ordered pair t != s compares where the four corners of frame t land in frame s under
    ``inv(E[s]) @ E[t]`` and ``inv(G[s]) @ G[t]``. Returns (T*(T-1),) mean corner distances in frame-s pixels.
    """
    h, w = shape
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [w - 1, h - 1, 1], [0, h - 1, 1]], dtype=float).T
    errors = []
    n = len(truth)
    for t in range(n):
        for s in range(n):
            if s == t:
                continue
            pe = np.linalg.inv(estimated[s]) @ estimated[t] @ corners
            pt = np.linalg.inv(truth[s]) @ truth[t] @ corners
            d = pe[:2] / pe[2] - pt[:2] / pt[2]
            errors.append(np.sqrt((d**2).sum(0)).mean())
    return np.asarray(errors)


# -- flow samples ------------------------------------------------------------------------------------
def _smooth_displacements(n_frames: int, shape: tuple[int, int], max_px: float, rng: np.random.Generator):
    """Random smooth displacement fields as a callable (t, cols, rows) -> (d_col, d_row) in pixels.

    Each frame's field is a sum of 4 low-frequency plane waves (at most ~1.5 cycles across the frame),
    scaled so that the largest displacement over the burst is ``max_px``.
    """
    h, w = shape
    waves = 4
    freq = rng.uniform(-1.5, 1.5, (n_frames, waves, 2)) / np.array([w, h])
    phase = rng.uniform(0, 2 * np.pi, (n_frames, waves))
    amp = rng.normal(0, 1, (n_frames, waves, 2))

    def raw(t, cols, rows):
        arg = 2 * np.pi * (freq[t, :, 0, None] * cols.ravel() + freq[t, :, 1, None] * rows.ravel()) + phase[t, :, None]
        d = np.einsum("kc,kn->cn", amp[t], np.sin(arg))
        return d[0].reshape(cols.shape), d[1].reshape(cols.shape)

    rr, cc = np.mgrid[0:h:4, 0:w:4].astype(float)
    peak = max(np.sqrt(sum(v**2 for v in raw(t, cc, rr))).max() for t in range(n_frames))
    k = max_px / peak
    return lambda t, cols, rows: tuple(k * v for v in raw(t, cols, rows))


def _render_warped(source, shape, to_world, margin=1.4, supersample=2):
    """Render a frame whose pixel (col, row) sees world pixel ``to_world(cols, rows)``; anti-aliased."""
    from skimage.transform import warp

    h, w = shape
    sh, sw = source.shape[:2]
    zoom = min(sh / h, sw / w) / margin
    k = supersample

    def inverse_map(coords):  # hi-res output (col, row) -> source (col, row)
        cols = (coords[:, 0] + 0.5) / k - 0.5
        rows = (coords[:, 1] + 0.5) / k - 0.5
        wc, wr = to_world(cols, rows)
        return np.stack([zoom * (wc - (w - 1) / 2) + (sw - 1) / 2, zoom * (wr - (h - 1) / 2) + (sh - 1) / 2], 1)

    hires = warp(source, inverse_map, output_shape=(h * k, w * k), order=3, mode="reflect")
    return np.clip(hires.reshape(h, k, w, k, *source.shape[2:]).mean(axis=(1, 3)), 0, 1).astype(np.float32)


def flow_burst(n_frames: int = 7, shape: tuple[int, int] = (256, 256), *, image: str = "astronaut",
               max_displacement: float = 8.0, noise: float = 0.0, seed: int = 0) -> SampleBurst:
    """A real photograph under smooth random non-rigid warps (no global motion beyond them).

    Ground truth in ``extra``: "displacement" (T, H, W, 2) frame -> world (d_row, d_col) pixels, and
    ``flow_between(t, s)`` in ``extra["flow_between"]``: (H, W, 2) true optical flow t -> s.
    """
    rng = np.random.default_rng(seed)
    source = source_image(image)
    field = _smooth_displacements(n_frames, shape, max_displacement, rng)
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    clean, disp = [], []
    for t in range(n_frames):
        clean.append(_render_warped(source, shape,
                                    lambda c, r, t=t: tuple(a + b for a, b in zip((c, r), field(t, c, r)))))
        dc, dr = field(t, cols, rows)
        disp.append(np.stack([dr, dc], -1))
    clean = np.stack(clean)
    frames = clean + rng.normal(0, noise, clean.shape).astype(np.float32) if noise > 0 else clean.copy()

    def flow_between(t: int, s: int, iterations: int = 30) -> np.ndarray:
        """True flow t -> s: solve x_s + D_s(x_s) = x + D_t(x) by fixed-point iteration."""
        dc, dr = field(t, cols, rows)
        pc, pr = cols + dc, rows + dr
        xc, xr = pc.copy(), pr.copy()
        for _ in range(iterations):
            sc, sr = field(s, xc, xr)
            xc, xr = pc - sc, pr - sr
        return np.stack([xr - rows, xc - cols], -1).astype(np.float32)

    world = _render_warped(source, shape, lambda c, r: (c, r))
    return SampleBurst(frames=frames, clean=clean, homographies=np.repeat(np.eye(3)[None], n_frames, 0),
                       world=world, name=f"{image} non-rigid burst",
                       extra={"displacement": np.stack(disp).astype(np.float32), "flow_between": flow_between,
                              "noise": noise, "seed": seed})


def occlusion_burst(n_frames: int = 7, shape: tuple[int, int] = (128, 128), *, background: str = "astronaut",
                    foreground: str = "coffee", travel: float = 0.6, radius: float = 0.15,
                    seed: int = 0) -> SampleBurst:
    """A two-layer scene: a textured disk moving across a static background (occlusion and disocclusion).

    ``travel``: the disk's path length as a fraction of the frame width; ``radius`` as a fraction of the
    frame height. Ground truth in ``extra``: "alpha" (T, H, W) the disk's coverage per frame, "background"
    (H, W, C) the full background, and "disoccluded" (T, H, W) bool: background pixels of frame t that the
    disk hides in at least one other frame (what only an occlusion-aware model can reconstruct from the
    other frames' point of view).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    bg = _render_warped(source_image(background), shape, lambda c, r: (c, r))
    fg_src = source_image(foreground)
    fg = _render_warped(fg_src, shape, lambda c, r: (c, r), margin=2.5)
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    start = np.array([0.5 - travel / 2, 0.5]) * (w, h) + rng.uniform(-2, 2, 2)
    frames, alphas = [], []
    r_px = radius * h
    for t in range(n_frames):
        centre = start + np.array([travel * w * t / max(n_frames - 1, 1), 0])
        # anti-aliased disk edge (1 px ramp); the disk's texture moves with it
        dist = np.hypot(cols - centre[0], rows - centre[1])
        alpha = np.clip(r_px + 0.5 - dist, 0, 1).astype(np.float32)
        shift_c, shift_r = int(round(centre[0] - w / 2)), int(round(centre[1] - h / 2))
        tex = np.roll(fg, (shift_r, shift_c), axis=(0, 1))
        a = alpha[..., None] if bg.ndim == 3 else alpha
        frames.append((1 - a) * bg + a * tex)
        alphas.append(alpha)
    frames = np.stack(frames).astype(np.float32)
    alphas = np.stack(alphas)
    covered = alphas > 0.5
    disoccluded = np.stack([(~covered[t]) & np.delete(covered, t, 0).any(0) for t in range(n_frames)])
    return SampleBurst(frames=frames, clean=frames.copy(), homographies=np.repeat(np.eye(3)[None], n_frames, 0),
                       world=bg, name=f"{background} with a moving {foreground} disk",
                       extra={"alpha": alphas, "background": bg, "disoccluded": disoccluded, "seed": seed})


def endpoint_error(estimated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(H, W) end-point error in pixels between two (H, W, 2) flow fields."""
    return np.sqrt(((np.asarray(estimated, np.float64) - truth) ** 2).sum(-1))


# -- layer-separation samples ------------------------------------------------------------------------
def _views(source, homs, shape):
    return np.stack([render_view(source, m, shape) for m in homs])


def _fence_alpha(homography: np.ndarray, shape, period: float = 18.0, width: float = 3.0, supersample: int = 3):
    """Anti-aliased alpha (H, W) of a diagonal chain-link mesh in fence-plane pixels seen through ``homography``."""
    h, w = shape
    k = supersample
    rr, cc = np.mgrid[0:h * k, 0:w * k].astype(float)
    cc, rr = (cc + 0.5) / k - 0.5, (rr + 0.5) / k - 0.5
    p = homography @ np.stack([cc.ravel(), rr.ravel(), np.ones(cc.size)])
    u, v = p[0] / p[2], p[1] / p[2]
    a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
    dist = np.minimum(np.abs((a % period) - period / 2), np.abs((b % period) - period / 2))
    wire = (dist < width / 2).astype(float).reshape(h * k, w * k)
    return wire.reshape(h, k, w, k).mean(axis=(1, 3)).astype(np.float32)


def _rain_layer(shape, rng, streaks: int = 220):
    """One frame of rain (H, W) in [0, 1]: thin slanted streaks of random length and brightness."""
    from skimage.draw import line_aa
    from skimage.filters import gaussian

    h, w = shape
    r = np.zeros(shape)
    angle = np.deg2rad(rng.uniform(70, 80))
    for _ in range(streaks):
        length = rng.uniform(8, 24)
        r0, c0 = rng.uniform(-10, h), rng.uniform(-10, w)
        r1, c1 = r0 + length * np.sin(angle), c0 + length * np.cos(angle)
        rr, cc, val = line_aa(int(r0), int(c0), int(r1), int(c1))
        keep = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        r[rr[keep], cc[keep]] = np.maximum(r[rr[keep], cc[keep]], val[keep] * rng.uniform(0.3, 0.7))
    return np.clip(gaussian(r, 0.5), 0, 1).astype(np.float32)


def separation_burst(task: str, n_frames: int = 5, shape: tuple[int, int] = (256, 256), *, image: str = "astronaut",
                     seed: int = 0) -> SampleBurst:
    """A burst for a layer-separation task with its ground truth, from real photographs.

    reflection: I = 0.7 scene + 0.3 blurred second photo, moving differently (additive);
    fence: a thin diagonal mesh with alpha on a plane nearer the camera (4x the scene's motion);
    rain: (1 - r) scene + r with new streaks every frame;
    moire: scene + a fine screen grating point-sampled through each frame's homography (it aliases
    differently in every frame).
    ``clean`` holds the true scene per frame; ``extra`` the true "interference" and, for fence and rain,
    "alpha" (T, H, W).
    """
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    source = source_image(image)
    scene_h = random_homographies(n_frames, shape, translation=0.03, rotation_deg=2, scale=0.02, perspective=0.02,
                                  rng=rng)
    scene = _views(source, scene_h, shape)
    extra: dict = {"task": task, "seed": seed}
    if task == "reflection":
        second = gaussian(source_image("coffee"), 1.5, channel_axis=-1)
        refl_h = random_homographies(n_frames, shape, translation=0.08, rotation_deg=4, scale=0.04, perspective=0.02,
                                     rng=rng)
        reflection = 0.3 * _views(second, refl_h, shape)
        scene = 0.7 * scene
        frames = scene + reflection
        extra["interference"] = reflection.astype(np.float32)
    elif task == "fence":
        big = random_homographies(n_frames, shape, translation=0.12, rotation_deg=2, scale=0.02, perspective=0.0,
                                  rng=rng)
        alpha = np.stack([_fence_alpha(m, shape) for m in big])
        colour = np.array([0.35, 0.3, 0.25], dtype=np.float32)
        frames = (1 - alpha[..., None]) * scene + alpha[..., None] * colour
        extra["alpha"] = alpha
        extra["interference"] = np.broadcast_to(colour, scene.shape).astype(np.float32)
    elif task == "rain":
        r = np.stack([_rain_layer(shape, rng) for _ in range(n_frames)])
        frames = (1 - r[..., None]) * scene + r[..., None]
        extra["alpha"] = r
        extra["interference"] = np.repeat(r[..., None], 3, -1)
    elif task == "moire":
        h, w = shape
        rows, cols = np.mgrid[0:h, 0:w].astype(float)
        moire = []
        for m in scene_h:
            p = m @ np.stack([cols.ravel(), rows.ravel(), np.ones(cols.size)])
            u, v = (p[0] / p[2]).reshape(shape), (p[1] / p[2]).reshape(shape)
            grating = np.cos(2 * np.pi * 0.46 * u) * np.cos(2 * np.pi * 0.46 * v)  # point-sampled: aliases
            tint = np.array([1.0, 0.6, 0.9])
            moire.append(0.08 * grating[..., None] * tint)
        moire = np.stack(moire).astype(np.float32)
        scene = 0.84 * scene + 0.08
        frames = scene + moire
        extra["interference"] = moire
    else:
        raise ValueError(f"unknown task {task!r}; choose reflection, fence, rain or moire")
    return SampleBurst(frames=frames.astype(np.float32), clean=scene.astype(np.float32), homographies=scene_h,
                       world=render_view(source, np.eye(3), shape), name=f"{image} {task} burst", extra=extra)


def _burst_marker(task: str | None = None, **metadata) -> dict:
    """A sample burst layer's metadata: the sample marker (``_layers.SAMPLE_KEY``) and ``metadata``."""
    return {SAMPLE_KEY: {"role": "burst", "task": task}, **metadata}


def _truth(name: str, **kwargs) -> dict:
    """A ground-truth layer's kwargs: hidden, and marked so that the widgets never preselect it as the burst."""
    return {"name": name, "visible": False, "metadata": {SAMPLE_KEY: {"role": "ground truth"}}, **kwargs}


def make_homography_sample():
    """napari File > Open Sample: a 9-frame RGB astronaut burst (T, 256, 256, 3) float32 in [0, 1] and its world view.

    The ground-truth homographies (frame-t pixel -> world pixel) ride along in the burst layer's metadata.
    """
    sample = homography_burst()
    return [
        (
            sample.frames,
            {
                "name": "astronaut burst",
                "rgb": True,
                "metadata": _burst_marker(napari_nir={"ground_truth_homographies": sample.homographies.tolist()}),
            },
            "image",
        ),
        (sample.world, _truth("astronaut ground truth", rgb=True), "image"),
    ]


def make_drift_sample():
    """napari sample: a 12-frame grey time series (T, 128, 128) drifting like a microscope stage, for the
    translation, rigid, similarity and affine motions; the true homographies ride along in its metadata."""
    sample = drift_burst()
    return [
        (sample.frames, {"name": "drift burst",
                         "metadata": _burst_marker(napari_nir={"ground_truth_homographies":
                                                               sample.homographies.tolist()})},
         "image"),
        (sample.world, _truth("drift ground truth"), "image"),
    ]


def make_microscopy_drift_sample():
    """napari sample: a drifting two-channel microscopy time series (T, C, Y, X) = (30, 2, 256, 256) uint16 with
    Poisson-Gaussian noise, from scikit-image's immunohistochemistry image; the true motion rides along in its
    metadata. "Fuse burst" reads it as T x C x Y x X (its axis labels)."""
    sample = microscopy_drift_stack()
    return [
        (sample.frames, {"name": "microscopy drift stack", "axis_labels": ("t", "c", "y", "x"),
                         "metadata": _burst_marker(napari_nir={"ground_truth_homographies":
                                                               sample.homographies.tolist(), "axes": "TCYX"})},
         "image"),
    ]


def make_flow_sample():
    """napari sample: a 7-frame non-rigid burst (T, 256, 256, 3) and its true frame -> world displacement."""
    sample = flow_burst()
    return [
        (sample.frames, {"name": "non-rigid burst", "rgb": True, "metadata": _burst_marker()}, "image"),
        (sample.extra["displacement"],
         _truth("non-rigid ground truth displacement (d_row, d_col)", rgb=False, channel_axis=3), "image"),
    ]


def make_occlusion_sample():
    """napari sample: a disk moving over a photograph (occlusion), with the true background and coverage."""
    sample = occlusion_burst()
    return [
        (sample.frames, {"name": "occlusion burst", "rgb": True, "metadata": _burst_marker()}, "image"),
        (sample.extra["background"], _truth("occlusion ground truth background", rgb=True), "image"),
        (sample.extra["alpha"], _truth("occlusion ground truth coverage"), "image"),
    ]


def _separation_sample(task: str):
    def make():
        sample = separation_burst(task)
        layers = [
            (sample.frames, {"name": f"{task} burst", "rgb": True, "metadata": _burst_marker(task)}, "image"),
            (sample.clean, _truth(f"{task} ground truth scene", rgb=True), "image"),
            (sample.extra["interference"], _truth(f"{task} ground truth interference", rgb=True), "image"),
        ]
        if "alpha" in sample.extra:
            layers.append((sample.extra["alpha"], _truth(f"{task} ground truth alpha"), "image"))
        return layers

    make.__name__ = f"make_{task}_sample"
    make.__doc__ = f"napari sample: a 5-frame {task} burst (T, 256, 256, 3) with its ground-truth layers (hidden)."
    return make


make_reflection_sample = _separation_sample("reflection")
make_fence_sample = _separation_sample("fence")
make_rain_sample = _separation_sample("rain")
make_moire_sample = _separation_sample("moire")
