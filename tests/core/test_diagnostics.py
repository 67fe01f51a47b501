"""fit.diagnostics(): a converged-but-wrong alignment is called doubtful, a good one good; blank and saturated
frames are named; the start survives drifts beyond half a frame (core/diagnostics.py, core/motion.py)."""
from __future__ import annotations

import numpy as np
import pytest

import napari_nir as nir
from napari_nir.core import diagnostics, motion


def test_a_good_fit_is_called_good(small_fit):
    found = small_fit.diagnostics()
    assert found.verdict == "ok", found.reasons
    assert found.residual.shape == (5, 64, 64) and found.residual.dtype == np.float32
    assert all(r["shift_px"] == 0.0 for r in found.frames[:-1])
    assert small_fit.diagnostics() is found  # computed once


def test_a_converged_but_wrong_alignment_is_called_doubtful(small_sample):
    """Frame 2 starts 25 px off and the fit keeps it there (the field has room for it): before, nothing said so."""
    wrong = np.repeat(np.eye(3)[None], 5, 0)
    wrong[2, 0, 2] = 25.0
    fit = nir.fuse(small_sample.frames, steps=20, init=wrong, preview_every=0)
    found = fit.diagnostics()
    assert found.verdict == "doubtful"
    assert any("frames 1 and 2" in r or "frames 2 and 3" in r for r in found.reasons), found.reasons


def test_blank_and_saturated_frames_are_named():
    rng = np.random.default_rng(0)
    frames = rng.uniform(0.2, 0.8, (6, 32, 32)).astype(np.float32)
    frames[2] = 0.5                                    # blank
    frames[4, :, :20] = 1.0                            # more than half clipped at the burst's maximum
    assert diagnostics.unusable_frames(frames) == {2: "blank", 4: "saturated"}


def test_diagnostics_need_the_input(tmp_path, small_fit):
    small_fit.save(tmp_path / "fit.npz")
    with pytest.raises(ValueError, match="loaded from a file"):
        nir.load(tmp_path / "fit.npz").diagnostics()


def _drifting(step: int, side: int = 192, frames: int = 4, seed: int = 0, smooth: float = 1.5):
    """Frames of a textured image drifting ``step`` px per frame (+- 12 px jitter); offsets (row, col)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    base = gaussian_filter(rng.standard_normal((side + 40, side + step * frames + 40)), smooth)
    offsets = [(int(20 + rng.integers(-12, 13)), int(20 + t * step + rng.integers(-12, 13))) for t in range(frames)]
    stack = np.stack([base[r:r + side, c:c + side] for r, c in offsets]).astype(np.float32)
    return (stack - stack.min()) / (stack.max() - stack.min()), offsets


def test_phase_start_unwraps_drifts_beyond_half_a_frame():
    """A 110 px drift in 192 px frames: phase correlation alone reads -82 px (modulo the frame)."""
    stack, offsets = _drifting(110)
    found = motion.phase_translations(stack)[:, :2, 2]
    truth = np.array([[c - offsets[0][1], r - offsets[0][0]] for r, c in offsets])
    assert np.abs(found - truth).max() <= 1.5


def test_robust_start_fills_links_the_features_miss():
    """Featureless pairs (a smooth field: ORB finds no corners) take the phase link instead of failing the whole
    start (before: identity for every frame)."""
    stack, offsets = _drifting(110, smooth=8.0)
    assert motion.feature_homographies(stack) is None
    start, report = motion.robust_start(stack)
    assert report["phase"] and not report["failed"]
    truth = np.array([[c - offsets[0][1], r - offsets[0][0]] for r, c in offsets])
    assert np.abs(start[:, :2, 2] - truth).max() <= 1.5


def test_match_residuals_see_a_systematic_offset_through_keypoint_noise():
    """Keypoints found to about half a pixel: the median distance keeps that noise, the median vector does not."""
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (200, 2))
    dst = src + rng.normal(0, 0.6, src.shape)          # frame t points of frame t+1's keypoints, truth: identity
    pair_maps = np.repeat(np.eye(3)[None], 1, 0)
    right = diagnostics.match_residuals(pair_maps, {1: (dst, src)})[0]
    off = pair_maps.copy()
    off[0, 0, 2] = -1.5                                  # a fitted map 1.5 px off
    wrong = diagnostics.match_residuals(off, {1: (dst, src)})[0]
    assert right[0] < 0.2 and abs(wrong[0] - 1.5) < 0.2 and wrong[1] == 200


# -- layer separation: the rule on arrays (core/diagnostics.py, separation_diagnostics) ----------------------
def _separated_arrays(seed=0):
    """A 4-frame 24 x 24 RGB burst: a textured scene plus a sparse bright interference that changes per frame;
    a perfect fit's reconstruction, scene and alpha."""
    rng = np.random.default_rng(seed)
    scene = rng.uniform(0.2, 0.7, (4, 24, 24, 3)).astype(np.float32)
    alpha = np.zeros((4, 24, 24), np.float32)
    for t in range(4):
        alpha[t, rng.integers(0, 24, 30), rng.integers(0, 24, 30)] = 0.8
    frames = (1 - alpha[..., None]) * scene + alpha[..., None]
    return frames, frames.copy(), scene, alpha


def test_a_separation_that_explains_its_frames_is_ok():
    frames, recon, scene, alpha = _separated_arrays()
    found = diagnostics.separation_diagnostics(frames, recon, scene, alpha, sparse=True, scene_motion_px=4.0)
    assert found.verdict == "ok" and found["verdict"] == "ok", found.reasons
    assert found["residual"].shape == (4, 24, 24) and found.residual.dtype == np.float32
    assert found.summary()["checks"]["interference_share"] < 0.5


def test_unexplained_frames_are_named():
    frames, recon, scene, alpha = _separated_arrays()
    recon[2, :12] += 0.3  # half of frame 2 is off by 0.3
    found = diagnostics.separation_diagnostics(frames, recon, scene, alpha, sparse=True, scene_motion_px=4.0)
    assert found.verdict == "doubtful"
    assert any("does not explain frame(s) 2" in r for r in found.reasons), found.reasons
    assert found.residual[2, :12].mean() == pytest.approx(0.3, abs=1e-5)


def test_swapped_layers_are_doubtful():
    frames, recon, scene, alpha = _separated_arrays()
    flat = np.full_like(scene, 0.5)  # the "scene" is flat, the "interference" took the picture
    found = diagnostics.separation_diagnostics(frames, recon, flat, None, sparse=False, scene_motion_px=4.0)
    assert found.verdict == "doubtful" and any("swapped" in r for r in found.reasons), found.reasons


def test_an_obstruction_that_covers_most_of_the_frame_is_doubtful():
    frames, recon, scene, alpha = _separated_arrays()
    dense = np.full_like(alpha, 0.9)
    found = diagnostics.separation_diagnostics(frames, recon, scene, dense, sparse=True, scene_motion_px=4.0)
    assert any("sparse" in r for r in found.reasons), found.reasons
    assert not diagnostics.separation_diagnostics(frames, recon, scene, dense, sparse=False,
                                                  scene_motion_px=4.0).reasons  # not asked of a non-sparse task


def test_layers_that_do_not_move_cannot_be_told_apart():
    frames, recon, scene, alpha = _separated_arrays()
    alpha[:] = alpha[0]  # the same interference in every frame ...
    frames = (1 - alpha[..., None]) * scene[:1] + alpha[..., None]
    scene = np.repeat(scene[:1], 4, 0)
    still = diagnostics.separation_diagnostics(frames, frames, scene, alpha, sparse=True, scene_motion_px=0.1)
    assert any("neither layer moves" in r for r in still.reasons), still.reasons
    moving = diagnostics.separation_diagnostics(frames, frames, scene, alpha, sparse=True, scene_motion_px=3.0)
    assert moving.verdict == "ok", moving.reasons  # ... is fine when the scene moves under it
    empty = diagnostics.separation_diagnostics(frames, frames, frames, alpha * 0, sparse=True, scene_motion_px=0.1)
    assert empty.verdict == "ok", empty.reasons  # nothing moves and nothing was taken out: the input, unharmed
