"""build.py: the aligned start (a short fit of reduced frames before a large fusion)."""
from __future__ import annotations

import numpy as np
import torch

import napari_nir as nir
from napari_nir._sample_data import corner_error, homography_burst
from napari_nir.core import build
from napari_nir.core.presets import preset_config, separation_config


def test_aligns_first_only_for_feature_started_fusion_of_large_frames():
    assert preset_config("homography", "fast").motion.align_size == 0  # off unless asked for
    fast = preset_config("homography", "fast", align_size=512)
    assert build.aligns_first(fast, 600, 400)
    assert not build.aligns_first(fast, 512, 300)  # not longer than align_size
    assert not build.aligns_first(fast.replace(align_size=0), 2000, 2000)
    assert not build.aligns_first(fast.replace(init="identity"), 2000, 2000)
    assert not build.aligns_first(preset_config("rigid", "fast", align_size=512), 2000, 2000)  # phase start + polish
    assert not build.aligns_first(separation_config("reflection", "fast", align_size=512), 2000, 2000)
    assert not build.aligns_first(preset_config("homography", "paper", align_size=512), 2000, 2000)  # identity
    # the flow's homography base starts from features
    assert build.aligns_first(preset_config("flow", "fast", align_size=512), 2000, 2000)


def test_large_fusion_starts_from_the_reduced_fit(monkeypatch):
    """A burst longer than align_size runs the reduced fit once, from the feature start, and the full-size fit
    that starts from its motion aligns the frames."""
    sample = homography_burst(4, (96, 96), seed=7)
    calls = []
    original = build.aligned_start

    def spy(frames, config, device, init, skip=()):
        out = original(frames, config, device, init, skip)
        calls.append((frames.shape, init.copy(), out.copy()))
        return out

    monkeypatch.setattr(build, "aligned_start", spy)
    fit = nir.fuse(sample.frames, "homography", seed=0, steps=150, align_size=48)
    assert len(calls) == 1
    shape, start, aligned = calls[0]
    assert shape == (4, 96, 96, 3)
    assert not np.allclose(start, aligned)  # the reduced fit moved the start
    error = corner_error(fit.homographies, sample.homographies, (96, 96))
    assert np.median(error) < 0.1, error
    assert fit.config.motion.align_size == 48  # recorded in the provenance's parameters
    nir.fuse(sample.frames, "homography", seed=0, steps=5)  # the default: off
    assert len(calls) == 1


def test_a_start_that_spreads_the_frames_over_many_frame_widths_is_not_believed(monkeypatch):
    """A wrong start chained into a canonical domain 20 frames wide once asked for 22 GB of grid: the identity
    start takes over instead, and the domain stays a few frames wide."""
    sample = homography_burst(3, (32, 32), seed=0)
    config = preset_config("homography", "fast")
    sane = build.build_model(sample.frames, config, torch.device("cpu")).domain
    wild = np.repeat(np.eye(3)[None], 3, 0)
    wild[2, 0, 2] = 20.0  # normalised units: 10 frame widths to the right
    monkeypatch.setattr(build, "initial_homographies", lambda frames, config, norm, skip: (wild, {}))
    domain = build.build_model(sample.frames, config, torch.device("cpu")).domain
    assert domain[1] - domain[0] < 2 * (sane[1] - sane[0]), (domain, sane)
