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

SOURCE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "brick")


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
