"""Layer separation: a scene stream that follows a motion model plus an interference stream f2(x, t).

How we keep one stream from swallowing everything (the known failure of two-stream training):

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

from . import fields
from .fit import FitConfig, FusionModel
from .motion import LieHomography
from .tasks import Task, get_task


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

    def interference_parts(self, frame_index: torch.Tensor, xy: torch.Tensor):
        """(raw, rigid_raw): the interference's raw outputs (N, K), and those of the rigid layer alone (with
        the free part at its start value) when both parts are on, else None."""
        t = frame_index.float() / max(self.n_frames - 1, 1) * 2 - 1
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
            {"params": list(self.interference.parameters()), "lr": config.lr_field, "name": "interference"}]
        if self.moving_layer is not None:
            groups += [{"params": list(self.moving_layer.parameters()), "lr": config.lr_field, "name": "rigid layer"},
                       {"params": list(self.moving_motion.parameters()), "lr": config.lr_motion,
                        "name": "rigid layer motion"}]
        return groups

    def set_progress(self, progress: float, config: FitConfig) -> None:
        self.scene.set_progress(progress, config)
        if hasattr(self.interference, "set_progress"):
            self.interference.set_progress(progress, config.coarse_to_fine)
        if self.moving_layer is not None:
            # the rigid layer starts coarse when it starts, at the warm-up's end
            own = max(0.0, progress - config.scene_warmup) / max(1e-6, 1 - config.scene_warmup)
            self.moving_layer.set_progress(own, config.coarse_to_fine)
            if float(self.rigid_on) > 0:
                self.free_on.fill_(1.0 if progress >= config.interference_free_start else 0.0)
        self.interference_on.fill_(1.0 if progress >= config.scene_warmup else 0.0)

    @property
    def starts_interference_motion(self) -> bool:
        """True when a rigid interference layer may start at the warm-up's end (fit_steps calls
        ``start_interference_motion`` then)."""
        return self.moving_layer is not None

    def start_interference_motion(self, data: torch.Tensor, shape, config: FitConfig, max_side: int = 512) -> dict:
        """End of the scene warm-up: decide whether the interference holds a rigidly moving layer and, if so,
        start its homographies from the residuals. Returns {"score", "rigid", "shifts" (T, 2) working px}.

        The residuals (data minus the scene alone) are warped into the scene's canonical coordinates, where
        whatever the scene holds is aligned across frames; a rigid interference then moves between them by
        shifts that ``motion.layer_translations`` finds by phase correlation, with a score (how many standard
        deviations the correlation peak stands out, median over pairs of frames). Measured at the warm-up's end:
        a rigid reflection 17.5-25.5 (the 5 x 256^2 sample, seeds 0-2), 7.2-14.1 on 3-5 frames of 64-96 px;
        no rigid layer: reflection_effendy (people walking past a shop window) 6.9, rain streaks 5.6-8.3 (all
        parallel, so they correlate a little along their slant). K_t = shift_t @ M_t (M_t: the scene's
        frame -> canonical homography), gauge-centred; rotation, zoom and perspective are left to the fit.
        data: (T*h*w, C) working frames as fit_steps holds them; shape (T, h, w, C).
        """
        from .motion import algebra_coefficients, centre_gauge, layer_translations
        from .render import pixel_grid

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
        rigid = config.interference_motion == "homography" or score >= config.rigid_layer_score
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
        sparsity = self.task.sparsity if config.sparsity is None else config.sparsity
        total = total + sparsity * self.task.sparse_of(self._last).abs().mean()
        if self.task.zero_mean > 0 and config.preset == "fast":  # the paper preset keeps the official losses
            total = total + self.task.zero_mean * self.frame_means(self._last["interference"]).abs().mean()
        if self._last_rigid is not None and config.interference_free > 0:
            # what the free part adds to the rigid layer has its own price: under the layer's sparsity alone the
            # free part would rather take the layer back and leave its lower envelope in the scene
            total = total + config.interference_free * (self._last["interference"] - self._last_rigid).abs().mean()
        exclusion = self.task.exclusion if config.exclusion is None else config.exclusion
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
        finite differences; a, b balance the two layers' gradient magnitudes (DESIGN.md section 2)."""
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

    def preview(self, config: FitConfig, device: torch.device) -> np.ndarray:
        return self.scene.preview(config, device)


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
    """Finest cells per working pixel of the interference grid: ``config.interference_density`` (0: the scene's
    ``grid_density``), lowered for large frames to at most MAX_INTERFERENCE_NODES nodes per frame, though
    never below the scene's density."""
    density = config.interference_density or config.grid_density
    return min(density, max(config.grid_density, math.sqrt(MAX_INTERFERENCE_NODES / (h * w))))


def make_separation_model(config: FitConfig, shape, domain, scene: FusionModel) -> SeparationModel:
    """Wrap a scene FusionModel with the interference stream of ``config.task``; seeded."""
    task = get_task(config.task)
    t, h, w, c = shape
    k = task.interference_channels(c)
    norm = scene.normaliser
    hx, hy = norm.half_extent()
    frame_domain = (-hx - 0.02, hx + 0.02, -hy - 0.02, hy + 0.02)
    init = interference_init(task, c)
    torch.manual_seed(config.seed + 101)
    if config.field == "grid":
        options = {"finest": interference_density(config, h, w) * norm.s, "features": 2, "hidden": 32,
                   **config.interference_options}
        interference = fields.GridField(k, frame_domain, init_value=init, depth_cells=max(1, t - 1), **options)
    else:
        interference = fields.Siren(3, k, init_value=init, **{"width": task.paper.get("f2_width", 256),
                                                                "hidden_layers": 4, **config.interference_options})
    moving_layer = None
    if config.interference_motion != "none":  # FitConfig.validate: grid fields only
        margin = (-hx - MOVING_MARGIN, hx + MOVING_MARGIN, -hy - MOVING_MARGIN, hy + MOVING_MARGIN)
        moving_layer = fields.GridField(k, margin, init_value=torch.zeros(k), **options)
    return SeparationModel(scene, interference, task, t, c, moving_layer)
