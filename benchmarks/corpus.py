"""The layer-separation evaluation corpus: generated bursts with ground truth, split once into a tuning half
and a held-out half.

Every burst is made from real photographs (scikit-image's and the shared data's), so its texture is not ours;
what is generated is the geometry (camera motion, parallax, objects that move by themselves) and the
interference (a second photo's reflection, meshes, rain streaks, screen gratings). Burst ``index`` of a task
is fully determined by ``(task, index)``:

* ``index`` 0..19 per task; **even indices are the tuning half, odd indices the held-out half**
  (``TUNING``, ``HELD_OUT``). Defaults are chosen on the tuning half only; RESULTS.md reports the held-out half.
* the two halves also use **different photographs** (``PHOTOS_TUNING``, ``PHOTOS_HELD_OUT``), for the scene
  and for a reflection's second photo, so the held-out half's textures were never seen while tuning;
* both halves get the same mix of sizes (128^2 .. 512^2, square and not), content kinds (``KINDS``: a plain
  scene, parallax between two depth planes, an object of about a tenth of the frame moving by itself),
  camera motion (small to large), grey and RGB, and noise.

``make_burst(task, index)`` returns a :class:`CorpusBurst`; ``make_burst(task, index, with_interference=False)``
the same scene and motion with no interference at all and sensor noise of at least 1 % (the do-no-harm check).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from napari_nir._sample_data import random_homographies, render_view

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TASK_NAMES = ("reflection", "fence", "rain", "moire")
N_PER_TASK = 20
TUNING = tuple(range(0, N_PER_TASK, 2))
HELD_OUT = tuple(range(1, N_PER_TASK, 2))
N_FRAMES = 5

# scikit-image photographs, plus "shared:" files read in place from ../shared/data (skipped when absent)
PHOTOS_TUNING = ("astronaut", "chelsea", "rocket", "camera", "brick", "immunohistochemistry", "shared:graf")
PHOTOS_HELD_OUT = ("coffee", "motorcycle_left", "retina", "hubble_deep_field", "gravel", "coins",
                   "shared:effendy")
SHARED_PHOTOS = {"graf": "graf/graf1.png", "effendy": "reflection_effendy/noreflection.png"}
KINDS = ("plain", "moving", "parallax", "moving", "plain")
SIZES = ((128, 128), (128, 160), (192, 192), (256, 256), (256, 256), (160, 224), (320, 320), (384, 384),
         (128, 128), (512, 512))
MOTIONS = {  # camera motion ranges for random_homographies
    "small": {"translation": 0.01, "rotation_deg": 1.0, "scale": 0.01, "perspective": 0.01},
    "medium": {"translation": 0.03, "rotation_deg": 2.0, "scale": 0.02, "perspective": 0.02},
    "large": {"translation": 0.06, "rotation_deg": 4.0, "scale": 0.04, "perspective": 0.03},
}


@dataclass
class CorpusBurst:
    """frames: (T, H, W[, C]) float32 input; clean: the true scene per frame, same shape; interference_mask:
    (T, H, W) bool, pixels the interference changes by more than 1/255 (for alpha tasks: alpha > 0.004; for
    additive tasks: every pixel); object_mask: (T, H, W) bool, pixels of the object moving by itself (or None);
    homographies: (T, 3, 3) the camera's, frame pixel -> world pixel (the scene's motion, parallax plane and
    moving object aside); info: how it was made."""

    frames: np.ndarray
    clean: np.ndarray
    interference_mask: np.ndarray
    object_mask: np.ndarray | None
    homographies: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        i = self.info
        return f"{i['task']}#{i['index']:02d}"


@cache
def photo(name: str) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1]: a photograph by name (grey photos are repeated to three channels)."""
    if name.startswith("shared:"):
        import imageio.v3 as iio

        image = iio.imread(DATA / SHARED_PHOTOS[name.split(":", 1)[1]]).astype(np.float64) / 255
    else:
        from skimage import data, img_as_float

        loader = (lambda: data.stereo_motorcycle()[0]) if name == "motorcycle_left" else getattr(data, name)
        image = img_as_float(loader())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    return np.ascontiguousarray(image[..., :3])


def available_photos(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n in names if not n.startswith("shared:")
                 or (DATA / SHARED_PHOTOS[n.split(":", 1)[1]]).exists())


def _rng(task: str, index: int, salt: str = "") -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{task}/{index}/{salt}".encode()))


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]])


def _world_points(homography: np.ndarray, shape, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """World (x, y) of a k x k supersampled frame grid, each (H*k, W*k)."""
    h, w = shape
    rr, cc = np.mgrid[0:h * k, 0:w * k].astype(np.float64)
    cc, rr = (cc + 0.5) / k - 0.5, (rr + 0.5) / k - 0.5
    p = homography @ np.stack([cc.ravel(), rr.ravel(), np.ones(cc.size)])
    return (p[0] / p[2]).reshape(h * k, w * k), (p[1] / p[2]).reshape(h * k, w * k)


def _box(hires: np.ndarray, shape, k: int = 3) -> np.ndarray:
    h, w = shape
    return hires.reshape(h, k, w, k).mean(axis=(1, 3)).astype(np.float32)


def _mesh_alpha(homography, shape, kind: str, period: float, width: float, angle: float) -> np.ndarray:
    """Anti-aliased alpha (H, W) of a mesh on a plane seen through ``homography`` (frame px -> plane px)."""
    u, v = _world_points(homography, shape)
    c, s = np.cos(angle), np.sin(angle)
    a, b = c * u + s * v, -s * u + c * v

    def near(x):
        return np.abs((x % period) - period / 2) < width / 2

    wire = {"diamond": lambda: near((a + b) / np.sqrt(2)) | near((a - b) / np.sqrt(2)),
            "grid": lambda: near(a) | near(b), "bars": lambda: near(a)}[kind]()
    return _box(wire.astype(np.float64), shape)


def _rain(shape, rng, angle_deg: float, length: float, density: float, brightness: float, blur: float):
    """One frame of rain (H, W) in [0, 1]: ``density`` streaks per 1000 pixels."""
    from skimage.draw import line_aa
    from skimage.filters import gaussian

    h, w = shape
    r = np.zeros(shape)
    angle = np.deg2rad(angle_deg)
    for _ in range(int(density * h * w / 1000)):
        ell = length * rng.uniform(0.6, 1.4)
        r0, c0 = rng.uniform(-ell, h), rng.uniform(-ell, w)
        r1, c1 = r0 + ell * np.sin(angle), c0 + ell * np.cos(angle)
        rr, cc, val = line_aa(int(r0), int(c0), int(r1), int(c1))
        keep = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        r[rr[keep], cc[keep]] = np.maximum(r[rr[keep], cc[keep]], val[keep] * brightness * rng.uniform(0.6, 1.0))
    return np.clip(gaussian(r, blur), 0, 1).astype(np.float32)


def _views(source, homs, shape):
    return np.stack([render_view(source, m, shape) for m in homs])


def _scene(task: str, index: int, shape, rng, photos) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """The true scene (T, H, W, 3), the camera's homographies and the moving object's mask (T, H, W) or None."""
    kind = KINDS[(index // 2) % len(KINDS)]
    motion = ("small", "medium", "large")[(index // 2) % 3]
    source_name = photos[rng.integers(len(photos))]
    camera = random_homographies(N_FRAMES, shape, **MOTIONS[motion], rng=rng)
    scene = _views(photo(source_name), camera, shape)
    info = {"kind": kind, "camera_motion": motion, "photo": source_name}
    object_mask = None
    h, w = shape
    if kind == "parallax":
        # a nearer plane (the lower part of the world) moving 1.5-2.5x the camera's translation
        factor = rng.uniform(1.5, 2.5)
        near = camera.copy()
        near[:, :2, 2] = camera[:, :2, 2] + (factor - 1) * (camera[:, :2, 2] - camera[:, :2, 2].mean(0))
        near_scene = _views(photo(source_name), near, shape)
        masks = np.stack([_box((_world_points(m, shape)[1] > 0.55 * h).astype(float), shape)
                          for m in near])
        scene = masks[..., None] * near_scene + (1 - masks[..., None]) * scene
        info["parallax_factor"] = round(float(factor), 2)
    elif kind == "moving":
        # an object of a tenth of the frame, textured by another photo, crossing the scene by itself
        other = photos[(photos.index(source_name) + 1 + rng.integers(len(photos) - 1)) % len(photos)]
        radius = np.sqrt(0.1 * h * w / np.pi)
        start = np.array([rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h])
        speed = rng.uniform(0.03, 0.07) * w
        heading = rng.uniform(0, 2 * np.pi)
        velocity = speed * np.array([np.cos(heading), np.sin(heading)])
        objects, masks = [], []
        for t, m in enumerate(camera):
            centre = start + (t - (N_FRAMES - 1) / 2) * velocity
            to_object = _translate(w / 2 - centre[0], h / 2 - centre[1]) @ m  # object texture centred on the world
            objects.append(render_view(photo(other), to_object, shape, margin=2.0))
            u, v = _world_points(m, shape)
            masks.append(_box(((u - centre[0]) ** 2 + (v - centre[1]) ** 2 < radius ** 2).astype(float), shape))
        masks = np.stack(masks)
        scene = masks[..., None] * np.stack(objects) + (1 - masks[..., None]) * scene
        object_mask = masks > 0.5
        info.update(object_photo=other, object_speed_px=round(float(speed), 1))
    return scene.astype(np.float32), camera, object_mask, info


def make_burst(task: str, index: int, *, with_interference: bool = True) -> CorpusBurst:
    """Corpus burst ``index`` (0..19) of ``task``; ``with_interference=False``: the same scene, noise and all,
    without the interference."""
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}")
    rng = _rng(task, index)
    photos = available_photos(PHOTOS_TUNING if index % 2 == 0 else PHOTOS_HELD_OUT)
    shape = SIZES[(index // 2) % len(SIZES)]
    scene, camera, object_mask, info = _scene(task, index, shape, rng, photos)
    info.update(task=task, index=index, half="tuning" if index % 2 == 0 else "held-out", shape=list(shape))
    t_count = len(scene)
    if task == "reflection":
        beta = rng.uniform(0.2, 0.45)
        second = photos[(photos.index(info["photo"]) + 1 + rng.integers(len(photos) - 1)) % len(photos)]
        blur = rng.uniform(0.0, 2.5)
        from skimage.filters import gaussian

        source = gaussian(photo(second), blur, channel_axis=-1) if blur > 0.3 else photo(second)
        motion = ("medium", "large")[rng.integers(2)]
        own = random_homographies(t_count, shape, **MOTIONS[motion], rng=rng)
        reflection = beta * _views(source, own, shape)
        clean = (1 - beta) * scene
        frames = clean + reflection
        mask = np.ones(scene.shape[:3], bool)
        info.update(reflection_photo=second, strength=round(float(beta), 3), blur=round(float(blur), 2),
                    reflection_motion=motion)
    elif task == "fence":
        mesh = ("diamond", "grid", "bars")[rng.integers(3)]
        period = rng.uniform(12, 26)
        width = period * rng.uniform(0.08, 0.18)  # a diamond or grid mesh then covers about 15-33 % of the view
        angle = rng.uniform(0, np.pi / 2)
        factor = rng.uniform(2.5, 5.0)  # the fence is nearer: its motion is a multiple of the camera's
        near = camera.copy()
        near[:, :2, 2] = factor * (camera[:, :2, 2] - camera[:, :2, 2].mean(0)) + camera[:, :2, 2].mean(0)
        near[:, :2, 2] += rng.uniform(-0.02, 0.02, (t_count, 2)) * np.array(shape[::-1])
        alpha = np.stack([_mesh_alpha(m, shape, mesh, period, width, angle) for m in near])
        colour = rng.uniform(0.05, 0.9) * np.array(rng.uniform(0.8, 1.0, 3))
        clean = scene
        frames = (1 - alpha[..., None]) * scene + alpha[..., None] * colour
        mask = alpha > 0.004
        info.update(mesh=mesh, period=round(float(period), 1), width=round(float(width), 2),
                    fence_factor=round(float(factor), 2), colour=[round(float(c), 3) for c in colour])
    elif task == "rain":
        params = {"angle_deg": rng.uniform(60, 110), "length": rng.uniform(6, 30), "density": rng.uniform(1.5, 5),
                  "brightness": rng.uniform(0.3, 0.8), "blur": rng.uniform(0.3, 1.0)}
        r = np.stack([_rain(shape, rng, **params) for _ in range(t_count)])
        clean = scene
        frames = (1 - r[..., None]) * scene + r[..., None]
        mask = r > 0.004
        info.update({k: round(float(v), 2) for k, v in params.items()})
    else:  # moire: a fine screen grating point-sampled through each frame's own view of the screen
        freq = rng.uniform(0.40, 0.49)
        angle = rng.uniform(0, np.pi / 2)
        amplitude = rng.uniform(0.04, 0.1)
        crossed = bool(rng.integers(2))
        tint = rng.uniform(0.5, 1.0, 3)
        moire = []
        for m in camera:
            u, v = _world_points(m, shape, k=1)  # point-sampled: the grating aliases differently in every frame
            a, b = np.cos(angle) * u + np.sin(angle) * v, -np.sin(angle) * u + np.cos(angle) * v
            grating = np.cos(2 * np.pi * freq * a) * (np.cos(2 * np.pi * freq * b) if crossed else 1.0)
            moire.append(amplitude * grating[..., None] * tint)
        clean = 0.84 * scene + 0.08
        frames = clean + np.stack(moire)
        mask = np.ones(scene.shape[:3], bool)
        info.update(frequency=round(float(freq), 3), amplitude=round(float(amplitude), 3), crossed=crossed)
    if not with_interference:
        frames = clean.copy()
        mask = np.zeros(scene.shape[:3], bool)
    grey = rng.uniform() < 0.3
    noise = float(rng.choice([0.0, 0.005, 0.01]))
    if not with_interference:
        # a burst without interference is checked against "no worse than the input": a noiseless input can only be
        # matched exactly, which no fit does; a camera's burst always carries sensor noise
        noise = max(noise, 0.01)
    frames = frames + rng.normal(0, noise, frames.shape) if noise else frames
    if grey:
        weights = np.array([0.299, 0.587, 0.114])
        frames, clean = frames @ weights, clean @ weights
    info.update(grey=bool(grey), noise=noise, interference=with_interference)
    return CorpusBurst(frames.astype(np.float32), clean.astype(np.float32), mask, object_mask, camera, info)


def half(name: str) -> tuple[int, ...]:
    """The burst indices of "tuning" or "held-out"."""
    return {"tuning": TUNING, "held-out": HELD_OUT}[name]
