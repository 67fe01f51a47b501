"""Motion models: where frame t's pixels land in the canonical view.

All models map normalised frame coordinates (N, 2) in (x, y) order, together with frame indices (N,), to
normalised canonical coordinates (N, 2). Normalisation (see ``Normaliser``) is isotropic: pixel centres,
the longer image side spanning [-1, 1].

Homographies:

* ``LieHomography`` (fast preset): H_t = expm(sum_i a_ti G_i) with the 8 generators G_i of sl(3). The
  gauge is fixed without a reference frame: the mean of a_t over the burst is removed, so the canonical
  view sits at the "average" pose of all frames. Identity start, or a feature-based start.
* ``MLPHomography`` (paper preset): the paper's g(t), a ReLU MLP 1 -> 256 -> 256 -> 256 -> 8 whose last
  bias is the identity; no gauge (as in the official code).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Normaliser:
    """Pixel (col, row) <-> normalised (x, y) for an image of (height, width) pixels.

    x = (col - (W - 1) / 2) / s, y = (row - (H - 1) / 2) / s, s = max(H, W) / 2.
    """

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.s = max(height, width) / 2
        self.cx, self.cy = (width - 1) / 2, (height - 1) / 2

    @property
    def matrix(self) -> np.ndarray:
        """3x3: pixel (col, row, 1) -> normalised (x, y, 1)."""
        return np.array([[1 / self.s, 0, -self.cx / self.s], [0, 1 / self.s, -self.cy / self.s], [0, 0, 1.0]])

    def half_extent(self) -> tuple[float, float]:
        """(x, y) half sizes of the frame in normalised units (to the outer pixel edges)."""
        return self.width / 2 / self.s, self.height / 2 / self.s


def _sl3_generators() -> torch.Tensor:
    g = torch.zeros(8, 3, 3, dtype=torch.float64)
    g[0, 0, 2] = 1  # x translation
    g[1, 1, 2] = 1  # y translation
    g[2, 0, 1], g[2, 1, 0] = -1, 1  # rotation
    g[3, 0, 0], g[3, 1, 1] = 1, 1  # isotropic scale (with the last diagonal: trace-free below)
    g[3, 2, 2] = -2
    g[4, 0, 0], g[4, 1, 1] = 1, -1  # aspect
    g[5, 0, 1], g[5, 1, 0] = 1, 1  # shear
    g[6, 2, 0] = 1  # perspective x
    g[7, 2, 1] = 1  # perspective y
    return g


def apply_homography(matrices: torch.Tensor, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Apply per-point homographies: matrices (T, 3, 3), frame_index (N,), xy (N, 2) -> (N, 2)."""
    m = matrices[frame_index].to(xy.dtype)
    x, y = xy[:, 0:1], xy[:, 1:2]
    num = m[:, :2, 0] * x + m[:, :2, 1] * y + m[:, :2, 2]
    den = m[:, 2, 0:1] * x + m[:, 2, 1:2] * y + m[:, 2, 2:3]
    return num / den


class LieHomography(nn.Module):
    """Per-frame homographies in normalised coordinates, H_t = expm(A_t), mean_t A_t = 0."""

    kind = "homography"

    def __init__(self, n_frames: int, init: np.ndarray | None = None):
        super().__init__()
        self.register_buffer("generators", _sl3_generators())
        start = torch.zeros(n_frames, 8, dtype=torch.float64)
        if init is not None:
            start = torch.as_tensor(algebra_coefficients(init), dtype=torch.float64)
        self.coeffs = nn.Parameter(start)

    def matrices(self) -> torch.Tensor:
        """(T, 3, 3) float64 normalised frame -> canonical homographies (gauge applied)."""
        a = self.coeffs - self.coeffs.mean(0, keepdim=True)
        return torch.linalg.matrix_exp(torch.einsum("ti,ijk->tjk", a, self.generators))

    def forward(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        return apply_homography(self.matrices(), frame_index, xy)


class MLPHomography(nn.Module):
    """The paper's g(t): ReLU MLP 1 -> 256 -> 256 -> 256 -> 8, last bias = identity (normalised coordinates)."""

    kind = "homography"

    def __init__(self, n_frames: int, width: int = 256, init: np.ndarray | None = None):
        super().__init__()
        self.n_frames = n_frames
        self.net = nn.Sequential(
            nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8),
        )
        with torch.no_grad():
            self.net[-1].weight.mul_(1e-3)
            self.net[-1].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0]))
        self.register_buffer("offset", torch.zeros(n_frames, 8))
        if init is not None:  # feature start: a per-frame offset on top of the network's output
            flat = torch.as_tensor(init / init[:, 2:3, 2:3], dtype=torch.float32).reshape(n_frames, 9)[:, :8]
            self.offset.copy_(flat - torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0]))

    def matrices(self) -> torch.Tensor:
        t = torch.linspace(-1, 1, self.n_frames, device=self.offset.device).unsqueeze(1)
        p = self.net(t) + self.offset
        return torch.cat([p, torch.ones_like(p[:, :1])], 1).view(-1, 3, 3).double()

    def forward(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        return apply_homography(self.matrices(), frame_index, xy)


def algebra_coefficients(matrices: np.ndarray) -> np.ndarray:
    """(T, 3, 3) homographies near the identity -> (T, 8) sl(3) coefficients (least squares on the log)."""
    from scipy.linalg import logm

    gens = _sl3_generators().numpy().reshape(8, 9).T
    out = []
    for m in matrices:
        m = m / np.cbrt(np.linalg.det(m))
        log = np.real(logm(m))
        out.append(np.linalg.lstsq(gens, log.reshape(9), rcond=None)[0])
    return np.asarray(out)


def centre_gauge(matrices: np.ndarray, iterations: int = 10) -> np.ndarray:
    """Re-express (T, 3, 3) frame -> common-space homographies so that their mean log is zero.

    Finds C with mean_t log(C @ M_t) = 0 (fixed-point iteration), returning C @ M_t: the canonical
    view then sits at the burst's average pose rather than at any one frame.
    """
    from scipy.linalg import expm

    gens = _sl3_generators().numpy()
    c = np.eye(3)
    for _ in range(iterations):
        mean = algebra_coefficients(np.einsum("ij,tjk->tik", c, matrices)).mean(0)
        c = expm(-np.einsum("i,ijk->jk", mean, gens)) @ c
        if np.abs(mean).max() < 1e-9:
            break
    out = np.einsum("ij,tjk->tik", c, matrices)
    return out / out[:, 2:3, 2:3]


def feature_homographies(frames: np.ndarray, *, max_side: int = 512, seed: int = 0) -> np.ndarray | None:
    """Feature-based start: (T, H, W[, C]) frames in [0, 1] -> (T, 3, 3) pixel homographies frame t -> frame 0.

    ORB keypoints, cross-checked matching and RANSAC (scikit-image) between consecutive frames, chained.
    Returns None when any pair cannot be matched (too few inliers); the caller then starts from identity.
    """
    from skimage.feature import ORB, match_descriptors
    from skimage.measure import ransac
    from skimage.transform import ProjectiveTransform, rescale

    grey = frames.mean(-1) if frames.ndim == 4 else frames
    h, w = grey.shape[1:3]
    factor = min(1.0, max_side / max(h, w))
    keypoints, descriptors = [], []
    for frame in grey:
        img = rescale(frame, factor, anti_aliasing=True) if factor < 1 else frame
        lo, hi = np.percentile(img, [0.5, 99.5])
        img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
        orb = ORB(n_keypoints=800, fast_threshold=0.05)
        try:
            orb.detect_and_extract(img)
        except RuntimeError:
            return None
        if len(orb.keypoints) < 12:
            return None
        keypoints.append(orb.keypoints[:, ::-1] / factor)  # (col, row) at full resolution
        descriptors.append(orb.descriptors)
    rng = np.random.default_rng(seed)
    chain = [np.eye(3)]
    for t in range(1, len(grey)):
        matches = match_descriptors(descriptors[t], descriptors[t - 1], cross_check=True, max_ratio=0.9)
        if len(matches) < 12:
            return None
        src, dst = keypoints[t][matches[:, 0]], keypoints[t - 1][matches[:, 1]]
        model, inliers = ransac((src, dst), ProjectiveTransform, min_samples=4, residual_threshold=2.0 / factor,
                                max_trials=2000, rng=rng)
        if model is None or inliers is None or inliers.sum() < 10:
            return None
        chain.append(chain[-1] @ model.params)
    out = np.asarray(chain)
    return out / out[:, 2:3, 2:3]
