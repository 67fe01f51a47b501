"""Polish: Gauss-Newton refinement of a drift fit's per-frame matrices against its own canonical view.

The fit estimates every frame's motion from the pixels its random batches happen to visit (a fraction of each
frame's pixels at 200 frames); its error floor is that sampling noise. After the fit, the canonical view is
rendered once on a pixel grid (a denoised template fused from all frames, no reference frame), and every frame's
matrix is refined by a few Gauss-Newton steps over all of its pixels (every ``stride``-th row and column):

    minimise_d  sum_x | g_t C(exp(sum_i d_i G_i) M_t x) + b_t - I_t(x) |^2,   M_t <- exp(sum_i d_i G_i) M_t

with G_i the motion's own sl(3) generators (translation, rigid, ...), C the canonical view sampled bilinearly
(``torch.nn.functional.grid_sample``) with its central-difference gradient, g_t, b_t the frame's exposure (when the
model has one). Pixels whose canonical position lies outside the rendered view, or in its outer 2-pixel border,
are left out. Steps are damped (Levenberg-Marquardt) and a frame whose step exceeds ``MAX_STEP_PX`` keeps the
fit's matrix (its view cannot be trusted: a fit stopped after a few steps, a frame the view does not explain).
Hand-written because it is ours: the canonical view is the model's, and the update is in the model's Lie
parameters; scikit-image's and pystackreg's registrations align to a frame or a mean, not to this.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import render
from .geometry import Normaliser, pixel_grid

__all__ = ["polish_matrices", "CHUNK_POINTS"]

CHUNK_POINTS = 1 << 20  # points (frame pixels) per Gauss-Newton chunk: memory.py counts one chunk
MAX_STEP_PX = 2.0  # working pixels at the frame corners: a larger step is not a refinement


@torch.no_grad()
def polish_matrices(model, frames: np.ndarray, value_range, device, *, iterations: int = 3, stride: int = 1,
                    chunk_points: int = CHUNK_POINTS) -> dict:
    """Refine ``model.motion`` (a LieHomography of a fusion model) in place on (T, h, w, C) working frames.

    Returns {"iterations", "points_per_frame", "frames_kept_as_fitted", "mean_update_px", "max_update_px"}: the
    size of the last iteration's updates at the frame corners (pixels of the working frames), a convergence
    measure, and how many frames kept the fit's matrix."""
    motion = model.motion
    t_count, h, w, c = frames.shape
    norm = Normaliser(h, w)
    matrices = motion.matrices().detach().cpu().numpy().astype(np.float64)
    view = render.render_canonical(model, matrices, norm, value_range, device, extent="union", scale=1.0)
    to_norm, (rows, cols) = render.canonical_grid(matrices, norm, model.domain, "union", 1.0)
    lo, hi = value_range
    canonical = torch.as_tensor(view * (hi - lo) + lo, dtype=torch.float32).permute(2, 0, 1)  # (C, rows, cols)
    grad_x = torch.zeros_like(canonical)
    grad_y = torch.zeros_like(canonical)
    grad_x[:, :, 1:-1] = (canonical[:, :, 2:] - canonical[:, :, :-2]) / 2
    grad_y[:, 1:-1] = (canonical[:, 2:] - canonical[:, :-2]) / 2
    stack = torch.cat([canonical, grad_x, grad_y])[None]  # (1, 3C, rows, cols), per canonical pixel
    from_norm = np.linalg.inv(to_norm)
    step = float(to_norm[0, 0])  # normalised units per canonical pixel
    xy = torch.as_tensor(pixel_grid(h, w, norm)).reshape(h, w, 2)[::stride, ::stride].reshape(-1, 2).double()
    # the frames in the model's value range, as the training loop compares them
    targets = torch.as_tensor(frames[:, ::stride, ::stride].reshape(t_count, -1, c)) * (hi - lo) + lo
    rows_in, cols_in = np.meshgrid(np.arange(0, h, stride), np.arange(0, w, stride), indexing="ij")
    margin = 3  # frame pixels this close to the frame's edge may sample the view's uncovered fill
    interior = torch.as_tensor(((rows_in >= margin) & (rows_in < h - margin) & (cols_in >= margin)
                                & (cols_in < w - margin)).reshape(-1))
    gens = motion.generators.cpu()  # (k, 3, 3)
    gens_list = [[[float(v) for v in row] for row in gen] for gen in gens]
    gain, bias = _exposure(model, t_count, c)
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]],
                           dtype=torch.float64) * torch.tensor([*norm.half_extent(), 1.0], dtype=torch.float64)
    # the gauge-centred coefficients, updated freely here (exp(a + d) ~ exp(d) exp(a) to first order, exact for
    # translations; each iteration re-linearises at the matrices the coefficients give, so the fixed point is the
    # same); the model re-centres them afterwards (a common shift of all frames, below a pixel's hundredth)
    fitted = (motion.coeffs - motion.coeffs.mean(0, keepdim=True)).detach().cpu().double()
    coeffs = fitted.clone()
    frames_per_chunk = max(1, chunk_points // len(xy))
    updates = torch.zeros(t_count)
    ones = torch.ones(len(xy), 1, dtype=torch.float64)
    xy_h = torch.cat([xy, ones], 1)                                            # (P, 3)
    rejected = torch.zeros(t_count, dtype=torch.bool)
    for _ in range(iterations):
        current = torch.linalg.matrix_exp(torch.einsum("tk,kij->tij", coeffs, gens))
        for t0 in range(0, t_count, frames_per_chunk):
            t1 = min(t_count, t0 + frames_per_chunk)
            m = current[t0:t1]                                                 # (n, 3, 3) float64
            ph = torch.einsum("nij,pj->npi", m, xy_h)
            p = (ph[..., :2] / ph[..., 2:3]).float()                           # (n, P, 2) canonical normalised
            pix = p * (1 / step) + torch.as_tensor(from_norm[:2, 2], dtype=torch.float32)
            inside = ((pix[..., 0] > 2) & (pix[..., 0] < cols - 3) & (pix[..., 1] > 2) & (pix[..., 1] < rows - 3)
                      & interior)
            grid = torch.stack([pix[..., 0] / (cols - 1) * 2 - 1, pix[..., 1] / (rows - 1) * 2 - 1], -1)
            sampled = F.grid_sample(stack.expand(t1 - t0, -1, -1, -1), grid[:, None], mode="bilinear",
                                    align_corners=True)[:, :, 0]               # (n, 3C, P)
            g, b = gain[t0:t1, :, None], bias[t0:t1, :, None]                  # (n, C, 1)
            mask = inside[:, None].float()                                     # (n, 1, P)
            residual = (g * sampled[:, :c] + b - targets[t0:t1].permute(0, 2, 1)) * mask     # (n, C, P)
            gx = sampled[:, c:2 * c] * (g / step) * mask                       # dC/dx per normalised unit
            gy = sampled[:, 2 * c:] * (g / step) * mask
            x, y = p[..., 0][:, None], p[..., 1][:, None]                       # (n, 1, P)
            # d p / d d_i = (G_i p_h)[:2] - p (G_i p_h)[2] (the perspective division of exp(d G) p_h)
            columns = []
            for gen in gens_list:
                dx = gen[0][0] * x + gen[0][1] * y + gen[0][2]
                dy = gen[1][0] * x + gen[1][1] * y + gen[1][2]
                dz = gen[2][0] * x + gen[2][1] * y + gen[2][2]
                columns.append(gx * (dx - x * dz) + gy * (dy - y * dz))      # (n, C, P)
            jac = torch.stack(columns, 1).reshape(t1 - t0, len(columns), -1)   # (n, k, C*P)
            jtj = (jac @ jac.transpose(1, 2)).double()
            jtr = (jac @ residual.reshape(t1 - t0, -1, 1)).double()[..., 0]
            k = jtj.shape[1]
            # Levenberg-Marquardt damping: a frame whose view is flat (no gradient) gets no step, not a wild one
            damped = jtj + 1e-3 * torch.diag_embed(torch.diagonal(jtj, dim1=1, dim2=2)) + \
                1e-9 * torch.eye(k, dtype=torch.float64)
            delta = -torch.linalg.solve(damped, jtr)                           # (n, k)
            new = torch.linalg.matrix_exp(torch.einsum("nk,kij->nij", delta, gens)) @ m
            before = torch.einsum("nij,cj->nci", m, corners)
            after = torch.einsum("nij,cj->nci", new, corners)
            moved = (after[..., :2] / after[..., 2:3] - before[..., :2] / before[..., 2:3]).norm(dim=-1)
            moved = moved.mean(-1) * norm.s                                    # working pixels at the corners
            # a refinement: a step of more than MAX_STEP_PX means the template cannot be trusted there (a fit
            # stopped early, a frame the view does not explain): that frame keeps the fit's matrix
            wild = ~torch.isfinite(moved) | (moved > MAX_STEP_PX)
            rejected[t0:t1] |= wild
            delta[wild] = 0.0
            updates[t0:t1] = torch.where(wild, torch.zeros_like(moved), moved).float()
            coeffs[t0:t1] += delta
    motion.coeffs.copy_(torch.where(rejected[:, None], fitted, coeffs).to(motion.coeffs.dtype))
    return {"iterations": iterations, "points_per_frame": int(len(xy)), "frames_kept_as_fitted": int(rejected.sum()),
            "mean_update_px": float(updates.mean()), "max_update_px": float(updates.max())}


def _exposure(model, t_count: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, C) per-frame gain and bias as the model's forward applies them (ones and zeros without exposure)."""
    if not getattr(model, "exposure", False):
        return torch.ones(t_count, c), torch.zeros(t_count, c)
    log_gain, bias = model.exposure_terms()
    return torch.exp(log_gain.detach().cpu()).float(), bias.detach().cpu().float()
