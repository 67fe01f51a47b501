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

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from .diagnostics import correlation, reduce_frames
from .fields import Siren, coarse_to_fine, pyramid_shapes, sample_levels
from .geometry import apply_homography, time_coordinate
from .stages import check_stop


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


class LieHomography(nn.Module):
    """Per-frame homographies in normalised coordinates, H_t = expm(A_t), mean_t A_t = 0.

    generators: which of the 8 sl(3) generators the motion may use (default: all, a homography); a prefix
    gives the subgroups: (0, 1) translation, (0, 1, 2) rigid, (0, 1, 2, 3) similarity, (0, ..., 5) affine. A start
    ``init`` is projected onto them (its other Lie coefficients dropped).
    """

    kind = "homography"

    def __init__(self, n_frames: int, init: np.ndarray | None = None, generators: tuple[int, ...] | None = None):
        super().__init__()
        every = _sl3_generators()
        self.register_buffer("generators", every if generators is None else every[list(generators)])
        start = torch.zeros(n_frames, len(self.generators), dtype=torch.float64)
        if init is not None:
            coefficients = algebra_coefficients(init)
            start = torch.as_tensor(coefficients if generators is None else coefficients[:, list(generators)],
                                    dtype=torch.float64)
        self.coeffs = nn.Parameter(start)

    def matrices(self) -> torch.Tensor:
        """(T, 3, 3) float64 normalised frame -> canonical homographies (gauge applied)."""
        a = self.coeffs - self.coeffs.mean(0, keepdim=True)
        return torch.linalg.matrix_exp(torch.einsum("ti,ijk->tjk", a, self.generators))

    def forward(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        return apply_homography(self.matrices(), frame_index, xy)

    def smoothness(self) -> None:
        """None: a homography has no flow prior."""
        return None

    def set_progress(self, progress: float, ramp: float) -> None:
        """No schedule: a homography has no levels to fade in."""

    def point_floats(self) -> tuple[float, float]:
        """(training, forward-only) floats per point: (N, 3, 3) float64 gathered matrices and intermediates."""
        return 30.0, 20.0


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

    smoothness = LieHomography.smoothness
    set_progress = LieHomography.set_progress
    point_floats = LieHomography.point_floats


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


def feature_homographies(frames: np.ndarray, *, max_side: int = 512, seed: int = 0,
                         links: bool = False) -> np.ndarray | None:
    """Feature-based start: (T, H, W[, C]) frames in [0, 1] -> (T, 3, 3) pixel homographies frame t -> frame 0.

    ORB keypoints, cross-checked matching and RANSAC (scikit-image) between consecutive frames, chained.
    Returns None when any pair cannot be matched (too few inliers); the caller then starts from identity.
    links=True: instead, the (T-1) list of (link homography frame t -> frame t-1, its RANSAC inliers: (N, 2) frame-t
    points and (N, 2) frame-(t-1) points, (col, row) pixels), None where a pair could not be matched
    (``robust_start`` fills those by phase correlation).
    """
    from skimage.feature import ORB
    from skimage.measure import ransac
    from skimage.transform import ProjectiveTransform, rescale

    grey = frames.mean(-1) if frames.ndim == 4 else frames
    h, w = grey.shape[1:3]
    factor = min(1.0, max_side / max(h, w))

    def detect(frame):
        img = rescale(frame, factor, anti_aliasing=True) if factor < 1 else frame
        lo, hi = np.percentile(img, [0.5, 99.5])
        img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
        orb = ORB(n_keypoints=800, fast_threshold=0.05)
        try:
            orb.detect_and_extract(img)
        except RuntimeError:
            return None, None
        if len(orb.keypoints) < 12:
            return None, None
        return orb.keypoints[:, ::-1] / factor, orb.descriptors  # (col, row) at full resolution

    keypoints, descriptors = [], []
    # frames in threads (as many as torch may use: one in a Dask worker): scikit-image's ORB releases the GIL in
    # most of its work, 1.3-1.5x faster on 2 cores with the same keypoints; the stop flag is read here, per frame
    pool = ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(grey))))
    try:
        for found, described in pool.map(detect, grey):
            check_stop()
            keypoints.append(found)
            descriptors.append(described)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a stop drops the frames not yet started
    rng = np.random.default_rng(seed)
    found: list = []
    for t in range(1, len(grey)):
        check_stop()
        model = inliers = src = dst = None
        if descriptors[t] is not None and descriptors[t - 1] is not None:
            matches = match_binary(descriptors[t], descriptors[t - 1], max_ratio=0.9)
            if len(matches) >= 12:
                src, dst = keypoints[t][matches[:, 0]], keypoints[t - 1][matches[:, 1]]
                model, inliers = ransac((src, dst), ProjectiveTransform, min_samples=4,
                                        residual_threshold=2.0 / factor, max_trials=2000, rng=rng)
                if model is None or inliers is None or inliers.sum() < 10 or not plausible_link(model.params, w, h):
                    model = None
        if model is None and not links:
            return None
        found.append(None if model is None else (model.params, src[inliers], dst[inliers]))
    if links:
        return found
    return _chain([link for link, _, _ in found])


MAX_LINK_ZOOM = 2.0  # a link between neighbouring frames that changes the frame's area by more is not believed


def plausible_link(link: np.ndarray, width: int, height: int) -> bool:
    """Whether a (3, 3) pixel homography frame t -> frame t-1 could be a camera's motion between neighbouring
    frames: every corner of the (width, height) frame stays in front (w > 0), the mapped frame stays convex, and its
    area changes by at most ``MAX_LINK_ZOOM`` either way. RANSAC can agree on a wrong model over repeated texture
    (a lattice, a brick wall): such a link, zooming 2.4x with strong perspective, once chained into a canonical
    domain thousands of frames wide (22 GB of grid); refused, the pair falls back to phase correlation."""
    corners = np.array([[0, 0, 1], [width - 1, 0, 1], [width - 1, height - 1, 1], [0, height - 1, 1]], float).T
    q = np.asarray(link, float) @ corners
    if not np.all(np.isfinite(q)) or np.any(q[2] <= 0):
        return False
    x, y = q[0] / q[2], q[1] / q[2]
    edges = np.stack([np.roll(x, -1) - x, np.roll(y, -1) - y])
    turns = edges[0] * np.roll(edges[1], -1) - edges[1] * np.roll(edges[0], -1)
    if not (np.all(turns > 0) or np.all(turns < 0)):
        return False
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    ratio = area / max((width - 1) * (height - 1), 1)
    return 1 / MAX_LINK_ZOOM <= ratio <= MAX_LINK_ZOOM


def match_binary(first: np.ndarray, second: np.ndarray, max_ratio: float = 0.9) -> np.ndarray:
    """Cross-checked nearest neighbours of binary descriptors, (N1, B) and (N2, B) bool -> (M, 2) index pairs.

    The same matches as scikit-image's ``match_descriptors(first, second, cross_check=True, max_ratio=...)``
    (Hamming distance, the first of equal minima, the ratio test on best / second best), computed on bits packed
    into 64-bit words with a population count: scikit-image's float distance matrix (scipy's ``cdist``) took 42 ms
    a pair of 800 ORB descriptors, a third of the feature start (benchmarks/DECISIONS.md, "fixed costs").
    """
    if len(first) == 0 or len(second) == 0:
        return np.empty((0, 2), dtype=np.intp)

    def words(bits):
        packed = np.packbits(np.asarray(bits, dtype=bool), axis=1)
        pad = (-packed.shape[1]) % 8
        return np.pad(packed, ((0, 0), (0, pad))).view(np.uint64)

    a, b = words(first), words(second)
    distance = np.zeros((len(a), len(b)), dtype=np.int32)
    for k in range(a.shape[1]):  # one word at a time: no (N1, N2, words) temporary
        distance += np.bitwise_count(a[:, None, k] ^ b[None, :, k])
    rows = np.arange(len(a))
    cols = np.argmin(distance, axis=1)
    mutual = np.argmin(distance, axis=0)[cols] == rows
    rows, cols = rows[mutual], cols[mutual]
    if max_ratio < 1.0 and len(b) > 1:
        best = distance[rows, cols].astype(np.float64)
        others = distance[rows].astype(np.float64)
        others[np.arange(len(rows)), cols] = np.inf
        runner_up = others.min(axis=1)
        runner_up[runner_up == 0] = np.finfo(np.float64).eps
        keep = best / runner_up < max_ratio
        rows, cols = rows[keep], cols[keep]
    return np.column_stack((rows, cols))


def _chain(links: list[np.ndarray]) -> np.ndarray:
    """(T-1) link maps frame t -> frame t-1 -> (T, 3, 3) maps frame t -> frame 0, normalised to [2, 2] = 1."""
    chain = [np.eye(3)]
    for link in links:
        chain.append(chain[-1] @ link)
    out = np.asarray(chain)
    return out / out[:, 2:3, 2:3]


def shift_agreement(previous: np.ndarray, current: np.ndarray, shift) -> tuple[float, float]:
    """(correlation, overlap) of frame ``current`` moved by ``shift`` = (d_col, d_row) onto ``previous`` (current
    pixel + shift -> previous pixel, rounded to whole pixels): zero-mean normalised correlation over the pixels
    both frames cover, and those pixels' fraction of the frame. -1 when they share under 64 pixels."""
    h, w = previous.shape
    dx, dy = (int(round(float(v))) for v in shift)
    if abs(dx) >= w or abs(dy) >= h:
        return -1.0, 0.0
    rows = slice(max(0, -dy), min(h, h - dy))
    cols = slice(max(0, -dx), min(w, w - dx))
    a = current[rows, cols]
    b = previous[rows.start + dy:rows.stop + dy, cols.start + dx:cols.stop + dx]
    if a.size < 64:
        return -1.0, a.size / (h * w)
    return correlation(a, b), a.size / (h * w)


def _translation_link(previous: np.ndarray, current: np.ndarray, tapered: tuple[np.ndarray, np.ndarray]):
    """Shift (d_col, d_row) current -> previous in reduced pixels, and its correlation.

    Phase correlation finds a shift modulo the frame size: a drift of more than half a frame comes back wrapped
    (e.g. -186 px for +198 px in 384 px frames). Every unwrapped alternative is scored by the correlation over
    the overlap it implies; the direct reading is kept unless an alternative correlates clearly better."""
    from skimage.registration import phase_cross_correlation

    shift, _, _ = phase_cross_correlation(tapered[0], tapered[1], upsample_factor=10)
    dy, dx = shift
    h, w = previous.shape
    direct = np.array([dx, dy])
    best, best_score = direct, shift_agreement(previous, current, direct)[0]
    for ox in (-w, 0, w):
        for oy in (-h, 0, h):
            if ox == oy == 0:
                continue
            candidate = np.array([dx + ox, dy + oy])
            score, overlap = shift_agreement(previous, current, candidate)
            if overlap >= 0.05 and score > best_score + 0.1:
                best, best_score = candidate, score
    return best, best_score


def phase_translations(frames: np.ndarray, *, max_side: int = 256) -> np.ndarray:
    """Drift start: (T, H, W[, C]) frames in [0, 1] -> (T, 3, 3) pixel translations frame t -> frame 0.

    Phase correlation (scikit-image's ``phase_cross_correlation``, 1/10 px) between consecutive frames, chained;
    frames averaged over channels, reduced to at most ``max_side`` pixels (block means) and tapered by a Tukey
    window (flat in the middle 70 %: a Hann window biases large shifts towards zero) so that the frame edges do
    not correlate. Shifts beyond half a frame are unwrapped (``_translation_link``). A start, within a pixel or
    two; the fit refines it.
    """
    links = [link for link, _ in _phase_links(frames, max_side)]
    return _chain(links)


def _phase_links(frames: np.ndarray, max_side: int = 256) -> list[tuple[np.ndarray, float]]:
    """(T-1) (translation frame t -> frame t-1 in input pixels (3x3), correlation) by phase correlation."""
    from scipy.signal.windows import tukey

    small, k = reduce_frames(frames, max_side)
    window = np.outer(tukey(small.shape[1], 0.3), tukey(small.shape[2], 0.3))
    tapered = (small - small.mean((1, 2), keepdims=True)) * window
    out = []
    for t in range(1, len(small)):
        check_stop()
        shift, score = _translation_link(small[t - 1], small[t], (tapered[t - 1], tapered[t]))
        link = np.eye(3)
        link[:2, 2] = shift * k  # (d_col, d_row): frame t pixel + shift -> frame t-1 pixel
        out.append((link, score))
    return out


def robust_start(frames: np.ndarray, *, seed: int = 0, min_correlation: float = 0.3,
                 skip=()) -> tuple[np.ndarray | None, dict]:
    """Homography start that survives large motion, featureless pairs and blank frames: (T, 3, 3) frame t ->
    frame 0 (or the first frame not skipped), and a report {"features": links from ORB, "phase": links from phase
    correlation, "failed": links from neither, "matches": {t: (frame-t points, frame-(t-1) points) of the RANSAC
    inliers of each feature link between consecutive frames}} (links named by their later frame).

    Each pair of neighbouring frames takes ORB + RANSAC (``feature_homographies``) where it matches; a pair it
    cannot match (too little texture in the overlap, motion beyond the matcher) takes phase correlation's
    translation, unwrapped past half a frame, when that correlates at least ``min_correlation`` over the overlap;
    a pair neither explains keeps the identity. None (identity start) only when no pair was explained.
    skip: frames with nothing to match (blank): the chain links their neighbours to each other across them, and a
    skipped frame starts at its previous neighbour's pose."""
    skipped = set(int(t) for t in skip)
    keep = [t for t in range(len(frames)) if t not in skipped]
    if len(keep) < 2:
        keep, skipped = list(range(len(frames))), set()
    chain, sub_report = _linked_start(frames[keep] if skipped else frames, seed, min_correlation)
    report = {key: [keep[i] for i in sub_report[key]] for key in ("features", "phase", "failed")}
    report["matches"] = {keep[i]: m for i, m in sub_report["matches"].items() if keep[i] - keep[i - 1] == 1}
    if chain is None:
        return None, report
    out = np.empty((len(frames), 3, 3))
    out[keep] = chain
    for t in sorted(skipped):
        before = [k for k in keep if k < t]
        out[t] = out[before[-1] if before else keep[0]]
    return out, report


def _linked_start(frames: np.ndarray, seed: int, min_correlation: float) -> tuple[np.ndarray | None, dict]:
    """``robust_start`` over consecutive frames (indices in ``frames``)."""
    found = feature_homographies(frames, seed=seed, links=True)
    report = {"features": [], "phase": [], "failed": [],
              "matches": {t: (m[1], m[2]) for t, m in enumerate(found, start=1) if m is not None}}
    if all(m is not None for m in found):
        report["features"] = list(range(1, len(frames)))
        return _chain([m[0] for m in found]), report
    phase = _phase_links(frames)
    links = []
    for t, matched in enumerate(found, start=1):
        link = None if matched is None else matched[0]
        if link is not None:
            report["features"].append(t)
        elif phase[t - 1][1] >= min_correlation:
            link = phase[t - 1][0]
            report["phase"].append(t)
        else:
            link = np.eye(3)
            report["failed"].append(t)
        links.append(link)
    if not report["features"] and not report["phase"]:
        return None, report
    return _chain(links), report


class FlowMotion(nn.Module):
    """W_t(x) = H_t x + g(x, t): an optional homography plus a smooth displacement field.

    g is a multiresolution grid over (x, y, t) (linear in t between ``knots`` time knots, so the flow is
    smooth over time), fine levels faded in coarse-to-fine like the canonical field. Its gauge: the mean
    over the time knots is removed, so no frame is the reference. With ``occlusion`` the grid has a third
    output, w = tanh(.), the depth coordinate of the occlusion-aware canonical f(x + dx, y + dy, w).
    Displacements are in normalised units (see ``Normaliser``).
    """

    def __init__(self, n_frames: int, domain, *, levels: int = 4, coarsest: float = 2.0, finest: float = 16.0,
                 knots: int = 0, base: LieHomography | None = None, occlusion: bool = False):
        super().__init__()
        self.n_frames = n_frames
        self.kind = "occlusion" if occlusion else "flow"
        self.base = base
        self.outputs = 3 if occlusion else 2
        self.knots = min(n_frames, knots) if knots > 0 else n_frames
        xmin, xmax, ymin, ymax = domain
        self.register_buffer("lo", torch.tensor([xmin, ymin], dtype=torch.float32))
        self.register_buffer("span", torch.tensor([xmax - xmin, ymax - ymin], dtype=torch.float32))
        self.grids = nn.ParameterList()
        self.spacing = []  # (dx, dy) normalised units per cell, per level
        for nx, ny in pyramid_shapes(xmin, xmax, ymin, ymax, levels, coarsest, finest):
            self.grids.append(nn.Parameter(torch.zeros(1, self.outputs, self.knots, ny, nx)))
            self.spacing.append(((xmax - xmin) / (nx - 1), (ymax - ymin) / (ny - 1)))
        self.register_buffer("level_weights", torch.ones(levels))
        # w moves through tanh(w_gain * raw): a gain > 1 lets w separate layers as fast as (x, y) move
        self.w_gain = 4.0
        # occlusion model: 0 during its warm-up (the homography alone, every pixel at w = 0: the background)
        self.register_buffer("displacement_on", torch.tensor(1.0), persistent=False)

    def set_progress(self, progress: float, ramp: float) -> None:
        coarse_to_fine(self.level_weights, progress, ramp)  # same schedule as the canonical field

    @property
    def levels(self) -> int:
        return len(self.grids)

    def displacement(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """(N, outputs) raw displacement (dx, dy[, w-logit]) at frame coordinates, gauge applied."""
        t = time_coordinate(frame_index, self.n_frames)
        unit = torch.cat([(xy.float() - self.lo) / self.span * 2 - 1, t[:, None]], 1)
        # the time gauge (no frame is the reference) is for (dx, dy) only: w's level is set by the occlusion
        # start (0 for the background), and removing its mean over time would push the background off 0
        # wherever an object passes (benchmarks/DECISIONS.md, "occlusion")
        centred = [torch.cat([g[:, :2] - g[:, :2].mean(2, keepdim=True), g[:, 2:]], 1) for g in self.grids]
        total = sample_levels(centred, unit, self.level_weights)
        return total.view(len(xy), self.levels, self.outputs).sum(1)

    def forward(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """(N,) frame indices, (N, 2) frame coordinates -> (N, 2) canonical (x, y), or (N, 3) with w."""
        base = xy if self.base is None else apply_homography(self.base.matrices(), frame_index, xy).float()
        d = self.displacement(frame_index, xy)
        if self.outputs == 3:
            d = d * self.displacement_on
        warped = base + d[:, :2]
        if self.outputs == 3:
            return torch.cat([warped, torch.tanh(self.w_gain * d[:, 2:3])], 1)
        return warped

    def smoothness(self) -> torch.Tensor:
        """Mean absolute Jacobian of g w.r.t. (x, y, t) by finite differences on the grids (the paper's
        flow prior, computed on the parameters rather than through autograd on sampled points)."""
        total = 0.0
        dt = 2.0 / max(self.knots - 1, 1)
        for level, (g, (sx, sy)) in enumerate(zip(self.grids, self.spacing)):
            w = self.level_weights[level]
            jx = (g[..., 1:] - g[..., :-1]).abs().mean() / sx
            jy = (g[..., 1:, :] - g[..., :-1, :]).abs().mean() / sy
            jt = (g[:, :, 1:] - g[:, :, :-1]).abs().mean() / dt if self.knots > 1 else 0.0
            total = total + w * (jx + jy + jt)
        return total

    def matrices(self) -> torch.Tensor:
        """The homography part (T, 3, 3) (identity when the model has none)."""
        if self.base is None:
            return torch.eye(3, dtype=torch.float64, device=self.lo.device).expand(self.n_frames, 3, 3)
        return self.base.matrices()

    def point_floats(self) -> tuple[float, float]:
        """(training, forward-only) floats per point: the displacement grids' samples plus the base's."""
        outs = sum(int(g.shape[1]) for g in self.grids)
        base = self.base.point_floats() if self.base is not None else (0.0, 0.0)
        return 6.0 * outs + 10.0 + base[0], 2.5 * outs + 6.0 + base[1]


class SirenFlow(nn.Module):
    """The paper's flow networks: g(x, y, t) a SIREN 3 -> 2 (flow) or 3 -> 3 (occlusion: dx, dy, w).

    W_t(x) = x + g(x, t); w = tanh(g_w). The Jacobian prior is computed by finite differences at random
    points (the official code differentiates through autograd; both estimate the same mean |dg/d(x,y,t)|).
    """

    def __init__(self, n_frames: int, *, occlusion: bool = False, width: int = 256, hidden_layers: int = 4,
                 omega0: float = 30.0, seed: int = 0):
        super().__init__()
        self.n_frames = n_frames
        self.kind = "occlusion" if occlusion else "flow"
        self.outputs = 3 if occlusion else 2
        self.net = Siren(3, self.outputs, width=width, hidden_layers=hidden_layers, omega0=omega0)
        self.generator = torch.Generator().manual_seed(seed + 7)
        self.w_gain = 1.0

    def displacement(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([xy.float(), time_coordinate(frame_index, self.n_frames)[:, None]], 1))

    def forward(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        d = self.displacement(frame_index, xy)
        warped = xy.float() + d[:, :2]
        if self.outputs == 3:
            return torch.cat([warped, torch.tanh(d[:, 2:3])], 1)
        return warped

    def smoothness(self, points: int = 1024, eps: float = 1e-2) -> torch.Tensor:
        device = next(self.parameters()).device
        p = (torch.rand(points, 3, generator=self.generator) * 2 - 1).to(device)
        base = self.net(p)
        total = 0.0
        for axis in range(3):
            shifted = p.clone()
            shifted[:, axis] += eps
            total = total + (self.net(shifted) - base).abs().mean() / eps
        return total

    def matrices(self) -> torch.Tensor:
        return torch.eye(3, dtype=torch.float64, device=next(self.parameters()).device).expand(self.n_frames, 3, 3)

    def set_progress(self, progress: float, ramp: float) -> None:
        """No schedule: the paper has none."""

    def point_floats(self) -> tuple[float, float]:
        return self.net.point_floats()


def layer_translations(residuals: np.ndarray, valid: np.ndarray, exclude_px: float = 3.0) -> tuple[np.ndarray, float]:
    """(T, 2) shifts d_t (col, row pixels) with residuals[t](y) ~ residuals[0](y + d_t), for a second layer
    seen through T residual images (T, H, W) that are already aligned on the first layer, and a score: the
    median over pairs of how many standard deviations the correlation peak stands out of its surface (about
    4-5 for images without a common moving layer; 10-25 for a rigidly moving one, see separate.py).

    Every pair is phase-correlated and the (T, 2) shifts solved by least squares over the pairs, twice,
    the second time without pairs off by more than 3 px. The correlation peak within ``exclude_px`` of zero
    shift is suppressed: whatever the first layer left in the residuals (its fitting error, the part of the
    second layer it absorbed) is aligned in every image and peaks there. That suppression is why this is
    not skimage's phase_cross_correlation, which always returns the highest peak.
    valid: (H, W) bool, where every residual image has data.
    """
    t_count, h, w = residuals.shape
    window = np.outer(np.hanning(h), np.hanning(w)) * valid
    # what is aligned in every image (the first layer's fitting error, what it absorbed of the second) is the
    # same in all of them: without it, it neither pulls the peak nor dilutes the score
    residuals = residuals - residuals.mean(0)
    spectra = np.fft.fft2((residuals - residuals[:, valid].mean(1)[:, None, None]) * window)
    rows = np.fft.fftfreq(h, 1 / h)[:, None]
    cols = np.fft.fftfreq(w, 1 / w)[None, :]
    near_zero = rows**2 + cols**2 <= exclude_px**2
    pairs, shifts, scores = [], [], []
    for s in range(t_count):
        for t in range(s + 1, t_count):
            cross = spectra[s] * np.conj(spectra[t])
            surface = np.real(np.fft.ifft2(cross / (np.abs(cross) + 1e-3 * np.abs(cross).max())))
            surface[near_zero] = np.nan
            r, c = np.unravel_index(np.nanargmax(surface), surface.shape)
            shifts.append((cols[0, c], rows[r, 0]))  # t(y) ~ s(y + d)
            pairs.append((s, t))
            # how far the peak stands out of the whitened surface, in standard deviations: the largest of N
            # values of a peak-free surface stands about sqrt(2 ln N) ~ 4-5 out, whatever the image size
            scores.append((surface[r, c] - np.nanmean(surface)) / max(np.nanstd(surface), 1e-12))
    shifts = np.asarray(shifts, float)
    design = np.zeros((len(pairs), t_count))
    for k, (s, t) in enumerate(pairs):
        design[k, t], design[k, s] = 1.0, -1.0
    design = np.vstack([design, np.eye(1, t_count)])  # gauge: d_0 = 0
    target = np.vstack([shifts, np.zeros((1, 2))])
    keep = np.ones(len(target), bool)
    for _ in range(2):
        solution = np.linalg.lstsq(design[keep], target[keep], rcond=None)[0]
        error = np.linalg.norm(design @ solution - target, axis=1)
        keep = error <= 3.0
        keep[-1] = True
        if np.linalg.matrix_rank(design[keep]) < t_count:  # a frame lost all its pairs: keep the last solution
            break
    return solution, float(np.median(scores))
