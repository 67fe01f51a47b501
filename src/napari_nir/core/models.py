"""The models a fit optimises: ``FusionModel`` (fusion) and ``SeparationModel`` (layer separation).

Both offer the training loop's interface (``train.fit_steps``): ``forward(frame_index (N,), xy (N, 2)) -> (N, C)``
predicted pixels, ``stages(config)``, ``parameter_groups(config)``, ``set_progress(progress, config)`` and
``regulariser(config, generator)``. Which networks they hold is decided in ``build.py``.

Layer separation: how we keep one stream from swallowing everything (the known failure of two-stream training):

* the scene starts alone: for the first ``scene_warmup`` of the run only f1 is fitted, with an L1 loss,
  i.e. a robust fusion of the burst (the interference behaves as outliers), so the scene is initialised
  from the fused burst before f2 exists; where the interference covers much of the frame (a fence) the
  warm-up loss is a Cauchy loss (``warmup_cauchy``), which all but ignores what it cannot explain;
* f2 starts (nearly) empty (its raw outputs start at the task's ``interference_init``) and has lower
  capacity (fewer features, a narrower MLP) than f1, though a finer grid where the interference is finer
  than the scene (moire: ``interference_density``);
* sparsity of the interference (or its alpha) and, for additive tasks, the exclusion loss computed by
  finite differences on small rendered patches;
* both streams use coarse-to-fine grid encodings, so low frequencies settle first.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .config import FitConfig
from .geometry import Normaliser, pixel_grid, time_coordinate
from .motion import LieHomography, algebra_coefficients, centre_gauge, layer_translations
from .stages import Stage
from .tasks import Task


class FusionModel(nn.Module):
    """I_t(x) = gain_t * f(W_t(x)) + bias_t: canonical field, motion, optional per-frame exposure.

    Coordinates are normalised (see geometry.Normaliser). The exposure (per frame and channel) absorbs
    brightness changes between real frames; its gauge is fixed like the motion's (mean log-gain 0, mean
    bias 0), so the canonical view has the burst's average exposure.
    """

    def __init__(self, field_net: nn.Module, motion_net: nn.Module, normaliser: Normaliser,
                 domain: tuple[float, float, float, float], n_frames: int, channels: int, exposure: bool, *,
                 stages: list[Stage] | None = None):
        super().__init__()
        self.field = field_net
        self.motion = motion_net
        self.normaliser = normaliser
        self.domain = domain
        self.exposure = exposure
        self.run_stages = stages or [Stage("fit")]
        self.feature_started = False  # set by build when the motion starts from feature matches
        self.start_matches: dict = {}  # build: the start's feature matches, {t: (frame-t, frame-(t-1) points)}
        # set by build: fine levels fade in over coarse_to_fine_featured instead of coarse_to_fine
        self.fast_ramp = False
        if exposure:
            self.log_gain = nn.Parameter(torch.zeros(n_frames, channels))
            self.bias = nn.Parameter(torch.zeros(n_frames, channels))

    def forward(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        values = self.field(self.motion(frame_index, xy).float())
        if self.exposure:
            log_gain, bias = self.exposure_terms()
            values = values * torch.exp(log_gain[frame_index]) + bias[frame_index]
        return values

    def exposure_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, C) per-frame log gain and bias as ``forward`` applies them (their gauge: zero mean over frames).
        Only with ``exposure``."""
        return (self.log_gain - self.log_gain.mean(0, keepdim=True), self.bias - self.bias.mean(0, keepdim=True))

    def point_networks(self) -> list[nn.Module]:
        """The networks evaluated at every point of a training step (memory estimate: ``point_floats()``)."""
        return [self.field, self.motion]

    def motion_parameters(self) -> list[nn.Parameter]:
        extra = [self.log_gain, self.bias] if self.exposure else []
        return list(self.motion.parameters()) + extra

    # -- the training loop's interface (a separation model provides the same five) -------------------
    def stages(self, config: FitConfig) -> list[Stage]:
        """The run's stages (see stages.py), as build gave them."""
        return list(self.run_stages)

    def parameter_groups(self, config: FitConfig) -> list[dict]:
        """Adam groups; the group named "motion" is frozen during ``motion_warmup``."""
        return self.field.param_groups(config.optimiser.lr_field) + [
            {"params": self.motion_parameters(), "lr": config.optimiser.lr_motion, "name": "motion"}]

    def set_progress(self, progress: float, config: FitConfig) -> None:
        """Coarse-to-fine schedules of the field and (flow models) the displacement grid."""
        o = config.optimiser
        ramp = o.coarse_to_fine_featured if self.fast_ramp else o.coarse_to_fine
        self.field.set_progress(progress, ramp)
        self.motion.set_progress(progress, ramp)

    def regulariser(self, config: FitConfig, generator: torch.Generator) -> torch.Tensor | float:
        """The flow prior (mean |Jacobian| of g), zero for homographies."""
        weight = config.motion.flow_smoothness
        smoothness = self.motion.smoothness() if weight > 0 else None
        return 0.0 if smoothness is None else weight * smoothness


class SeparationModel(nn.Module):
    """I_t(x) = compose(f1(W_t(x)), f2(x, t)) for a task of the task table.

    ``scene`` is a FusionModel (field + motion), so rendering, flow and homographies of the scene work
    exactly as for fusion; ``interference`` takes (x, y, t) with t in [-1, 1] over the burst.

    With a ``moving_layer`` (config ``interference_motion`` "homography" or "auto") the interference's raw
    output is moving_layer(K_t x) + f2(x, t): one layer that moves rigidly by homographies K_t of its own (a
    reflection in a pane of glass) plus the free per-frame part, which starts late and pays for what it holds
    (``interference_free``), so that it takes only what the rigid layer cannot hold (objects moving in the
    reflection). Which parts are on is decided at the warm-up's end (``start_interference_motion``) and kept in
    the buffers ``rigid_on`` and ``free_on``.
    """

    def __init__(self, scene: FusionModel, interference: nn.Module, task: Task, n_frames: int, channels: int,
                 moving_layer: nn.Module | None = None):
        super().__init__()
        self.scene = scene
        self.interference = interference
        self.moving_layer = moving_layer
        self.moving_motion = LieHomography(n_frames) if moving_layer is not None else None
        self.task = task
        self.n_frames = n_frames
        self.channels = channels
        self.register_buffer("interference_on", torch.tensor(1.0))
        if moving_layer is not None:
            # only with a rigid layer, so that the state of the paper's model (and files saved before the rigid
            # layer existed) stays as it was
            self.register_buffer("rigid_on", torch.tensor(0.0))
            self.register_buffer("free_on", torch.tensor(1.0))
            self.register_buffer("rigid_score", torch.tensor(float("nan")))  # set at the warm-up's end
            # derived from the task, so not saved
            self.register_buffer("free_init", interference_init(task, channels), persistent=False)
        self._last = None  # layers of the last training batch, for the regulariser
        self._last_rigid = None  # the rigid layer alone (plus the free part's start value), same batch

    # the scene's geometry, so that render.* and FusionResult treat this model like a fusion model
    @property
    def field(self):
        return self.scene.field

    @property
    def motion(self):
        return self.scene.motion

    @property
    def domain(self):
        return self.scene.domain

    @property
    def normaliser(self):
        return self.scene.normaliser

    def point_networks(self) -> list[nn.Module]:
        """The scene's networks and the interference (a rigid layer is sampled in place of points' own)."""
        return self.scene.point_networks() + [self.interference]

    def interference_parts(self, frame_index: torch.Tensor, xy: torch.Tensor):
        """(raw, rigid_raw): the interference's raw outputs (N, K), and those of the rigid layer alone (with
        the free part at its start value) when both parts are on, else None."""
        t = time_coordinate(frame_index, self.n_frames)
        if self.moving_layer is None:
            return self.interference(torch.cat([xy.float(), t[:, None]], 1)), None
        if float(self.free_on) > 0:
            free = self.interference(torch.cat([xy.float(), t[:, None]], 1))
        else:
            free = self.free_init.expand(len(xy), -1)
        if float(self.rigid_on) == 0:
            return free, None
        rigid = self.moving_layer(self.moving_motion(frame_index, xy).float())
        return rigid + free, (rigid + self.free_init if float(self.free_on) > 0 else None)

    def interference_raw(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        return self.interference_parts(frame_index, xy)[0]

    def rigid_layer_at(self, xy: torch.Tensor) -> torch.Tensor:
        """(N, C) the rigid layer alone (the free part at its start value) at (N, 2) points of its own
        coordinates, as the task's "interference" layer in working units."""
        raw = self.moving_layer(xy.float()) + self.free_init
        zeros = torch.zeros(len(xy), self.channels, device=xy.device)
        return self.task.compose(zeros, raw)[1]["interference"]

    def rigid_layer_score(self) -> float:
        """The residuals' correlation score the rigid layer was decided on (NaN: no rigid layer, or not yet)."""
        return float(self.rigid_score) if self.moving_layer is not None else float("nan")

    def interference_homographies(self) -> np.ndarray | None:
        """(T, 3, 3) float64 normalised frame -> interference-layer homographies K_t, or None when the
        interference has no rigid layer."""
        if self.moving_layer is None or float(self.rigid_on) == 0:
            return None
        return self.moving_motion.matrices().detach().cpu().numpy()

    def layers_at(self, frame_index: torch.Tensor, xy: torch.Tensor):
        """(I, S, layers) at (N,) frames and (N, 2) frame coordinates, all (N, C) / (N, 1) working units."""
        scene = self.scene(frame_index, xy)
        image, layers = self.task.compose(scene, self.interference_raw(frame_index, xy))
        return image, scene, layers

    def forward(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        if float(self.interference_on) == 0.0:
            self._last = None
            return self.scene(frame_index, xy)
        scene = self.scene(frame_index, xy)
        raw, rigid_raw = self.interference_parts(frame_index, xy)
        image, layers = self.task.compose(scene, raw)
        self._last = layers if self.training else None
        self._last_frames = frame_index if self.training else None
        self._last_rigid = None
        if self.training and rigid_raw is not None:
            self._last_rigid = self.task.compose(scene, rigid_raw)[1]["interference"]
        return image

    # -- fit_steps hooks ---------------------------------------------------------------------------
    def parameter_groups(self, config: FitConfig) -> list[dict]:
        groups = self.scene.parameter_groups(config) + [
            {"params": list(self.interference.parameters()), "lr": config.optimiser.lr_field, "name": "interference"}]
        if self.moving_layer is not None:
            o = config.optimiser
            groups += [{"params": list(self.moving_layer.parameters()), "lr": o.lr_field, "name": "rigid layer"},
                       {"params": list(self.moving_motion.parameters()), "lr": o.lr_motion,
                        "name": "rigid layer motion"}]
        return groups

    def stages(self, config: FitConfig) -> list[Stage]:
        """"scene warm-up" (the scene alone; a Cauchy data term when ``warmup_cauchy`` and the scene's motion
        started from feature matches: a redescending loss needs a start within its basin), then "separation",
        which starts the rigid interference layer when the model has one."""
        s = config.separation
        lo, hi = config.value_range
        cauchy = s.warmup_cauchy * (hi - lo) if self.scene.feature_started else 0.0
        start = self.start_interference_motion if self.moving_layer is not None else None
        warmup = [Stage("scene warm-up", 0.0, cauchy=cauchy)] if s.scene_warmup > 0 else []
        return warmup + [Stage("separation", s.scene_warmup, enter=start)]

    def set_progress(self, progress: float, config: FitConfig) -> None:
        s, ramp = config.separation, config.optimiser.coarse_to_fine
        self.scene.set_progress(progress, config)
        self.interference.set_progress(progress, ramp)
        if self.moving_layer is not None:
            # the rigid layer starts coarse when it starts, at the warm-up's end
            own = max(0.0, progress - s.scene_warmup) / max(1e-6, 1 - s.scene_warmup)
            self.moving_layer.set_progress(own, ramp)
            if float(self.rigid_on) > 0:
                self.free_on.fill_(1.0 if progress >= s.interference_free_start else 0.0)
        self.interference_on.fill_(1.0 if progress >= s.scene_warmup else 0.0)

    def start_interference_motion(self, model, data: torch.Tensor, shape, config: FitConfig,
                                  generator: torch.Generator, progress: float, max_side: int = 512) -> dict:
        """End of the scene warm-up: decide whether the interference holds a rigidly moving layer and, if so,
        start its homographies from the residuals. Returns {"score", "rigid", "shifts" (T, 2) working px}.

        The residuals (data minus the scene alone) are warped into the scene's canonical coordinates, where
        whatever the scene holds is aligned across frames; a rigid interference then moves between them by
        shifts that ``motion.layer_translations`` finds by phase correlation, with a score (how many standard
        deviations the correlation peak stands out, median over pairs of frames; the scores that set the threshold
        are in benchmarks/DECISIONS.md, "reflection"). K_t = shift_t @ M_t (M_t: the scene's
        frame -> canonical homography), gauge-centred; rotation, zoom and perspective are left to the fit.
        Called as the "separation" stage's ``enter`` (``model`` is this model; generator and progress unused).
        data: (T*h*w, C) working frames as fit_steps holds them; shape (T, h, w, C).
        """
        t, h, w, c = shape
        norm = self.normaliser
        device = data.device
        xy = torch.as_tensor(pixel_grid(h, w, norm), device=device)
        scale = min(1.0, max_side / max(h, w))
        rows, cols = max(8, round(h * scale)), max(8, round(w * scale))
        canonical = torch.as_tensor(pixel_grid(h, w, norm, scale), device=device).double()
        canonical = torch.cat([canonical, torch.ones(len(canonical), 1, dtype=torch.float64, device=device)], 1)
        matrices = self.scene.motion.matrices().detach().double().to(device)
        warped, valid = [], torch.ones(rows * cols, dtype=torch.bool, device=device)
        with torch.no_grad():
            for k in range(t):
                frame = torch.full((len(xy),), k, device=device, dtype=torch.long)
                residual = (data[k * h * w:(k + 1) * h * w] - self.scene(frame, xy)).mean(1).view(1, 1, h, w)
                p = canonical @ torch.linalg.inv(matrices[k]).T
                px = p[:, 0] / p[:, 2] * norm.s + norm.cx  # frame pixel (col, row)
                py = p[:, 1] / p[:, 2] * norm.s + norm.cy
                valid &= (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)
                grid = torch.stack([px / max(w - 1, 1) * 2 - 1, py / max(h - 1, 1) * 2 - 1], 1).float()
                sampled = torch.nn.functional.grid_sample(residual, grid.view(1, 1, -1, 2), align_corners=True)
                warped.append(sampled.view(rows, cols))
        valid_np = valid.view(rows, cols).cpu().numpy()
        if valid_np.sum() < 64:  # the frames hardly overlap: nothing to correlate
            shifts, score = np.zeros((t, 2)), 0.0
        else:
            shifts, score = layer_translations(torch.stack(warped).cpu().numpy().astype(np.float64), valid_np)
        shifts = shifts * np.array([w / cols, h / rows])  # working pixels (x, y)
        rigid = config.separation.interference_motion == "homography" or score >= config.separation.rigid_layer_score
        if rigid:
            start = np.stack([np.array([[1, 0, dx / norm.s], [0, 1, dy / norm.s], [0, 0, 1.0]]) for dx, dy in shifts])
            start = centre_gauge(np.einsum("tij,tjk->tik", start, matrices.cpu().numpy()))
            with torch.no_grad():
                coeffs = self.moving_motion.coeffs
                coeffs.copy_(torch.as_tensor(algebra_coefficients(start), dtype=coeffs.dtype, device=coeffs.device))
        self.rigid_on.fill_(1.0 if rigid else 0.0)
        self.rigid_score.fill_(float(score))  # free_on follows in set_progress, called next in the same step
        self.start_report = {"score": float(score), "rigid": bool(rigid), "shifts": shifts}
        return self.start_report

    def regulariser(self, config: FitConfig, generator: torch.Generator) -> torch.Tensor | float:
        total = self.scene.regulariser(config, generator)
        if self._last is None:
            return total
        s = config.separation
        sparsity = self.task.sparsity if s.sparsity is None else s.sparsity
        total = total + sparsity * self.task.sparse_of(self._last).abs().mean()
        if self.task.zero_mean > 0 and s.zero_mean_prior:
            total = total + self.task.zero_mean * self.frame_means(self._last["interference"]).abs().mean()
        if self._last_rigid is not None and s.interference_free > 0:
            # what the free part adds to the rigid layer has its own price: under the layer's sparsity alone the
            # free part would rather take the layer back and leave its lower envelope in the scene
            total = total + s.interference_free * (self._last["interference"] - self._last_rigid).abs().mean()
        exclusion = self.task.exclusion if s.exclusion is None else s.exclusion
        if exclusion > 0:
            total = total + exclusion * self.exclusion_loss(generator)
        return total

    def frame_means(self, values: torch.Tensor) -> torch.Tensor:
        """(T, K) mean of the last batch's (N, K) ``values`` over each frame's points (0 for absent frames)."""
        frames = self._last_frames
        sums = torch.zeros(self.n_frames, values.shape[1], device=values.device).index_add(0, frames, values)
        counts = torch.bincount(frames, minlength=self.n_frames).clamp(min=1).to(values.dtype)
        return sums / counts[:, None]

    def exclusion_loss(self, generator: torch.Generator, patches: int = 16, size: int = 8) -> torch.Tensor:
        """Mean (tanh(a |grad S|) tanh(b |grad B|))^2 over random 8x8 patches of random frames, gradients by
        finite differences; a, b balance the two layers' gradient magnitudes (docs/architecture.md, the method)."""
        norm = self.normaliser
        device = self.interference_on.device
        t = torch.randint(self.n_frames, (patches,), generator=generator)
        r0 = torch.randint(max(1, norm.height - size), (patches,), generator=generator)
        c0 = torch.randint(max(1, norm.width - size), (patches,), generator=generator)
        rr, cc = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        rows = (r0[:, None, None] + rr).reshape(-1).float()
        cols = (c0[:, None, None] + cc).reshape(-1).float()
        frame_index = t[:, None].expand(patches, size * size).reshape(-1).to(device)
        xy = torch.stack([(cols - norm.cx) / norm.s, (rows - norm.cy) / norm.s], 1).to(device)
        _, scene, layers = self.layers_at(frame_index, xy)
        s = scene.view(patches, size, size, -1)
        b = layers["interference"].view(patches, size, size, -1)
        loss = 0.0
        for axis in (1, 2):
            gs, gb = s.diff(dim=axis).abs(), b.diff(dim=axis).abs()
            a = torch.sqrt(gb.mean() / (gs.mean() + 1e-6) + 1e-12).detach()
            bb = torch.sqrt(gs.mean() / (gb.mean() + 1e-6) + 1e-12).detach()
            loss = loss + (torch.tanh(a * gs) * torch.tanh(bb * gb)).pow(2).mean()
        return loss



# finest-level nodes per frame slice of the interference grid: its gradient and Adam update are dense, so a
# step costs time and memory in proportion (5 x 256^2 moire at 4 cells per pixel, 1.1 M nodes: 49 s a fit
# against 21 s at 0.7)
MAX_INTERFERENCE_NODES = 1.2e6
# normalised units (the longer side spans 2) that a rigid interference layer's field extends past the frame: room
# for its own motion, which is not known when the field is made (it starts at the warm-up's end)
MOVING_MARGIN = 0.5


def interference_init(task: Task, channels: int) -> torch.Tensor:
    """(K,) start value of the interference's raw outputs, so that it starts (nearly) empty."""
    return torch.full((task.interference_channels(channels),), float(task.interference_init))


def interference_density(config: FitConfig, h: int, w: int) -> float:
    """Finest cells per working pixel of the interference grid: ``interference_density`` (0: the scene's
    ``grid_density``), lowered for large frames to at most MAX_INTERFERENCE_NODES nodes per frame, though
    never below the scene's density."""
    density = config.separation.interference_density or config.field.grid_density
    return min(density, max(config.field.grid_density, math.sqrt(MAX_INTERFERENCE_NODES / (h * w))))
