"""The task table: one entry per layer-separation task.

A task is data plus a formation function. The scene stream f1 is sampled through the task's motion model
(a fusion model); the interference stream f2(x, t) lives in frame coordinates with time. ``compose``
turns the scene values S (N, C) and the raw interference outputs (N, K) into the image I (N, C) and the
named interference layers. Widgets, the CLI and the docs are generated from ``TASKS``: adding a task
(dust on the sensor, a watermark, ...) is one more entry here.

Official configurations (DESIGN.md section 2) are recorded in ``paper``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Task:
    """One layer-separation task.

    name: identifier (API, CLI); title, description: for menus, help and docs.
    motion: the scene stream's motion model in the paper's configuration ("homography" | "flow" | "occlusion").
    fast_motion: the scene stream's default motion in the fast preset (None: ``motion``). Homography for every
        task so far: on our measurements the flow and occlusion scene streams soaked up part of the interference (a 3-D
        occlusion canonical can "reveal" a rain streak), e.g. rain on the synthetic burst: scene 29.7 dB with
        occlusion, 32.3 with flow, 40.0 with homography (benchmarks/separation.py). Pass motion= to override.
    fast_options: FitConfig overrides of the fast preset for this task (see each entry for why).
    interference_channels(C) -> K: raw outputs of f2 for a C-channel burst.
    interference_init: initial value of f2's raw outputs (before activation), so it starts nearly empty.
    compose(S, raw) -> (I, layers): the formation model; layers maps "interference" (N, C) and, for
        compositing tasks, "alpha" (N, 1) to per-point values in working units.
    sparsity: weight of the L1 norm of what ``sparse_of(layers)`` returns (the interference or its alpha).
    exclusion: weight of the exclusion loss between scene and interference gradients (0: off).
    flow_smoothness: weight of the scene motion's Jacobian prior.
    zero_mean: weight of |mean of the interference over each frame| (0: off), for interference that oscillates
        about the scene (moire): it fixes the offset that an additive model otherwise leaves free between layers.
    layers: the output layer names, in display order.
    paper: the official configuration (steps, batch, networks, loss) for the ``paper`` preset.
    """

    name: str
    title: str
    description: str
    motion: str
    interference_channels: Callable[[int], int]
    interference_init: float
    compose: Callable
    sparse_of: Callable
    sparsity: float
    exclusion: float = 0.0
    flow_smoothness: float = 0.02
    zero_mean: float = 0.0
    fast_motion: str | None = None
    layers: tuple[str, ...] = ("scene", "interference")
    paper: dict = field(default_factory=dict)
    fast_options: dict = field(default_factory=dict)

    def default_motion(self, preset: str) -> str:
        """The scene's motion model when the caller gives none."""
        return (self.fast_motion or self.motion) if preset == "fast" else self.motion


def _additive(scene, raw):
    interference = torch.sigmoid(raw)
    return scene + interference, {"interference": interference}


def _additive_signed(scene, raw):
    return scene + raw, {"interference": raw}


def _alpha_composite(scene, raw):
    colour, alpha = torch.sigmoid(raw[:, :-1]), torch.sigmoid(raw[:, -1:])
    return (1 - alpha) * scene + alpha * colour, {"interference": colour, "alpha": alpha}


def _rain(scene, raw):
    r = torch.sigmoid(raw)
    return (1 - r) * scene + r, {"interference": r.expand_as(scene), "alpha": r}


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="reflection", title="Reflection removal",
            description="Remove a reflection seen through glass: I = scene + reflection, each moving differently.",
            motion="flow", fast_motion="homography", interference_channels=lambda c: c, interference_init=-4.0,
            compose=_additive,
            sparse_of=lambda layers: layers["interference"], sparsity=0.02, exclusion=0.0005,
            paper={"steps": 3000, "batch": -8, "loss": "mse", "f1_omega0": 30.0, "f2_width": 256},
            # The paper's free f2(x, y, t) can hold any reflection, so its sparsity leaves the reflection's lower
            # envelope (its minimum over the frames' positions) in the scene: 19.74, 20.53, 20.25 dB on the
            # sample's seeds 0-2 (aligned minimum 19.46, 20.17, 19.91). A reflection in a pane of glass moves
            # rigidly, so the fast preset gives it a layer of its own with its own homographies, started from the
            # warm-up's residuals ("auto": only where they show such a layer): 24.62, 27.70, 26.08 dB. Its
            # constant offset per channel stays ambiguous (additive layers: S + c, R - c); the rest of the error
            # is mostly that offset (seed 0: 24.6 dB, 32.9 with the offset removed). reflection_effendy (people
            # walking past a shop window, static camera) shows no rigid layer (score 6.9 < 10): 51.2 dB as before.
            fast_options={"interference_motion": "auto"},
        ),
        Task(
            name="fence", title="Fence / obstruction removal",
            description="Remove an opaque obstruction (fence, mesh, dirt) nearer the camera: "
                        "I = (1 - alpha) scene + alpha obstruction.",
            motion="flow", fast_motion="homography", interference_channels=lambda c: c + 1,
            interference_init=-4.0,
            compose=_alpha_composite, sparse_of=lambda layers: layers["alpha"], sparsity=0.001,
            layers=("scene", "interference", "alpha"),
            paper={"steps": 3000, "batch": -8, "loss": "mse", "f1_omega0": 90.0, "f2_width": 256},
            # with our L1 data term the paper's alpha weight (0.001, beside an MSE loss) let alpha saturate to 1
            # over dark scene regions and the obstruction colour hold the scene there (a layer swap); measured
            # on the synthetic fence burst (5 x 256^2): scene 18.6 dB at 0.001, 18.9 at 0.01, 22.7 at 0.05,
            # 22.3 at 0.15. Feature matching follows the fence's wires instead of the scene (seed 1 of the sample:
            # the scene's homographies ended 71 px off, scene 13.7 dB, below the input's 14.4); a 7-px median
            # filter before matching avoids that lock (seeds 0, 1, 2: 22.7, 13.7, 17.6 -> 22.8, 17.6, 17.7 dB).
            # The scene's motion then still ended 4-5 px off on seeds 1 and 2: the L1 warm-up is pulled by the
            # moving fence (30 % of the pixels). A Cauchy warm-up loss (scale 0.05), which gives the fence's
            # residuals almost no weight, over half the run: 22.8, 17.6, 17.7 -> 23.5, 23.9, 21.7 dB at 256^2;
            # at 192^2 22.5, 12.8, 15.1 -> 23.4, 14.3, 19.6; at 96^2 22.9, 21.2, 15.9 -> 22.3, 14.8, 16.1 (seed 1
            # regresses: its feature start is 14 px off and the redescending loss keeps it there)
            fast_options={"sparsity": 0.05, "feature_prefilter": 7, "warmup_cauchy": 0.05, "scene_warmup": 0.5},
        ),
        Task(
            name="rain", title="Rain removal",
            description="Remove rain streaks: I = (1 - r) scene + r, the scene occlusion-aware.",
            motion="occlusion", fast_motion="homography", interference_channels=lambda c: 1, interference_init=-4.0,
            compose=_rain,
            sparse_of=lambda layers: layers["alpha"], sparsity=0.01, layers=("scene", "interference", "alpha"),
            paper={"steps": 5000, "batch": -4, "loss": "l1", "f1_omega0": 30.0, "f2_width": 256},
        ),
        Task(
            name="moire", title="Moire removal",
            description="Remove moire from photos of screens: I = scene(H_t x) + moire(x, t).",
            motion="homography", interference_channels=lambda c: c, interference_init=0.0,
            compose=_additive_signed, sparse_of=lambda layers: layers["interference"], sparsity=0.001,
            exclusion=0.002, flow_smoothness=0.0, zero_mean=1.0,
            paper={"steps": 3000, "batch": -4, "loss": "mse", "f1_omega0": 30.0, "f2_width": 128},
            # the scene's finest grid at 0.7 cells per pixel cannot hold a carrier near the Nyquist rate, which
            # is where a screen's grating aliases from; measured on the synthetic moire burst (5 x 256^2):
            # scene 30.2 dB at 1.0, 28.1 at 0.8, 35.6 at 0.7, 33.0 at 0.5 cells per pixel: sensitive. Over the
            # sample's seeds 0, 1, 2 the mean is 34.0 dB at 0.7 and 0.6, 32.3 at 1.0, against 35.0 for the
            # aligned median: the band limit helps, but on its own it left moire behind the classical baseline. A
            # real screen's pitch may want another value (pass grid_density=).
            # A grating oscillates about the scene, so the interference is held to zero mean per frame
            # (zero_mean): without it the offset between the layers drifted by up to 0.016 and the scene on
            # seeds 0, 1, 2 was 35.60, 33.40, 32.87 dB; with it 35.55, 35.37, 35.54 (aligned median 35.05,
            # 34.63, 35.19)
            # The scene's band limit leaves the grating to the interference stream, whose grid had the same 0.7
            # cells per pixel and could not hold it either: at 4 cells per pixel (interference_density) the
            # scene on seeds 0, 1, 2 is 36.63, 37.25, 36.88 dB (35.14, 35.64, 35.48 at 0.7; 2 cells per pixel:
            # 35.43, 35.65, 35.34; one node per pixel centre: 35.33, 35.66, 36.43), at 49 s a fit instead of 21
            fast_options={"grid_density": 0.7, "interference_density": 4.0},
        ),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; a ValueError lists the valid names."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
