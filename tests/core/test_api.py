"""napari_nir.fuse and FusionResult: the public contract (README "Use it", docs/architecture.md) on small, fast fits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_nir as nir
from napari_nir._sample_data import corner_error, homography_burst


def test_fuse_recovers_homographies_and_reconstructs(small_sample, small_fit):
    errors = corner_error(small_fit.homographies, small_sample.homographies, (64, 64))
    assert np.median(errors) < 0.3, errors
    assert small_fit.final_psnr > 30
    frames = small_fit.frames()
    assert frames.shape == small_sample.frames.shape and frames.dtype == np.float32
    psnr = -10 * np.log10(np.mean((frames - small_sample.frames) ** 2))
    assert psnr > 30


def test_history_and_provenance(small_fit):
    assert [h["step"] for h in small_fit.history] == list(range(1, 201))
    assert set(small_fit.history[0]) == {"step", "seconds", "loss", "psnr"}
    assert small_fit.history[-1]["psnr"] > small_fit.history[0]["psnr"] + 10
    prov = small_fit.provenance()
    assert prov["parameters"]["steps"] == 200 and prov["seed"] == 0 and prov["version"] == nir.__version__
    assert prov["final_psnr_db"] == pytest.approx(small_fit.final_psnr, abs=1e-3)
    import json

    json.dumps(prov)  # JSON-able


def test_homographies_map_frames_into_the_union_canonical(small_fit):
    h = small_fit.homographies
    assert h.shape == (5, 3, 3) and h.dtype == np.float64
    union = small_fit.canonical(extent="union")
    outlines = small_fit.outlines()  # (T, 4, 2) row, col
    assert outlines.shape == (5, 4, 2)
    assert outlines[..., 0].min() >= -1 and outlines[..., 0].max() <= union.shape[0] + 1
    assert outlines[..., 1].min() >= -1 and outlines[..., 1].max() <= union.shape[1] + 1
    # frame 0's centre maps, through its homography, onto the outline quadrilateral's interior
    c = h[0] @ np.array([31.5, 31.5, 1.0])
    assert outlines[0, :, 1].min() < c[0] / c[2] < outlines[0, :, 1].max()
    # frame-to-frame maps compose
    np.testing.assert_allclose(small_fit.frame_to_frame(1, 2) @ small_fit.frame_to_frame(0, 1),
                               small_fit.frame_to_frame(0, 2) * (small_fit.frame_to_frame(1, 2)
                                                                 @ small_fit.frame_to_frame(0, 1))[2, 2], atol=1e-6)


def test_canonical_extents_and_scale(small_sample, small_fit):
    first = small_fit.canonical(extent="first")
    assert first.shape == (64, 64, 3)
    # frame 0's field of view of the canonical view looks like frame 0 (exposure is averaged out)
    assert -10 * np.log10(np.mean((first - small_sample.frames[0]) ** 2)) > 25
    sr = small_fit.canonical(extent="first", scale=2)
    assert sr.shape == (128, 128, 3)
    union = small_fit.canonical()
    assert union.shape[0] >= 64 and union.shape[1] >= 64
    with pytest.raises(ValueError, match="extent"):
        small_fit.canonical(extent="everything")
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="scale"):
            small_fit.canonical(scale=bad)


def test_same_seed_is_bit_identical_and_seeds_differ():
    sample = homography_burst(3, (32, 32), seed=5)
    a = nir.fuse(sample.frames, steps=15, device="cpu", seed=1, init="identity")
    b = nir.fuse(sample.frames, steps=15, device="cpu", seed=1, init="identity")
    c = nir.fuse(sample.frames, steps=15, device="cpu", seed=2, init="identity")
    assert np.array_equal(a.frames(), b.frames())
    assert np.array_equal(a.homographies, b.homographies)
    assert not np.array_equal(a.frames(), c.frames())


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float64])
def test_output_dtype_and_units_follow_the_input(dtype):
    sample = homography_burst(3, (32, 32), grey=True, seed=2)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -1000), min(info.max, 4000)
        burst = (sample.frames * (hi - lo) + lo).round().astype(dtype)
    else:
        burst = (sample.frames * 300 - 50).astype(dtype)
    before = burst.copy()
    fit = nir.fuse(burst, steps=60, device="cpu", init="identity")
    frames = fit.frames()
    assert frames.shape == burst.shape and frames.dtype == burst.dtype
    assert np.array_equal(burst, before)
    err = np.abs(frames.astype(np.float64) - burst).mean() / (float(burst.max()) - float(burst.min()))
    assert err < 0.05
    assert fit.frames(dtype="float32").dtype == np.float32
    assert fit.canonical().dtype == burst.dtype


def test_dask_and_read_only_input(small_sample):
    da = pytest.importorskip("dask.array")
    frames = small_sample.frames[:3, :32, :32].copy()
    frames.setflags(write=False)
    fit = nir.fuse(da.from_array(frames, chunks=(1, 32, 32, 3)), steps=5, device="cpu", init="identity")
    assert fit.frames().shape == frames.shape
    fit2 = nir.fuse(frames, steps=5, device="cpu", init="identity")
    assert fit2.frames().shape == frames.shape


def test_callback_progress_preview_and_cancel(small_sample):
    events = []

    def callback(event):
        events.append(event)
        return False if event.step == 7 else None

    fit = nir.fuse(small_sample.frames[:3], steps=50, device="cpu", init="identity", callback=callback,
                   preview_every=5)
    assert [e.step for e in events] == list(range(1, 8))
    assert all(e.total == 50 for e in events)
    assert events[4].preview is not None and events[4].preview.ndim == 3 and events[3].preview is None
    assert not fit.completed and len(fit.history) == 7
    assert fit.frames().shape == small_sample.frames[:3].shape  # a cancelled fit still renders


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"motion": "warp"}, ValueError, "unknown motion"),
        ({"task": "rain"}, TypeError, "not for fusion"),
        ({"preset": "slow"}, ValueError, "unknown preset"),
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": -5}, ValueError, "steps"),
        ({"steps": 2.5}, TypeError, "steps"),
        ({"seed": -1}, ValueError, "seed"),
        ({"device": "tpu"}, ValueError, "unknown device"),
        ({"device": 3}, TypeError, "device"),
        ({"callback": 5}, TypeError, "callback"),
        ({"colour": "red"}, TypeError, "unknown option"),
        # the reliability review's small items: each was accepted, or died mid-run with another error
        ({"seed": 2**64 - 1}, ValueError, r"seed must be <= 4_294_967_295"),
        ({"steps": 10**9}, ValueError, r"steps must be <= 100_000"),
        ({"value_range": (0, 1e-300)}, ValueError, r"value_range.*at least 0.001 apart"),
        ({"value_range": (-1e308, 1e308)}, ValueError, r"value_range.*within \+-1000"),
        ({"working_size": -5}, ValueError, r"working_size=-5 is invalid"),
        ({"threads": -1}, ValueError, "threads"),
    ],
)
def test_bad_parameters_are_explained(small_sample, kwargs, error, match):
    burst = small_sample.frames[:2, :16, :16]
    before = burst.copy()
    with pytest.raises(error, match=match):
        nir.fuse(burst, **kwargs)
    assert np.array_equal(burst, before)


def test_cuda_requested_without_gpu_is_explained():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        nir.fuse(np.random.rand(2, 16, 16), device="cuda")


def test_paper_preset_matches_the_official_configuration(small_sample):
    from napari_nir.core.build import build_model
    from napari_nir.core.fields import Siren
    from napari_nir.core.motion import MLPHomography
    from napari_nir.core.presets import preset_config

    cfg = preset_config("homography", "paper")
    names = ("steps", "lr_field", "lr_motion", "batch", "loss", "value_range", "working_size")
    assert tuple(cfg.get(name) for name in names) == (
        3000, 1e-4, 1e-4, -4, "mse", (-1.0, 1.0), 512)
    model = build_model(small_sample.frames, cfg, __import__("torch").device("cpu"))
    assert isinstance(model.field, Siren) and isinstance(model.motion, MLPHomography)
    sine = [m for m in model.field.body]
    assert len(sine) == 4 and all(m.linear.out_features == 256 and m.omega0 == 30 for m in sine)
    widths = [m.out_features for m in model.motion.net if hasattr(m, "out_features")]
    assert widths == [256, 256, 256, 8]
    fit = nir.fuse(small_sample.frames[:2, :32, :32], preset="paper", steps=3, device="cpu")
    assert len(fit.history) == 3 and fit.config.preset == "paper"


def test_feature_prefilter_is_validated_and_recorded():
    frames = homography_burst(3, (32, 32), seed=0).frames
    with pytest.raises(ValueError, match="feature_prefilter"):
        nir.fuse(frames, steps=2, device="cpu", feature_prefilter=-1)
    fit = nir.fuse(frames, steps=2, device="cpu", feature_prefilter=5)
    assert fit.provenance()["parameters"]["feature_prefilter"] == 5


def test_channels_first_stack_is_not_read_as_channels_last():
    """(T, C, H, W) with C >= 8 used to be fitted as frames of C x W pixels with H channels, without a word."""
    stack = np.random.default_rng(0).random((3, 8, 40, 48)).astype(np.float32)
    with pytest.raises(ValueError, match=r"axes='TCYX'.*axes='TYXC'"):
        nir.fuse(stack, steps=1)
    job = nir.FusionJob(stack, axes="TYXC", steps=1)  # said explicitly: 8 rows of 40 pixels, 48 channels
    assert job.burst.shape == (3, 8, 40, 48)


def test_a_stop_during_the_start_ends_the_run_before_its_first_step():
    """The feature start yields no events; it checks the job's stop flag per frame and per pair of frames."""
    from napari_nir.core import motion
    from napari_nir.core.api import FusionJob
    from napari_nir.core.stages import Stopped, check_stop, stop_check

    frames = np.random.default_rng(0).random((4, 32, 32)).astype(np.float32)
    job = FusionJob(frames, "homography", steps=50)
    checks = []
    original = motion.check_stop

    def counting():
        checks.append(True)
        if len(checks) == 2:  # asked to stop while the second frame's features are found
            job.stop()
        original()

    motion.check_stop = counting
    try:
        events = list(job.run())
    finally:
        motion.check_stop = original
    assert events == [] and job.model is None and len(checks) == 2  # stopped at that check, frame 2 of 4
    with pytest.raises(RuntimeError, match="stopped during its start"):
        job.result()
    check_stop()  # outside a run: nothing to stop
    with stop_check(lambda: True), pytest.raises(Stopped):
        check_stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fit_matches_the_cpu_fit():
    """The CUDA path: the same burst and seed fitted on the GPU aligns as well as on the CPU (kernels differ, so
    the results are close, not identical) and its result lives on the host."""
    sample = homography_burst(4, (64, 64), seed=5)
    cpu = nir.fuse(sample.frames, "homography", device="cpu", seed=0, steps=150)
    gpu = nir.fuse(sample.frames, "homography", device="cuda", seed=0, steps=150)
    assert gpu.config.device.startswith("cuda")
    cpu_error = corner_error(cpu.homographies, sample.homographies, (64, 64))
    gpu_error = corner_error(gpu.homographies, sample.homographies, (64, 64))
    assert np.median(gpu_error) < max(2 * np.median(cpu_error), 0.1)
    assert isinstance(gpu.canonical(), np.ndarray)
    assert abs(gpu.final_psnr - cpu.final_psnr) < 2.0
