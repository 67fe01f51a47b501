"""The task table: one entry per layer-separation task.

A task is data plus a formation function. The scene stream f1 is sampled through the task's motion model
(a fusion model); the interference stream f2(x, t) lives in frame coordinates with time. ``compose``
turns the scene values S (N, C) and the raw interference outputs (N, K) into the image I (N, C) and the
named interference layers. Widgets, the CLI and the docs are generated from ``TASKS``: adding a task
(dust on the sensor, a watermark, ...) is one more entry here.

The paper's configurations (docs/architecture.md, "The method in one page") are recorded in ``paper``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Task:
    """One layer-separation task.

    name: identifier (API, CLI); title, description: for menus, help and docs.
    motion: the scene stream's motion model in the paper's configuration ("homography" | "flow" | "occlusion").
    fast_motion: the scene stream's default motion in the fast preset (None: ``motion``). Homography for every
        task so far: flow and occlusion scene streams soaked up part of the interference (a 3-D occlusion
        canonical can "reveal" a rain streak; benchmarks/DECISIONS.md, "scene motion"). Pass motion= to override.
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
    detail_gate(layers) -> (N, 1) or None: where the residual (frame - reconstruction) may go back into the scene
        (``detail_transfer``), and by how much it is scaled there. None: everywhere, unscaled (additive layers:
        I - I_hat is what the scene misses, wherever the interference is). Compositing tasks divide by the
        scene's share (1 - alpha) and fade the transfer out where alpha > 1/2, where the scene is mostly hidden.
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
    detail_gate: Callable | None = None
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


def _visible_scene_gate(layers):
    alpha = layers["alpha"]
    return torch.clamp(1 - 2 * alpha, 0, 1) / (1 - alpha).clamp_min(0.5)


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
            # the paper's free f2 leaves the reflection's lower envelope in the scene; a reflection in a pane of
            # glass moves rigidly, so it gets a layer with homographies of its own where the residuals show one
            # (benchmarks/DECISIONS.md, "reflection")
            # detail transfer 1 (benchmarks/DECISIONS.md, "do no harm", chosen on the corpus's tuning half)
            fast_options={"interference_motion": "auto", "detail_transfer": 1.0},
        ),
        Task(
            name="fence", title="Fence / obstruction removal",
            description="Remove an opaque obstruction (fence, mesh, dirt) nearer the camera: "
                        "I = (1 - alpha) scene + alpha obstruction.",
            motion="flow", fast_motion="homography", interference_channels=lambda c: c + 1,
            interference_init=-4.0,
            compose=_alpha_composite, sparse_of=lambda layers: layers["alpha"], sparsity=0.001,
            detail_gate=_visible_scene_gate,
            layers=("scene", "interference", "alpha"),
            paper={"steps": 3000, "batch": -8, "loss": "mse", "f1_omega0": 90.0, "f2_width": 256},
            # alpha sparsity 0.05 (the paper's 0.001 beside our L1 loss swaps the layers over dark regions); a
            # median filter so that feature matching follows the scene, not the wires; a Cauchy warm-up that
            # the moving fence cannot pull (benchmarks/DECISIONS.md, "fence")
            # detail transfer 0.25, the scene consensus and the thick-alpha guard (benchmarks/DECISIONS.md, "do no
            # harm")
            fast_options={"sparsity": 0.05, "feature_prefilter": 7, "warmup_cauchy": 0.05, "scene_warmup": 0.5,
                          "detail_transfer": 0.25, "thick_alpha_guard": True, "scene_consensus": True},
        ),
        Task(
            name="rain", title="Rain removal",
            description="Remove rain streaks: I = (1 - r) scene + r, the scene occlusion-aware.",
            motion="occlusion", fast_motion="homography", interference_channels=lambda c: 1, interference_init=-4.0,
            compose=_rain, detail_gate=_visible_scene_gate,
            sparse_of=lambda layers: layers["alpha"], sparsity=0.01, layers=("scene", "interference", "alpha"),
            paper={"steps": 5000, "batch": -4, "loss": "l1", "f1_omega0": 30.0, "f2_width": 256},
            # detail transfer 0.5, the scene consensus and the thick-alpha guard (benchmarks/DECISIONS.md, "do no
            # harm")
            fast_options={"detail_transfer": 0.5, "thick_alpha_guard": True, "scene_consensus": True},
        ),
        Task(
            name="moire", title="Moire removal",
            description="Remove moire from photos of screens: I = scene(H_t x) + moire(x, t).",
            motion="homography", interference_channels=lambda c: c, interference_init=0.0,
            compose=_additive_signed, sparse_of=lambda layers: layers["interference"], sparsity=0.001,
            exclusion=0.002, flow_smoothness=0.0, zero_mean=1.0,
            paper={"steps": 3000, "batch": -4, "loss": "mse", "f1_omega0": 30.0, "f2_width": 128},
            # a band-limited scene (0.7 cells per pixel) cannot hold the near-Nyquist grating, a finer
            # interference grid (4 cells per pixel) can; the zero-mean prior pins the offset between the layers
            # (benchmarks/DECISIONS.md, "moire")
            fast_options={"grid_density": 0.7, "interference_density": 4.0, "detail_transfer": 0.5},
        ),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; a ValueError lists the valid names."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
