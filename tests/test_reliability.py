"""Reliability (issue 7): hostile inputs, memory, cancellation and repetition, determinism.

The burst normalisation round trip is fuzzed with hypothesis in tests/core/test_burst.py (not repeated here).
"""
from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import weakref

import numpy as np
import pytest
import torch

import napari_nir as nir
from napari_nir.core import memory
from napari_nir.core.burst import prepare_burst
from napari_nir.core.config import FitConfig, options
from napari_nir.core.presets import preset_config
from napari_nir.core.provenance import fuse_kwargs_from_provenance, rerun

QUICK = {"steps": 3, "device": "cpu", "init": "identity"}


def _burst(t=3, h=16, w=16, c=3, seed=0):
    return np.random.default_rng(seed).random((t, h, w, c), dtype=np.float32)


def _with_value(value):
    b = _burst()
    b[1, 3, 4, 2] = value
    return b


def _prepared():
    return prepare_burst(_burst())


def _same(before, after) -> bool:
    """Bitwise equality (NaNs included) of two array-likes, dtype and shape too."""
    a, b = np.asarray(before), np.asarray(after)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _snapshot(x):
    return np.array(x, copy=True) if isinstance(x, np.ndarray) else None


# (id, burst factory, fuse kwargs, exception, problem regex, fix regex, also a prepare_burst input)
HOSTILE = [
    ("1-D", lambda: np.arange(64, dtype=np.float32), {}, ValueError, r"1-D", r"\(T, H, W\)", True),
    ("2-D", lambda: _burst()[0, :, :, 0].copy(), {}, ValueError, r"single 2-D image", r"np\.stack", True),
    ("5-D", lambda: _burst()[None].copy(), {}, ValueError, r"5-D", r"burst\[0\]", True),
    ("T=1", lambda: _burst(t=1), {}, ValueError, r"has 1 frame", r"at least 2 frames", True),
    ("T=0", lambda: np.zeros((0, 16, 16), np.float32), {}, ValueError, r"empty.*T \(frames\)", r"at least 2 frames",
     True),
    ("H=0", lambda: np.zeros((3, 0, 16), np.float32), {}, ValueError, r"empty.*H \(height\)", r"8x8", True),
    ("W=0", lambda: np.zeros((3, 16, 0, 3), np.float32), {}, ValueError, r"empty.*W \(width\)", r"8x8", True),
    ("C=0", lambda: np.zeros((3, 16, 16, 0), np.float32), {}, ValueError, r"empty.*C \(channels\)", r"8x8", True),
    ("H<8", lambda: _burst(h=5), {}, ValueError, r"5x16 pixels", r"at least 8x8", True),
    ("W<8", lambda: _burst(w=4), {}, ValueError, r"16x4 pixels", r"at least 8x8", True),
    ("one colour image", lambda: _burst(t=16, h=16, w=3, c=1)[..., 0], {}, ValueError, r"16x3 pixels",
     r"single colour image", True),
    ("channels first", lambda: _burst(t=3, h=3, w=16, c=16), {}, ValueError, r"3x16 pixels", r"np\.moveaxis", True),
    ("NaN", lambda: _with_value(np.nan), {}, ValueError, r"non-finite.*first is nan at index \(1, 3, 4, 2\)",
     r"nan_to_num", True),
    ("+Inf", lambda: _with_value(np.inf), {}, ValueError, r"non-finite.*first is inf", r"nan_to_num", True),
    ("-Inf", lambda: _with_value(-np.inf), {}, ValueError, r"non-finite.*first is -inf", r"nan_to_num", True),
    ("float64 range overflows", lambda: np.array([-1e308, 1e308, 0.0])[:, None, None] * np.ones((3, 16, 16)), {},
     ValueError, r"range too wide", r"rescale", True),
    ("bool", lambda: _burst() > 0.5, {}, TypeError, r"dtype bool", r"astype\(np\.float32\)", True),
    ("complex64", lambda: _burst().astype(np.complex64), {}, TypeError, r"dtype complex64", r"np\.abs", True),
    ("object", lambda: _burst().astype(object), {}, TypeError, r"dtype object", r"np\.asarray", True),
    ("str", lambda: np.full((3, 16, 16), "a"), {}, TypeError, r"dtype <U1", r"astype", True),
    ("bytes", lambda: np.full((3, 16, 16), b"a"), {}, TypeError, r"dtype \|S1", r"astype", True),
    ("datetime64", lambda: np.zeros((3, 16, 16), "datetime64[s]"), {}, TypeError, r"datetime64", r"astype", True),
    ("timedelta64", lambda: np.zeros((3, 16, 16), "timedelta64[s]"), {}, TypeError, r"timedelta64", r"astype", True),
    ("structured", lambda: np.zeros((3, 16, 16), dtype=[("a", "f4")]), {}, TypeError, r"kind 'V'", r"\['field'\]",
     True),
    ("None", lambda: None, {}, TypeError, r"dtype object", r"numeric array", True),
    ("ragged frames", lambda: [_burst()[0], _burst()[1, :8]], {}, ValueError, r"could not be made into one array",
     r"np\.stack", True),
    ("a prepared Burst", _prepared, {}, TypeError, r"already a prepared Burst", r"original array", True),
    ("constant", lambda: np.full((3, 16, 16), 7, np.uint8), {}, ValueError, r"constant \(every value is 7",
     r"right layer", True),
    ("constant channels", lambda: np.ones((3, 16, 16, 3), np.float32) * np.float32([1, 2, 3]), {}, ValueError,
     r"each channel is constant", r"right layer", True),
    ("steps=0", _burst, {"steps": 0}, ValueError, r"steps must be >= 1, got 0", r">= 1", False),
    ("steps=-1", _burst, {"steps": -1}, ValueError, r"steps must be >= 1, got -1", r">= 1", False),
    ("steps=1.5", _burst, {"steps": 1.5}, TypeError, r"steps must be an integer, got 1\.5", r"integer", False),
    ("steps='10'", _burst, {"steps": "10"}, TypeError, r"steps must be an integer, got '10'", r"integer", False),
    ("steps=True", _burst, {"steps": True}, TypeError, r"steps must be an integer, got True", r"integer", False),
    ("seed=-1", _burst, {"seed": -1}, ValueError, r"seed must be >= 0, got -1", r">= 0", False),
    ("seed=0.5", _burst, {"seed": 0.5}, TypeError, r"seed must be an integer", r"integer", False),
    ("motion=warp", _burst, {"motion": "warp"}, ValueError, r"unknown motion 'warp'", r"choose one of", False),
    ("preset=slow", _burst, {"preset": "slow"}, ValueError, r"unknown preset 'slow'", r"fast, paper", False),
    ("device=tpu", _burst, {"device": "tpu"}, ValueError, r"unknown device 'tpu'", r"'cpu'", False),
    ("device=cuda:7", _burst, {"device": "cuda:7"}, ValueError, r"cuda:7", r"'cpu'|cuda:0", False),
    ("device=0", _burst, {"device": 0}, TypeError, r"device must be a string", r"'cpu'", False),
    ("unknown option", _burst, {"colour": "red"}, TypeError, r"unknown option\(s\) colour", r"valid: .*batch,", False),
    ("callback not callable", _burst, {"callback": 1}, TypeError, r"callback must be callable", r"or None", False),
    ("batch=0", _burst, {"batch": 0}, ValueError, r"batch=0 is invalid", r"16384", False),
    ("batch=1.5", _burst, {"batch": 1.5}, TypeError, r"batch=1\.5 is invalid: give a whole number", r"H \* W / k",
     False),
    ("working_size='big'", _burst, {"working_size": "big"}, TypeError, r"working_size='big' is invalid: give a whole",
     r"0: no limit", False),
    ("field=foo", _burst, {"field": "foo"}, ValueError, r"field='foo' is invalid", r"'grid' or 'siren'", False),
    ("motion_param=foo", _burst, {"motion_param": "foo"}, ValueError, r"motion_param='foo' is invalid",
     r"'lie' or 'mlp'", False),
]


@pytest.mark.parametrize("make, kwargs, exc, problem, fix, burst_level",
                         [pytest.param(*case[1:], id=case[0]) for case in HOSTILE])
def test_hostile_input_is_refused_with_a_fix_and_left_unchanged(make, kwargs, exc, problem, fix, burst_level):
    if kwargs.get("device") == "cuda:7" and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    burst = make()
    before = _snapshot(burst)
    kwargs = {**QUICK, **kwargs}
    motion = kwargs.pop("motion", "homography")
    with pytest.raises(exc, match=problem) as info:
        nir.fuse(burst, motion, **kwargs)
    assert re.search(fix, str(info.value)), f"no fix in: {info.value}"
    if before is not None:
        assert _same(before, burst)
    if burst_level:
        with pytest.raises(exc, match=problem):
            prepare_burst(burst)
        if before is not None:
            assert _same(before, burst)


@pytest.mark.parametrize("kwargs", [
    pytest.param({"loss": "foo"}, id="loss=foo"),
    pytest.param({"value_range": (1.0, 1.0)}, id="value_range=(1,1)"),
    pytest.param({"lr_field": -1.0}, id="lr_field=-1"),
    pytest.param({"grid_density": 0}, id="grid_density=0"),
    pytest.param({"exposure": "no"}, id="exposure='no'"),
    pytest.param({"motion": "flow", "flow_levels": 0}, id="flow_levels=0"),
    pytest.param({"field_options": {"bogus": 1}}, id="field_options-bogus"),
])
def test_bad_fit_options_are_refused(kwargs):
    kwargs = {**QUICK, **kwargs}
    motion = kwargs.pop("motion", "homography")
    name = next(k for k in kwargs if k not in QUICK)
    with pytest.raises((ValueError, TypeError), match=name):
        nir.fuse(_burst(), motion, **kwargs)


@pytest.mark.parametrize("option", ["lr_motion=1e6", "lr_field=float('nan')"])
def test_diverging_fit_raises_instead_of_crashing(option):
    code = textwrap.dedent(f"""
        import numpy as np, napari_nir as nir
        burst = np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32)
        try:
            nir.fuse(burst, steps=20, device="cpu", init="identity", {option})
        except (ValueError, RuntimeError) as exc:
            print("refused:", exc)
        else:
            print("ran")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"process died with code {done.returncode}"
    assert "refused:" in done.stdout


@pytest.fixture(scope="module")
def tiny_fit():
    return nir.fuse(_burst(t=2, h=24, w=24), **{**QUICK, "steps": 5})


@pytest.mark.parametrize("call, exc, problem", [
    pytest.param(lambda f: f.canonical(scale=0), ValueError, r"scale must be > 0", id="scale=0"),
    pytest.param(lambda f: f.canonical(scale=-2), ValueError, r"scale must be > 0", id="scale=-2"),
    pytest.param(lambda f: f.canonical(scale=float("nan")), ValueError, r"scale must be > 0", id="scale=nan"),
    pytest.param(lambda f: f.canonical(scale=1e6), ValueError, r"<= 16", id="scale=1e6"),
    pytest.param(lambda f: f.canonical(scale="big"), TypeError, r"scale must be a number", id="scale='big'"),
    pytest.param(lambda f: f.canonical(extent="everything"), ValueError, r"unknown extent 'everything'",
                 id="extent=everything"),
    pytest.param(lambda f: f.frames(dtype="int3"), ValueError, r"dtype", id="frames-dtype"),
    pytest.param(lambda f: f.flow(), ValueError, r"motion='flow'", id="flow-on-homography"),
])
def test_bad_result_requests_are_refused(tiny_fit, call, exc, problem):
    with pytest.raises(exc, match=problem):
        call(tiny_fit)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: (_burst(h=24, w=24) * -4 - 1).astype(np.float32), id="negative-float"),
    pytest.param(lambda: np.random.default_rng(1).integers(-128, 128, (3, 24, 24, 3)).astype(np.int8), id="int8"),
    pytest.param(lambda: np.random.default_rng(2).integers(0, 65536, (3, 24, 24)).astype(np.uint16),
                 id="uint16-full-range"),
    pytest.param(lambda: _burst(h=24, w=24, c=1), id="grey-THW1"),
    pytest.param(lambda: _burst(h=24, w=24).astype(">f4"), id="big-endian"),
    pytest.param(lambda: np.moveaxis(_burst(h=24, w=24, c=3), 1, 2), id="non-contiguous"),
])
def test_unusual_but_valid_inputs_work(make):
    burst = make()
    if burst.dtype == np.float32:
        burst.setflags(write=False)  # nothing may write into the caller's array
    before = burst.copy()
    fit = nir.fuse(burst, **QUICK)
    assert _same(before, burst)
    frames = fit.frames()
    assert frames.shape == burst.shape and frames.dtype == burst.dtype
    assert np.isfinite(frames.astype(np.float64)).all()
    assert fit.canonical(extent="first").shape == burst.shape[1:]


# -- memory -------------------------------------------------------------------------------------------
def test_estimate_grows_with_size_frames_and_preset():
    fast = preset_config("homography", "fast", working_size=0)
    sizes = [memory.estimate_fit_bytes((9, n, n, 3), fast) for n in (128, 256, 512, 1024)]
    assert sizes == sorted(sizes) and sizes[-1] > 2 * sizes[1]
    frames = [memory.estimate_fit_bytes((t, 512, 512, 3), fast) for t in (2, 9, 50)]
    assert frames == sorted(frames) and frames[-1] > frames[0]
    paper = preset_config("homography", "paper", working_size=0)
    assert memory.estimate_fit_bytes((9, 512, 512, 3), paper) > memory.estimate_fit_bytes((9, 512, 512, 3), fast)
    # the input resolution counts too (the end-of-fit reconstruction renders full frames)
    assert (memory.estimate_fit_bytes((9, 512, 512, 3), fast, input_shape=(9, 8000, 8000, 3))
            > memory.estimate_fit_bytes((9, 512, 512, 3), fast))


@pytest.mark.parametrize("motion", ["homography", "flow", "occlusion"])
def test_estimate_counts_the_real_networks(motion):
    from napari_nir.core.build import make_model

    config = preset_config(motion, "fast")
    shape = (3, 40, 56, 3)
    meta = memory._meta_model(config, shape)
    state = torch.random.get_rng_state()
    real = make_model(config, shape, meta.domain)
    torch.random.set_rng_state(state)
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_estimate_does_not_touch_the_global_generator():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    memory.estimate_fit_bytes((3, 64, 64, 3), preset_config("homography", "fast"))
    assert torch.equal(torch.rand(3), expected)


def test_absurd_request_is_refused_with_a_working_size_that_fits():
    config = preset_config("homography", "paper", working_size=0)
    shape = (9, 4096, 4096, 3)
    available = 3 * memory.GiB  # the float32 copy of the input alone takes 1.7 GiB at any working size
    with pytest.raises(ValueError, match=r"this fit needs about .* GiB but only 3\.0 GiB is available on cpu") as info:
        memory.check_fit_memory(shape, config, "cpu", available=available)
    message = str(info.value)
    size = int(re.search(r"working_size=(\d+)", message).group(1))
    assert 64 <= size < 4096 and size % 16 == 0
    fits = memory.estimate_fit_bytes(memory.working_shape(shape, size), config.replace(working_size=size),
                                     input_shape=shape)
    assert fits <= available
    # many frames: fewer frames fit too
    fast = preset_config("homography", "fast", working_size=0)
    with pytest.raises(ValueError, match=r"fewer frames \(at most (\d+) fit at the current size\)") as info:
        memory.check_fit_memory((300, 1024, 1024, 3), fast, "cpu", available=available)
    frames = int(re.search(r"at most (\d+) fit", str(info.value)).group(1))
    assert 2 <= frames < 300 and memory.estimate_fit_bytes((frames, 1024, 1024, 3), fast) <= available
    # nothing fits: the message says what to do instead
    with pytest.raises(ValueError, match=r"crop or downscale"):
        memory.check_fit_memory(shape, config, "cpu", available=memory.MiB)
    assert memory.check_fit_memory((2, 64, 64, 3), config, "cpu", available=64 * memory.GiB) > 0


def test_fuse_refuses_before_fitting_and_the_suggested_size_works(monkeypatch):
    burst = _burst(t=2, h=256, w=256)
    before = burst.copy()
    config = preset_config("homography", "fast", device="cpu", working_size=64)
    budget = memory.estimate_fit_bytes((2, 64, 64, 3), config, input_shape=burst.shape) + memory.MiB
    monkeypatch.setattr(memory, "available_bytes", lambda device: budget)
    started = []
    with pytest.raises(ValueError, match=r"needs about .* available on cpu .*; use working_size=(\d+)") as info:
        nir.fuse(burst, device="cpu", steps=2, callback=started.append)
    assert not started and _same(before, burst)
    size = int(re.search(r"working_size=(\d+)", str(info.value)).group(1))
    assert 64 <= size < 256
    fit = nir.fuse(burst, device="cpu", steps=2, working_size=size, init="identity")
    assert fit.completed
    monkeypatch.setenv(memory.SKIP_ENV, "1")  # the escape hatch
    assert nir.fuse(burst, device="cpu", steps=1, init="identity").completed


def test_available_bytes_without_psutil(monkeypatch):
    with_psutil = memory.available_bytes(torch.device("cpu"))
    assert with_psutil > 64 * memory.MiB
    monkeypatch.setitem(sys.modules, "psutil", None)  # "import psutil" now fails
    without = memory.available_bytes("cpu")
    assert 0.5 * with_psutil < without < 2 * with_psutil


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_4096_canonical_render_allocates_about_its_output():
    # a light field (the pipeline's memory, not the network's speed, is under test)
    fit = nir.fuse(_burst(t=2, h=256, w=256), **{**QUICK, "steps": 5},
                   field_options={"levels": 2, "features": 2, "hidden": 0})
    fit.canonical(extent="first", scale=1)
    gc.collect()
    base = _rss()
    peak, stop = [base], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    tracemalloc.start()
    try:
        out = fit.canonical(extent="first", scale=16)
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        stop.set()
        watcher.join()
    assert out.shape == (4096, 4096, 3) and out.dtype == np.float32
    ratio = traced_peak / out.nbytes
    rss_ratio = (peak[0] - base) / out.nbytes
    print(f"4096x4096x3 float32 canonical ({out.nbytes / memory.MiB:.0f} MiB): numpy peak {ratio:.2f}x, "
          f"resident growth {rss_ratio:.2f}x")
    assert ratio <= 2.2, f"numpy allocations peaked at {ratio:.2f}x the output"


# -- cancellation, OOM, repetition ------------------------------------------------------------------------
@pytest.mark.parametrize("stop_at", [1, 2, 10])
def test_cancelling_leaves_a_usable_result_and_no_threads(stop_at):
    threads = threading.active_count()
    deterministic = torch.are_deterministic_algorithms_enabled()
    burst = _burst(h=24, w=24)

    def callback(event):
        return event.step < stop_at

    fit = nir.fuse(burst, **{**QUICK, "steps": 20}, callback=callback)
    assert not fit.completed and len(fit.history) == stop_at
    assert fit.provenance()["completed"] is False and fit.provenance()["steps_run"] == stop_at
    assert fit.frames().shape == burst.shape and fit.canonical(extent="first").shape == burst.shape[1:]
    assert threading.active_count() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_abandoning_the_job_generator_midway(tmp_path):
    job = nir.FusionJob(_burst(h=24, w=24), **{**QUICK, "steps": 20})
    events = job.run()
    next(events), next(events), next(events)
    events.close()  # a worker thread cancelled between steps
    fit = job.result()
    assert not fit.completed and len(fit.history) == 3
    fit.save(tmp_path / "fit.npz")
    assert nir.load(tmp_path / "fit.npz").completed is False


def test_interrupted_save_leaves_no_partial_file(tiny_fit, tmp_path, monkeypatch):
    target = tmp_path / "fit.npz"
    target.write_bytes(b"previous result")

    def interrupted(fh, **arrays):
        fh.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_fit.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.npz"]
    assert target.read_bytes() == b"previous result"


def test_cuda_out_of_memory_ends_the_run_cleanly(monkeypatch):
    from napari_nir.core import api

    real_fit_steps, real_build = api.fit_steps, api.build_model
    built, emptied = [], []

    def build(frames, config, device, **kwargs):
        model = real_build(frames, config, device, **kwargs)
        built.append(weakref.ref(model))
        return model

    def out_of_memory(model, frames, config, device, **kwargs):
        steps = real_fit_steps(model, frames, config, device)
        yield next(steps)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(api, "build_model", build)
    monkeypatch.setattr(api, "fit_steps", out_of_memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    burst = _burst(h=24, w=24)
    job = nir.FusionJob(burst, **{**QUICK, "steps": 10})
    with pytest.raises(RuntimeError, match=r"ran out of memory.*Tried to allocate 20\.00 GiB") as info:
        for _ in job.run():
            pass
    message = str(info.value)
    assert "working_size" in message and "fewer frames" in message and "device='cpu'" in message
    assert emptied and job.model is None
    gc.collect()
    assert built[0]() is None, "the failed run's model is still referenced"
    with pytest.raises(RuntimeError, match="ran out of memory"):
        nir.fuse(burst, **{**QUICK, "steps": 10})
    monkeypatch.undo()
    assert nir.fuse(burst, **QUICK).completed  # the next run works


def test_repeated_fits_do_not_grow_memory():
    burst = _burst(h=32, w=32)
    rss = []
    for _ in range(10):
        fit = nir.fuse(burst, steps=20, device="cpu", init="identity")
        fit.frames()
        fit.canonical()
        del fit
        gc.collect()
        rss.append(_rss())
    growth = (rss[-1] - rss[1]) / rss[1]
    print(f"resident memory after fit 2: {rss[1] / memory.MiB:.1f} MiB, after fit 10: {rss[-1] / memory.MiB:.1f} MiB "
          f"({100 * growth:+.1f} %)")
    assert growth < 0.10


# -- determinism ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seeded_burst():
    from napari_nir._sample_data import homography_burst

    return homography_burst(3, (32, 32), seed=5).frames


def _outputs(fit):
    return fit.frames(), fit.canonical(), fit.homographies


def test_same_seed_same_bits_and_seeds_differ(seeded_burst):
    a = nir.fuse(seeded_burst, steps=15, device="cpu", seed=7)
    b = nir.fuse(seeded_burst, steps=15, device="cpu", seed=7)
    c = nir.fuse(seeded_burst, steps=15, device="cpu", seed=8)
    for x, y in zip(_outputs(a), _outputs(b)):
        assert _same(x, y)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert not np.array_equal(a.frames(), c.frames())


def test_provenance_records_everything_and_reproduces_the_result(seeded_burst, tmp_path):
    fit = nir.fuse(seeded_burst, steps=15, device="cpu", seed=3, batch=4096, lr_motion=2e-3)
    prov = fit.provenance()
    assert set(prov["parameters"]) == set(options())
    assert prov["seed"] == 3 and prov["parameters"]["seed"] == 3 and prov["parameters"]["batch"] == 4096
    kwargs = fuse_kwargs_from_provenance(prov)
    again = nir.fuse(seeded_burst, **kwargs)
    assert again.config == fit.config
    for x, y in zip(_outputs(fit), _outputs(again)):
        assert _same(x, y)
    # the saved file carries the same record
    fit.save(tmp_path / "fit.npz")
    loaded = nir.load(tmp_path / "fit.npz")
    assert loaded.provenance()["parameters"] == prov["parameters"]
    assert _same(rerun(seeded_burst, loaded.provenance()).frames(), fit.frames())


def test_provenance_helper_refuses_foreign_records():
    with pytest.raises(ValueError, match="provenance record"):
        fuse_kwargs_from_provenance({"parameters": None})
    with pytest.raises(ValueError, match="does not know: warp_speed"):
        fuse_kwargs_from_provenance({"software": "napari-nir", "version": nir.__version__,
                                     "parameters": {**FitConfig().to_dict(), "warp_speed": 9}})
    with pytest.raises(ValueError, match="not a fusion"):
        fuse_kwargs_from_provenance({"task": "separate:rain", "parameters": {**FitConfig().to_dict(),
                                                                               "task": "rain"}})
