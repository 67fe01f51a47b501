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
from .tasks import Task, get_task


class SeparationModel(nn.Module):
    """I_t(x) = compose(f1(W_t(x)), f2(x, t)) for a task of the task table.

    ``scene`` is a FusionModel (field + motion), so rendering, flow and homographies of the scene work
    exactly as for fusion; ``interference`` takes (x, y, t) with t in [-1, 1] over the burst.
    """

    def __init__(self, scene: FusionModel, interference: nn.Module, task: Task, n_frames: int):
        super().__init__()
        self.scene = scene
        self.interference = interference
        self.task = task
        self.n_frames = n_frames
        self.register_buffer("interference_on", torch.tensor(1.0))
        self._last = None  # layers of the last training batch, for the regulariser

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

    def interference_raw(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        t = frame_index.float() / max(self.n_frames - 1, 1) * 2 - 1
        return self.interference(torch.cat([xy.float(), t[:, None]], 1))

    def layers_at(self, frame_index: torch.Tensor, xy: torch.Tensor):
        """(I, S, layers) at (N,) frames and (N, 2) frame coordinates, all (N, C) / (N, 1) working units."""
        scene = self.scene(frame_index, xy)
        image, layers = self.task.compose(scene, self.interference_raw(frame_index, xy))
        return image, scene, layers

    def forward(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        if float(self.interference_on) == 0.0:
            self._last = None
            return self.scene(frame_index, xy)
        image, scene, layers = self.layers_at(frame_index, xy)
        self._last = layers if self.training else None
        self._last_frames = frame_index if self.training else None
        return image

    # -- fit_steps hooks ---------------------------------------------------------------------------
    def parameter_groups(self, config: FitConfig) -> list[dict]:
        return self.scene.parameter_groups(config) + [
            {"params": list(self.interference.parameters()), "lr": config.lr_field, "name": "interference"}]

    def set_progress(self, progress: float, config: FitConfig) -> None:
        self.scene.set_progress(progress, config)
        if hasattr(self.interference, "set_progress"):
            self.interference.set_progress(progress, config.coarse_to_fine)
        self.interference_on.fill_(1.0 if progress >= config.scene_warmup else 0.0)

    def regulariser(self, config: FitConfig, generator: torch.Generator) -> torch.Tensor | float:
        total = self.scene.regulariser(config, generator)
        if self._last is None:
            return total
        sparsity = self.task.sparsity if config.sparsity is None else config.sparsity
        total = total + sparsity * self.task.sparse_of(self._last).abs().mean()
        if self.task.zero_mean > 0 and config.preset == "fast":  # the paper preset keeps the official losses
            total = total + self.task.zero_mean * self.frame_means(self._last["interference"]).abs().mean()
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
    init = torch.full((k,), float(task.interference_init))
    torch.manual_seed(config.seed + 101)
    if config.field == "grid":
        options = {"finest": interference_density(config, h, w) * norm.s, "features": 2, "hidden": 32,
                   **config.interference_options}
        interference = fields.GridField(k, frame_domain, init_value=init, depth_cells=max(1, t - 1), **options)
    else:
        interference = fields.Siren(3, k, init_value=init, **{"width": task.paper.get("f2_width", 256),
                                                                "hidden_layers": 4, **config.interference_options})
    return SeparationModel(scene, interference, task, t)
