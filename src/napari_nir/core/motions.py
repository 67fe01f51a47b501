"""The motion table: one entry per motion model.

An entry says how to build the motion network for a config, which presets change which options for it, what
the fit reports about the alignment (``alignment``: "matrices" (T, 3, 3) or per-pixel "flow"), whether the
canonical view has an occlusion coordinate w (``depth``), which result artefacts it adds (``artefacts``, roles
of ``result.ARTEFACTS``) and the stages it adds to a fusion run. The networks themselves live in
``motion.py``; each one offers the same small interface::

    net(frame_index (N,), xy (N, 2)) -> (N, 2) canonical (x, y)  [(N, 3) with w when depth]
    net.matrices() -> (T, 3, 3) float64 homography part (identity where there is none)
    net.smoothness() -> the flow prior (a tensor) or None
    net.point_floats() -> (training, forward) float32 values per evaluated point (memory estimate)

Adding a motion model is one entry here (plus its network in ``motion.py`` when it needs a new one); the API,
CLI, widgets and docs read their choices from ``MOTIONS``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy.ndimage import binary_dilation, gaussian_filter
from torch import nn

from . import motion as nets
from .config import FitConfig
from .geometry import pixel_grid
from .stages import Stage

__all__ = ["Motion", "MOTIONS", "get_motion", "polishes"]


@dataclass(frozen=True)
class Motion:
    """One motion model.

    name: identifier (API, CLI, widgets); title, description: for menus, help and docs.
    build(config, n_frames, domain, init) -> the motion network (seeded draws happen in the caller's order).
    alignment: "matrices" (the fit reports (T, 3, 3) homographies, outlines) or "flow" (per-pixel flow).
    depth: the canonical field has a third coordinate w (occlusion).
    feature_start(config) -> whether the network takes a homography start (``init`` "auto"/"features").
    start: how that start is found: "features" (ORB matches and RANSAC, any homography) or "phase" (phase
        correlation of consecutive frames: translations, for drift; fast and texture-blind).
    polish: after the fit, refine every frame's matrix against the canonical view (``polish.py``; the config's
        ``polish`` iterations).
    featured_ramp: a fusion started from feature matches fades fine levels in sooner (coarse_to_fine_featured).
    presets: {preset: flat option values} on top of ``config.PRESET_OPTIONS``.
    artefacts: result artefact roles this motion adds (see ``result.ARTEFACTS``).
    stages(config) -> stages this motion adds to a fusion run (none: one "fit" stage).
    sample: the key of napari's sample burst (File > Open Sample) made for this motion.
    """

    name: str
    title: str
    description: str
    build: Callable[[FitConfig, int, tuple, np.ndarray | None], nn.Module]
    alignment: Literal["matrices", "flow"]
    depth: bool = False
    feature_start: Callable[[FitConfig], bool] = lambda config: True
    start: Literal["features", "phase"] = "features"
    polish: bool = False
    featured_ramp: bool = False
    presets: dict = field(default_factory=dict)
    artefacts: tuple[str, ...] = ()
    stages: Callable[[FitConfig], list[Stage]] = lambda config: []
    sample: str = ""


def _homography_net(config: FitConfig, n_frames: int, init) -> nn.Module:
    if config.motion.param == "lie":
        return nets.LieHomography(n_frames, init=init)
    return nets.MLPHomography(n_frames, init=init)


def _flow_net(config: FitConfig, n_frames: int, domain, init, *, occlusion: bool) -> nn.Module:
    m = config.motion
    # built even when the paper's SIREN flow does not use it: its seeded draws come first, as they always have
    homography = _homography_net(config, n_frames, init)
    if m.param == "mlp":  # the paper preset: the official SIREN g(x, y, t)
        return nets.SirenFlow(n_frames, occlusion=occlusion, seed=config.seed, hidden_layers=5 if occlusion else 4)
    return nets.FlowMotion(n_frames, domain, levels=m.flow_levels, coarsest=m.flow_coarsest, finest=m.flow_finest,
                           knots=m.flow_knots, base=homography if m.flow_base == "homography" else None,
                           occlusion=occlusion)


def _on_homography_base(config: FitConfig) -> bool:
    return config.motion.flow_base == "homography"


def _occlusion_stages(config: FitConfig) -> list[Stage]:
    """The displacement-grid occlusion model: the homography alone first (every pixel at w = 0, the
    background), then outlier pixels start on a depth slice of their own (``seed_occlusion``). The paper's
    SIREN motion has no such start."""
    warmup = config.motion.occlusion_warmup
    if config.motion.param != "lie" or warmup <= 0:
        return []
    return [Stage("background", 0.0, enter=_displacement_off), Stage("occlusion", warmup, enter=seed_occlusion)]


def _displacement_off(model, data, shape, config, generator, progress) -> None:
    """The occlusion model's background stage: the homography alone, every pixel at w = 0."""
    model.motion.displacement_on.fill_(0.0)


def seed_occlusion(model, data: torch.Tensor, shape, config: FitConfig, generator: torch.Generator,
                   progress: float) -> int:
    """End of the occlusion warm-up: pixels whose residual is an outlier (robust z > 5 and above 8 % of the
    value range) start at w = ``occlusion_seed_w``, the rest stays at w = 0. Returns the outliers' count. The w
    output of the displacement grid is regressed onto that map (150 cheap steps).

    model: a fusion model whose motion is a FlowMotion with w; data: (T*h*w, C) working frames as the training
    loop holds them; shape: (T, h, w, C). Every ``stride``-th pixel of every frame is used (at most about 2 M
    points)."""
    model.motion.displacement_on.fill_(1.0)
    model.set_progress(progress, config)  # the field's and flow's levels as they are now
    t, h, w, c = shape
    device = data.device
    stride = max(1, int(math.ceil(math.sqrt(t * h * w / 2.0e6))))
    rows, cols = np.arange(0, h, stride), np.arange(0, w, stride)
    pix = torch.as_tensor((rows[:, None] * w + cols[None, :]).reshape(-1), device=device)
    xy = torch.as_tensor(pixel_grid(h, w, model.normaliser), device=device)[pix]
    frame_index = torch.arange(t, device=device).repeat_interleave(len(pix))
    with torch.no_grad():
        residual = torch.stack([model(frame_index[:len(pix)] + k, xy) - data[k * h * w + pix] for k in range(t)])
    # smoothed before the test: detail the field has not learnt yet is zero-mean and averages out, an object
    # the background cannot explain is a blob that stays
    signed = residual.cpu().numpy().reshape(t, len(rows), len(cols), c)
    size = np.abs(gaussian_filter(signed, sigma=(0, 2.0 / stride, 2.0 / stride, 0))).mean(-1)
    median = np.median(size)
    spread = 1.4826 * np.median(np.abs(size - median))
    lo, hi = config.value_range
    outlier = size > max(median + 5 * spread, 0.08 * (hi - lo))
    # grow the mask by a pixel or two: an object's soft edge is an outlier only where the contrast is high
    outlier = binary_dilation(outlier, structure=np.ones((1, 3, 3), bool), iterations=max(1, 2 // stride))
    motion = model.motion
    target = torch.as_tensor(np.where(outlier.reshape(-1), math.atanh(config.motion.occlusion_seed_w) / motion.w_gain,
                                      0.0), dtype=torch.float32, device=device)
    xy_all = xy.repeat(t, 1)
    optimiser = torch.optim.Adam(list(motion.grids.parameters()), lr=0.05)
    for _ in range(150):
        pick = torch.randint(len(target), (min(len(target), 16384),), generator=generator).to(device)
        raw = motion.displacement(frame_index[pick], xy_all[pick])[:, 2]
        loss = torch.nn.functional.mse_loss(raw, target[pick])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return int(outlier.sum())


# the paper's configuration per motion model (its code): steps, pixels per step, loss, SIREN depth
def _paper(steps: int, batch: int, loss: str, hidden_layers: int) -> dict:
    return {"steps": steps, "batch": batch, "loss": loss,
            "field_options": {"width": 256, "hidden_layers": hidden_layers, "omega0": 30.0}}


# what a fit reporting (T, 3, 3) matrices writes besides its canonical view (roles of result.ARTEFACTS)
MATRIX_ARTEFACTS = ("homographies", "outlines", "transforms", "transforms array", "pystackreg transforms")


def _drift(name: str, generators: tuple[int, ...], what: str) -> Motion:
    """A constrained homography: the Lie coefficients of a subgroup only (motion.LieHomography's generators)."""
    return Motion(
        name=name, title=name.capitalize(), description=what,
        build=lambda config, t, domain, init: nets.LieHomography(t, init=init, generators=generators),
        alignment="matrices", featured_ramp=True, start="phase", polish=True,
        # fast: half the steps, the motion's Adam steps ending 10x smaller, then the polish (benchmarks/DECISIONS.md
        # "drift correction"); paper: the paper preset's networks with our Lie parameters
        presets={"fast": {"lr_final_fraction": 0.01, "steps": 200},
                 "paper": {**_paper(3000, -4, "mse", 4), "motion_param": "lie"}},
        artefacts=MATRIX_ARTEFACTS, sample="drift_burst",
    )


MOTIONS: dict[str, Motion] = {
    m.name: m
    for m in (
        Motion(
            name="homography", title="Homography",
            description="one 3x3 projective transform per frame: camera rotation, pans, planar scenes",
            build=lambda config, t, domain, init: _homography_net(config, t, init),
            alignment="matrices", featured_ramp=True,
            # fast: the points per step grow over the first 30 % (benchmarks/DECISIONS.md, "batch ramp")
            presets={"fast": {"batch_ramp": 0.3, "steps": 450}, "paper": _paper(3000, -4, "mse", 4)},
            artefacts=MATRIX_ARTEFACTS, sample="homography_burst",
        ),
        Motion(
            name="flow", title="Flow",
            description="a global homography plus a smooth per-pixel displacement: non-rigid motion, parallax",
            build=lambda config, t, domain, init: _flow_net(config, t, domain, init, occlusion=False),
            alignment="flow", feature_start=_on_homography_base,
            presets={"paper": _paper(3000, -8, "mse", 4)},
            artefacts=("flow", "flow colour", "flow vectors", "flow magnitude"), sample="flow_burst",
        ),
        Motion(
            name="occlusion", title="Occlusion",
            description="flow with a depth coordinate w, so that moving things can hide and reveal the background",
            build=lambda config, t, domain, init: _flow_net(config, t, domain, init, occlusion=True),
            alignment="flow", depth=True, feature_start=_on_homography_base,
            presets={"paper": _paper(5000, -32, "l1", 5)},
            artefacts=("flow", "flow colour", "flow vectors", "flow magnitude", "occlusion w"),
            stages=_occlusion_stages, sample="occlusion_burst",
        ),
        _drift("translation", (0, 1), "a shift per frame: stage drift in a time series"),
        _drift("rigid", (0, 1, 2), "a shift and a rotation per frame"),
        _drift("similarity", (0, 1, 2, 3), "a shift, a rotation and a uniform zoom per frame"),
        _drift("affine", (0, 1, 2, 3, 4, 5), "an affine map per frame (shear and aspect too, no perspective)"),
    )
}


def polishes(config: FitConfig) -> bool:
    """Whether a fit of ``config`` ends with the polish (``polish.py``): a fusion whose motion entry asks for it,
    with ``polish`` iterations > 0."""
    return get_motion(config.motion.model).polish and config.motion.polish > 0 and not config.task


def get_motion(name: str) -> Motion:
    """The motion model called ``name``; a ValueError lists the valid names."""
    if not isinstance(name, str) or name not in MOTIONS:
        raise ValueError(f"unknown motion {name!r}; choose one of {', '.join(MOTIONS)}")
    return MOTIONS[name]
