"""Assembly: the one place that knows both the motion table and the task table.

``build_model(frames, config, device)`` makes the networks a fit starts from (feature start included);
``make_model(config, shape, domain)`` makes them for a known canonical domain (also used to load a saved result
and, on the meta device, by the memory estimate). Everything is seeded by ``config.runtime.seed``.

Thread safety: the networks' initial values are drawn from torch's global generator (``nn.Linear`` offers no
other), so ``make_model`` draws them under ``SEED_LOCK`` inside ``torch.random.fork_rng``: two fits started at
once in two threads each draw exactly what they would alone, and the caller's global generator is left as it was.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
from scipy.ndimage import median_filter
from torch import nn

from . import fields
from .burst import resized_frames, working_shape
from .config import FitConfig
from .geometry import Normaliser, frame_bounds
from .models import MOVING_MARGIN, FusionModel, SeparationModel, interference_density, interference_init
from .motion import centre_gauge, phase_translations, robust_start
from .motions import get_motion
from .stages import Stage, check_stop
from .tasks import get_task
from .train import blank_frame_weights, fit_steps

__all__ = ["build_model", "make_model", "initial_homographies", "aligns_first", "aligned_start", "SEED_LOCK"]

SEED_LOCK = threading.Lock()  # serialises only the seeded draws of model construction (module docstring)


def initial_homographies(frames: np.ndarray, config: FitConfig, norm: Normaliser,
                         skip=()) -> tuple[np.ndarray | None, dict]:
    """(T, 3, 3) normalised frame -> canonical start homographies (gauge-centred), or None for identity; and the
    feature matches the start rests on ({t: (frame-t points, frame-(t-1) points)}, working pixels; {} without).
    skip: blank frames, which the feature start's chain links across (``motion.robust_start``)."""
    m = config.motion
    if m.init == "identity":
        return None, {}
    matches: dict = {}
    if get_motion(m.model).start == "phase":
        pixel = phase_translations(frames)
    else:
        pixel, matches = _feature_start(frames, config, skip)
    if pixel is None:
        return None, matches
    n = norm.matrix
    normalised = np.einsum("ij,tjk,kl->til", n, pixel, np.linalg.inv(n))
    return centre_gauge(normalised), matches


def _feature_start(frames: np.ndarray, config: FitConfig, skip=()) -> tuple[np.ndarray | None, dict]:
    """(T, 3, 3) pixel homographies frame t -> frame 0 from feature matches (None: identity start), and the
    matches (``motion.robust_start``'s report)."""
    m = config.motion
    if m.feature_prefilter > 1:
        # thin obstructions (fence wires, rain streaks) are high-contrast corners that feature matching would
        # follow instead of the scene; a median filter wider than they are removes them first
        k = m.feature_prefilter
        frames = median_filter(frames, size=(1, k, k, 1)[:frames.ndim])
    pixel, report = robust_start(frames, seed=config.seed, skip=skip)
    if pixel is None:
        if m.init == "features":
            raise ValueError("feature-based initialisation failed: too few keypoint matches between consecutive "
                             "frames; use init='identity' (small motions) or a burst with more texture/overlap")
    return pixel, report["matches"]


MAX_SPAN = 8.0  # the widest canonical domain a start may ask for, in frame widths (heights)


def aligns_first(config: FitConfig, height: int, width: int) -> bool:
    """Whether a fit of (height, width) working frames starts with ``aligned_start``: a fusion (no task) whose
    motion starts from features (not ``init="identity"``) on frames longer than ``align_size`` (> 0)."""
    size = config.motion.align_size
    return (size > 0 and max(height, width) > size and not config.task and config.motion.init != "identity"
            and get_motion(config.motion.model).start == "features")


def aligned_start(frames: np.ndarray, config: FitConfig, device: torch.device, init: np.ndarray,
                  skip=()) -> np.ndarray:
    """(T, 3, 3) normalised frame -> canonical homographies from a homography fusion of the (T, h, w, C) frames
    reduced to ``align_size`` on the longer side, started from ``init`` (the feature start).

    An image pyramid's first level, for large frames whose full-size fit settles with a frame off its neighbour
    (reported on a 9 x 886^2 panorama that converged when fitted at 512 px): the full-size fit then starts from
    the reduced fit's motion. Off by default: on the large bursts we have it changed nothing but the time
    (benchmarks/DECISIONS.md, "aligned start"). The same options and steps as the fit; checks the stop flag every
    step. ``init`` itself where the motion has no matrices to hand on (the paper's MLP parameters).
    """
    _, h, w, _ = working_shape(frames.shape, config.motion.align_size)
    small = resized_frames(frames, (h, w))
    sub = config.replace(motion="homography", align_size=0, working_size=0)
    model = build_model(small, sub, device, start=init, skip=skip)
    if not hasattr(model.motion, "matrices"):
        return init
    weights = blank_frame_weights(len(frames), list(skip), sub.optimiser.blank_weight)
    for _ in fit_steps(model, small, sub, device, frame_weights=weights):
        check_stop()
    with torch.no_grad():
        return model.motion.matrices().detach().cpu().double().numpy()


def build_model(frames: np.ndarray, config: FitConfig, device: torch.device,
                start: np.ndarray | None = None, skip=()) -> nn.Module:
    """The networks for (T, h, w, C) working frames, seeded by the config's seed.

    start: (T, 3, 3) normalised frame -> reference homographies given by the caller (gauge-centred here); else
    the motion starts from features (when the motion model takes a homography start, ``init`` allows and
    matching succeeds) or the identity; the field's domain covers every frame's start outline plus room for the
    motion still to be learned. skip: blank frames, which the feature start's chain links across.
    """
    t, h, w, c = frames.shape
    norm = Normaliser(h, w)
    matches: dict = {}
    if start is not None:
        init = centre_gauge(np.asarray(start, dtype=np.float64))
    elif get_motion(config.motion.model).feature_start(config):
        init, matches = initial_homographies(frames, config, norm, skip)
        if init is not None and aligns_first(config, h, w):
            init = aligned_start(frames, config, device, init, skip)
    else:
        init = None
    identity = np.repeat(np.eye(3)[None], t, 0)
    start = init if init is not None else identity
    xmin, xmax, ymin, ymax = frame_bounds(start, norm)
    fx0, fx1, fy0, fy1 = frame_bounds(identity[:1], norm)
    if init is not None and (xmax - xmin > MAX_SPAN * (fx1 - fx0) or ymax - ymin > MAX_SPAN * (fy1 - fy0)):
        # a start that spreads the frames over more than MAX_SPAN frames is a wrong match, not a burst: a canonical
        # grid that size would not fit in memory; the identity start and the fit's own motion take over
        init, start, matches = None, identity, {}
        xmin, xmax, ymin, ymax = fx0, fx1, fy0, fy1
    margin = 0.15 + (0.25 if init is None else 0.0)
    domain = (xmin - margin, xmax + margin, ymin - margin, ymax + margin)
    lo, hi = config.value_range
    mean = frames.reshape(-1, c).mean(0) * (hi - lo) + lo
    check_stop()
    model = make_model(config, (t, h, w, c), domain, init=init, mean=mean).to(device)
    model.start_matches = matches  # what the diagnostics check the fitted motion against (not saved)
    return model


def make_model(config: FitConfig, shape: tuple[int, int, int, int], domain, *, init=None, mean=None) -> nn.Module:
    """Networks for working frames of ``shape`` (T, h, w, C) over a canonical ``domain``; seeded.

    init: (T, 3, 3) feature start or None; mean: (C,) the frames' mean in the value range (the field's start).
    A fusion model, or a separation model around one when ``config.task`` names a task. Thread-safe: the draws
    happen under ``SEED_LOCK`` on a forked global generator (module docstring)."""
    with SEED_LOCK, torch.random.fork_rng(devices=[]):
        return _make_model(config, shape, domain, init=init, mean=mean)


def _make_model(config: FitConfig, shape, domain, *, init=None, mean=None) -> nn.Module:
    t, h, w, c = shape
    norm = Normaliser(h, w)
    torch.manual_seed(config.seed)
    mean_t = None if mean is None else torch.as_tensor(np.asarray(mean), dtype=torch.float32)
    motion = get_motion(config.motion.model)
    f = config.field
    if f.kind == "grid":
        options = {"finest": f.grid_density * norm.s, **f.options}
        if motion.depth:
            options.setdefault("depth_cells", config.motion.occlusion_cells)
        field_net = fields.GridField(c, tuple(domain), init_value=mean_t, **options)
    else:
        field_net = fields.Siren(3 if motion.depth else 2, c, init_value=mean_t, **f.options)
    motion_net = motion.build(config, t, domain, init)
    separating = bool(config.task)
    # a separation's scene runs the separation's stages (see SeparationModel.stages), not the motion's
    stages = None if separating else motion.stages(config) or [Stage("fit")]
    scene = FusionModel(field_net, motion_net, norm, tuple(float(d) for d in domain), t, c, f.exposure,
                        stages=stages)
    scene.feature_started = init is not None
    # separation keeps the slow ramp: its weights were measured with it, and the scene warm-up needs it
    scene.fast_ramp = scene.feature_started and motion.featured_ramp and not separating
    if separating:
        return _separation_model(config, shape, scene)
    return scene


def _separation_model(config: FitConfig, shape, scene: FusionModel) -> SeparationModel:
    """Wrap a scene FusionModel with the interference stream of ``config.task``; seeded."""
    task = get_task(config.task)
    s = config.separation
    t, h, w, c = shape
    k = task.interference_channels(c)
    norm = scene.normaliser
    hx, hy = norm.half_extent()
    frame_domain = (-hx - 0.02, hx + 0.02, -hy - 0.02, hy + 0.02)
    init = interference_init(task, c)
    torch.manual_seed(config.seed + 101)
    if config.field.kind == "grid":
        options = {"finest": interference_density(config, h, w) * norm.s, "features": 2, "hidden": 32,
                   **s.interference_options}
        interference = fields.GridField(k, frame_domain, init_value=init, depth_cells=max(1, t - 1), **options)
    else:
        interference = fields.Siren(3, k, init_value=init, **{"width": task.paper.get("f2_width", 256),
                                                                "hidden_layers": 4, **s.interference_options})
    moving_layer = None
    if s.interference_motion != "none":  # FitConfig.validate: grid fields only
        margin = (-hx - MOVING_MARGIN, hx + MOVING_MARGIN, -hy - MOVING_MARGIN, hy + MOVING_MARGIN)
        moving_layer = fields.GridField(k, margin, init_value=torch.zeros(k), **options)
    return SeparationModel(scene, interference, task, t, c, moving_layer)
