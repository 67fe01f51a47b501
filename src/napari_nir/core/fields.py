"""Coordinate networks: f(x) -> values, for x in normalised canonical coordinates.

Two kinds:

* ``GridField`` (the fast default): a multiresolution pyramid of dense 2-D feature grids, sampled bilinearly
  and summed into a tiny MLP (or a linear read-out). Fine levels are faded in over training
  (coarse-to-fine), which gives the motion model smooth gradients early on. Dense grids rather than a hash
  table: in 2-D the finest level of a 256-1024 px image fits in memory, and a dense grid needs no hashing
  or collision handling, so ``torch.nn.functional.grid_sample`` does all the work on CPU and GPU alike.
* ``Siren``: the paper's sinusoidal MLP (Sitzmann et al. 2020), used by the ``paper`` preset.

Coordinates are (x, y) = (col, row) order in [-1, 1]-ish normalised units, shape (N, D).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class GridField(nn.Module):
    """Multiresolution dense grid encoding + small MLP.

    domain: (xmin, xmax, ymin, ymax) in normalised coordinates that the grids cover (outside: border values).
    finest: cells per normalised unit of the finest level; levels are spaced geometrically from ``coarsest``.
    features: channels per level; hidden: MLP width (0 = linear read-out).
    """

    def __init__(
        self,
        out_channels: int,
        domain: tuple[float, ...],
        *,
        levels: int = 8,
        coarsest: float = 4.0,
        finest: float = 256.0,
        features: int = 4,
        hidden: int = 64,
        init_value: torch.Tensor | None = None,
        depth_cells: int = 0,
    ):
        super().__init__()
        xmin, xmax, ymin, ymax = domain[:4]
        # optional third axis (the occlusion model's w, in [-1, 1]) with a fixed, small number of cells
        self.dims = 3 if depth_cells > 0 else 2
        lo = [xmin, ymin] + ([-1.0] if self.dims == 3 else [])
        span = [xmax - xmin, ymax - ymin] + ([2.0] if self.dims == 3 else [])
        self.register_buffer("lo", torch.tensor(lo, dtype=torch.float32))
        self.register_buffer("span", torch.tensor(span, dtype=torch.float32))
        self.levels = levels
        self.grids = nn.ParameterList()
        for nx, ny in pyramid_shapes(xmin, xmax, ymin, ymax, levels, coarsest, finest):
            shape = (1, features, depth_cells + 1, ny, nx) if self.dims == 3 else (1, features, ny, nx)
            # in place: the same values as 1e-4 * randn, and on the meta device (the memory estimate) an
            # out-of-place product would import torch._dynamo (about a second)
            self.grids.append(nn.Parameter(torch.randn(*shape).mul_(1e-4)))
        width = levels * features
        if hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out_channels))
        else:
            self.mlp = nn.Linear(width, out_channels)
        last = self.mlp[-1] if isinstance(self.mlp, nn.Sequential) else self.mlp
        with torch.no_grad():
            last.weight.zero_()  # start as a constant field (the data's mean): nothing to unlearn
            if init_value is not None:
                last.bias.copy_(init_value)
        self.register_buffer("level_weights", torch.ones(levels))

    def set_progress(self, progress: float, ramp: float) -> None:
        """Coarse-to-fine: level l reaches full weight at progress (l + 1) / levels * ramp (progress in [0, 1])."""
        coarse_to_fine(self.level_weights, progress, ramp)

    def encode(self, xy: torch.Tensor) -> torch.Tensor:
        """(N, dims) coordinates -> (N, levels * features) weighted grid features."""
        return sample_levels(self.grids, (xy - self.lo) / self.span * 2 - 1, self.level_weights)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.encode(xy))

    def param_groups(self, lr: float) -> list[dict]:
        return [
            {"params": list(self.grids.parameters()), "lr": lr},
            {"params": list(self.mlp.parameters()), "lr": lr * 0.5},
        ]

    def point_floats(self) -> tuple[float, float]:
        """(training, forward-only) float32 values one evaluated point needs (memory estimate, calibrated on
        CPU: see core/memory.py)."""
        feats = sum(int(g.shape[1]) for g in self.grids)
        width = sum(lin.out_features for lin in self.mlp.modules() if isinstance(lin, nn.Linear))
        return 6.0 * feats + 3.0 * width, 2.5 * feats + 1.5 * width


def pyramid_shapes(xmin: float, xmax: float, ymin: float, ymax: float, levels: int, coarsest: float,
                   finest: float) -> list[tuple[int, int]]:
    """(nx, ny) nodes per level of a grid pyramid over the box, densities (cells per normalised unit) spaced
    geometrically from ``coarsest`` to ``finest``. Shared by the canonical field and the flow's displacement."""
    growth = (finest / coarsest) ** (1 / max(levels - 1, 1))
    shapes = []
    for level in range(levels):
        density = coarsest * growth**level
        shapes.append((max(2, int(math.ceil((xmax - xmin) * density)) + 1),
                       max(2, int(math.ceil((ymax - ymin) * density)) + 1)))
    return shapes


def coarse_to_fine(level_weights: torch.Tensor, progress: float, ramp: float) -> None:
    """Set (levels,) ``level_weights`` in place: level l fades in (half cosine) until progress (l + 1) / levels *
    ramp; ``ramp`` 0: every level at full weight."""
    if ramp <= 0:
        level_weights.fill_(1.0)
        return
    levels = len(level_weights)
    alpha = progress / ramp * levels
    w = torch.clamp(alpha - torch.arange(levels, dtype=torch.float32, device=level_weights.device) + 1, 0, 1)
    level_weights.copy_(0.5 - 0.5 * torch.cos(math.pi * w))


def sample_levels(grids, unit: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Bilinear/trilinear samples of every grid at (N, 2|3) coordinates in [-1, 1] -> (N, sum of features).

    2-D grids are (1, F, Ny, Nx), 3-D grids (1, F, Nz, Ny, Nx); coordinates in (x, y[, z]) order.
    """
    n, dims = unit.shape
    # non-finite coordinates (a diverging motion) would crash grid_sample's CPU backward: keep them finite,
    # the fit loop reports the divergence through the loss
    unit = torch.nan_to_num(unit, nan=0.0, posinf=2.0, neginf=-2.0)
    g = unit.view(1, 1, n, dims) if dims == 2 else unit.view(1, 1, 1, n, dims)
    feats = []
    for level, grid in enumerate(grids):
        sampled = F.grid_sample(grid, g, mode="bilinear", padding_mode="border", align_corners=True)
        feats.append(sampled.reshape(grid.shape[1], n).t() * weights[level])
    return torch.cat(feats, dim=1)


class SineLayer(nn.Module):
    """sin(omega0 * (W x + b)) with SIREN initialisation."""

    def __init__(self, n_in: int, n_out: int, omega0: float, first: bool):
        super().__init__()
        self.omega0 = omega0
        self.linear = nn.Linear(n_in, n_out)
        bound = 1 / n_in if first else math.sqrt(6 / n_in) / omega0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega0 * self.linear(x))


class Siren(nn.Module):
    """SIREN: in_dim -> (hidden_layers x width sine layers) -> out_dim linear. The paper's f and g networks."""

    def __init__(self, in_dim: int, out_dim: int, *, width: int = 256, hidden_layers: int = 4, omega0: float = 30.0,
                 init_value: torch.Tensor | None = None):
        super().__init__()
        layers = [SineLayer(in_dim, width, omega0, first=True)]
        layers += [SineLayer(width, width, omega0, first=False) for _ in range(hidden_layers - 1)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, out_dim)
        bound = math.sqrt(6 / width) / omega0
        with torch.no_grad():
            self.out.weight.uniform_(-bound, bound)
            if init_value is not None:
                self.out.bias.copy_(init_value)

    def set_progress(self, progress: float, ramp: float) -> None:  # no schedule: the paper has none
        pass

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(xy))

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": lr}]

    def point_floats(self) -> tuple[float, float]:
        """(training, forward-only) float32 values one evaluated point needs (see GridField.point_floats)."""
        widths = [lin.out_features for lin in self.modules() if isinstance(lin, nn.Linear)]
        return 3.0 * sum(widths), 3.0 * max(widths, default=0)
