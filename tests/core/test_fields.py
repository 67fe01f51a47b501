"""Coordinate networks: shapes, the coarse-to-fine schedule, SIREN initialisation."""
from __future__ import annotations

import torch

from napari_nir.core.fields import GridField, Siren


def test_grid_field_shapes_and_mean_start():
    field = GridField(3, (-1, 1, -0.5, 0.5), levels=4, finest=32, features=2, hidden=16,
                      init_value=torch.tensor([0.2, 0.4, 0.6]))
    out = field(torch.rand(100, 2) * 2 - 1)
    assert out.shape == (100, 3)
    assert torch.allclose(out.mean(0), torch.tensor([0.2, 0.4, 0.6]), atol=0.05)
    # finest level: 32 cells per unit over a 2 x 1 domain
    assert tuple(field.grids[-1].shape) == (1, 2, 33, 65)


def test_coarse_to_fine_schedule():
    field = GridField(1, (-1, 1, -1, 1), levels=4)
    field.set_progress(0.0, 0.5)
    assert field.level_weights[1:].sum() == 0
    assert field.level_weights[0] == 1  # the coarsest level is on from the start
    field.set_progress(0.2, 0.5)
    w = field.level_weights
    assert w[0] == 1 and w[1] == 1 and 0 < w[2] < 1 and w[3] == 0
    field.set_progress(0.6, 0.5)
    assert torch.all(field.level_weights == 1)
    field.set_progress(0.0, 0.0)
    assert torch.all(field.level_weights == 1)


def test_grid_field_learns_a_pattern_quickly():
    torch.manual_seed(0)
    field = GridField(1, (-1, 1, -1, 1), levels=6, finest=64)
    opt = torch.optim.Adam(field.param_groups(0.02))
    xy = torch.rand(4096, 2) * 2 - 1
    target = torch.sin(6 * xy[:, :1]) * torch.cos(4 * xy[:, 1:])
    for _ in range(200):
        loss = torch.mean((field(xy) - target) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3


def test_siren_shapes():
    net = Siren(2, 3, width=32, hidden_layers=3, omega0=30)
    assert net(torch.rand(7, 2)).shape == (7, 3)
    assert len(net.body) == 3
