"""Tests for napari_nir.core.burst: validation, normalisation and its exact inverse."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_nir.core.burst import Burst, prepare_burst

INT_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]
ALL_DTYPES = INT_DTYPES + FLOAT_DTYPES


def _ramp(shape=(3, 16, 16), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 200).astype(dtype)


def _int_burst(dtype, base, width, shape=(3, 10, 12, 2), seed=0):
    """Random integers in [base, base + width] of `dtype`, built exactly (no float rounding near 2**63)."""
    rng = np.random.default_rng(seed)
    offs = rng.integers(0, width, size=shape, dtype=np.uint64, endpoint=True)
    offs.flat[0], offs.flat[-1] = 0, width
    return np.array([base + int(o) for o in offs.ravel()], dtype=dtype).reshape(shape)


# -- valid inputs: layouts, containers, normalisation -------------------------------------------------------
def test_grey_layout():
    a = _ramp((4, 16, 20))
    b = prepare_burst(a)
    assert isinstance(b, Burst)
    assert b.layout == "THW" and (b.T, b.H, b.W, b.C) == (4, 16, 20, 1)
    assert b.data.shape == (4, 16, 20, 1) and b.data.dtype == np.float32 and b.data.flags.c_contiguous
    assert b.dtype == np.float32 and b.lo.shape == (1,) and b.scale.shape == (1,)
    assert b.lo.dtype == np.float64 and b.scale.dtype == np.float64
    assert b.restore(b.data).shape == (4, 16, 20)          # channel axis squeezed for THW


@pytest.mark.parametrize("C", [1, 3, 4, 7])
def test_channel_layouts(C):
    a = _ramp((3, 12, 9, C), np.uint16)
    b = prepare_burst(a)
    assert b.layout == "THWC" and b.C == C and b.data.shape == (3, 12, 9, C)
    np.testing.assert_array_equal(b.restore(b.data), a)        # C == 1 keeps its axis for THWC
    assert b.restore(b.data).shape == a.shape


def test_per_channel_normalisation():
    rng = np.random.default_rng(1)
    a = np.stack([rng.uniform(-5, 5, (3, 10, 10)), rng.uniform(100, 1000, (3, 10, 10)),
                  rng.uniform(0, 1e-3, (3, 10, 10))], axis=-1)
    b = prepare_burst(a)
    np.testing.assert_allclose(b.lo, a.min(axis=(0, 1, 2)))
    np.testing.assert_allclose(b.scale, np.ptp(a, axis=(0, 1, 2)))
    np.testing.assert_array_equal(b.data.min(axis=(0, 1, 2)), 0.0)
    np.testing.assert_allclose(b.data.max(axis=(0, 1, 2)), 1.0, rtol=1e-7)
    np.testing.assert_allclose(b.data, ((a - b.lo) / b.scale).astype(np.float32), rtol=1e-7, atol=1e-7)


def test_constant_channel_inside_varying_burst_is_fine():
    a = _ramp((3, 10, 10, 3), np.uint8)
    a[..., 1] = 42
    b = prepare_burst(a)
    assert b.scale[1] == 1.0 and b.lo[1] == 42.0
    np.testing.assert_array_equal(b.data[..., 1], 0.0)
    np.testing.assert_array_equal(b.restore(b.data), a)


def test_dask_input():
    da = pytest.importorskip("dask.array")
    a = _ramp((4, 16, 16, 3), np.uint16)
    b = prepare_burst(da.from_array(a, chunks=(1, 8, 8, 3)))
    np.testing.assert_array_equal(b.restore(b.data), a)
    assert b.dtype == np.uint16


def test_zarr_input():
    zarr = pytest.importorskip("zarr")
    a = _ramp((3, 16, 16), np.uint8)
    z = zarr.zeros(a.shape, dtype=a.dtype)
    z[:] = a
    np.testing.assert_array_equal(prepare_burst(z).restore(prepare_burst(z).data), a)


def test_list_input():
    frames = [_ramp((9, 9), np.int16, seed=s) for s in range(3)]
    b = prepare_burst(frames)
    assert b.T == 3 and b.dtype == np.int16
    np.testing.assert_array_equal(b.restore(b.data), np.stack(frames))


def test_caller_array_is_never_written_or_shared():
    a = _ramp((3, 16, 16, 3), np.float32) / 200           # already in [0, 1], float32: no excuse to share
    ro = a.copy()
    ro.setflags(write=False)
    b = prepare_burst(ro)
    assert not np.shares_memory(b.data, ro)
    before = a.copy()
    b = prepare_burst(a)
    assert not np.shares_memory(b.data, a)
    b.data[...] = 7                                       # mutating the working copy leaves the input alone
    assert np.array_equal(a.view(np.uint32), before.view(np.uint32))   # bitwise unchanged


def test_non_contiguous_input():
    big = _ramp((6, 20, 20, 4), np.uint16)
    a = big[::2, 1::2, ::-1, :3]                          # strided, reversed view
    before = big.copy()
    b = prepare_burst(a)
    np.testing.assert_array_equal(b.restore(b.data), a)
    np.testing.assert_array_equal(big, before)


def test_min_frames_parameter():
    with pytest.raises(ValueError, match="2 frames.*at least 3"):
        prepare_burst(_ramp((2, 16, 16)), min_frames=3)
    assert prepare_burst(_ramp((3, 16, 16)), min_frames=3).T == 3


def test_name_is_used_in_messages():
    with pytest.raises(ValueError, match="ground_truth has 1 frame"):
        prepare_burst(_ramp((1, 16, 16)), name="ground_truth")


# -- dtype round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("where", ["low", "high", "middle"])
def test_integer_round_trip_is_bitwise(dtype, where):
    info = np.iinfo(dtype)
    width = min(1000, int(info.max) - int(info.min))
    base = {"low": int(info.min), "high": int(info.max) - width, "middle": -width // 2 if info.min < 0 else 0}[where]
    a = _int_burst(dtype, base, width)
    b = prepare_burst(a)
    r = b.restore(b.data)
    assert r.dtype == a.dtype and r.shape == a.shape
    np.testing.assert_array_equal(r, a)
    np.testing.assert_array_equal(b.to_working(a), b.data)
    assert b.data.min() == 0.0 and b.data.max() == 1.0


def test_int8_negatives():
    a = _int_burst(np.int8, -128, 100, shape=(3, 8, 8))
    b = prepare_burst(a)
    assert b.lo[0] == -128.0 and b.scale[0] == 100.0
    np.testing.assert_array_equal(b.restore(b.data), a)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_64bit_full_range_does_not_overflow(dtype):
    info = np.iinfo(dtype)
    a = _int_burst(dtype, int(info.min), int(info.max) - int(info.min), shape=(2, 8, 8))
    b = prepare_burst(a)
    assert np.all(np.isfinite(b.data)) and b.data.min() == 0.0 and b.data.max() == 1.0
    r = b.restore(b.data)
    assert r.dtype == a.dtype
    assert r.min() == info.min and r.max() == info.max
    err = np.abs(r.astype(np.float64) - a.astype(np.float64))
    assert err.max() <= (float(info.max) - float(info.min)) / 2 ** 24


def test_range_of_exactly_2_24_is_bitwise():
    rng = np.random.default_rng(0)
    vals = np.concatenate([np.arange(0, 4096), 2 ** 24 - np.arange(4096), rng.integers(0, 2 ** 24 + 1, 8192)])
    a = (vals.astype(np.int64) - 2 ** 23).astype(np.int32).reshape(2, 64, 128)
    a.flat[0], a.flat[1] = -(2 ** 23), 2 ** 23
    b = prepare_burst(a)
    assert b.scale[0] == 2 ** 24
    np.testing.assert_array_equal(b.restore(b.data), a)


def test_wide_integer_range_error_is_below_range_over_2_24():
    rng = np.random.default_rng(0)
    a = rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, (3, 16, 16), dtype=np.int32, endpoint=True)
    b = prepare_burst(a)
    err = np.abs(b.restore(b.data).astype(np.int64) - a.astype(np.int64))
    assert err.max() <= b.scale[0] / 2 ** 24


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_float_round_trip(dtype):
    rng = np.random.default_rng(2)
    a = rng.uniform(-300, 500, (3, 10, 11, 2)).astype(dtype)
    b = prepare_burst(a)
    r = b.restore(b.data)
    assert r.dtype == a.dtype and r.shape == a.shape
    a64 = a.astype(np.float64)
    tol = b.scale * 2.0 ** -23 + np.abs(a64) * np.finfo(dtype).eps
    assert np.all(np.abs(r.astype(np.float64) - a64) <= tol)
    np.testing.assert_allclose(b.to_working(a), b.data, atol=2e-7)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float64])
def test_restore_float32(dtype):
    a = _ramp((3, 12, 12), dtype)
    b = prepare_burst(a)
    r = b.restore(b.data, dtype="float32")
    assert r.dtype == np.float32 and r.shape == a.shape
    np.testing.assert_allclose(r, a.astype(np.float64), atol=float(b.scale[0]) * 2.0 ** -22)
    half = b.restore(np.full((5, 6, 1), 0.5, np.float32), dtype="float32")   # any (H', W') and leading axes
    assert half.shape == (5, 6)
    np.testing.assert_allclose(half, b.lo[0] + 0.5 * b.scale[0], rtol=1e-6)


def test_restore_rounds_half_to_even():
    a = np.zeros((2, 8, 8), np.uint8)
    a[0, 0, 0] = 10                                     # lo 0, scale 10: working 0.05 -> 0.5 units
    b = prepare_burst(a)
    x = np.array([[0.05], [0.15], [0.25]], dtype=np.float64)
    np.testing.assert_array_equal(b.restore(x), np.array([0, 2, 2], np.uint8))


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_restore_overshoot_clips_without_wraparound(dtype):
    info = np.iinfo(dtype)
    width = min(100, int(info.max) - int(info.min))
    for base, x, expected in [(int(info.max) - width, 1.7, info.max), (int(info.min), -0.6, info.min),
                              (int(info.min), 1e30, None), (int(info.max) - width, -1e30, None)]:
        b = prepare_burst(_int_burst(dtype, base, width, shape=(2, 8, 8)))
        out = b.restore(np.full((3, 4, 1), x))
        assert out.dtype == np.dtype(dtype)
        if expected is None:                         # far overshoot clipped at the dtype limit, not wrapped
            expected = info.max if x > 0 else info.min
        assert np.all(out == expected), (base, x, out.ravel()[:3])


def test_restore_float_overshoot_stays_finite():
    a = np.array([[-60000.0, 60000.0]] * 32, np.float16).reshape(2, 8, 4)
    a = np.concatenate([a, a], axis=2)
    b = prepare_burst(a)
    out = b.restore(np.array([[1.5], [-0.5]], np.float32))
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
    assert out[0] == np.finfo(np.float16).max and out[1] == np.finfo(np.float16).min


def test_restore_nan_maps_to_channel_minimum():
    a = _int_burst(np.uint16, 500, 1000, shape=(2, 8, 8))
    b = prepare_burst(a)
    assert b.restore(np.array([[np.nan]]))[0] == 500


def test_restore_rejects_bad_dtype_argument_and_shape():
    b = prepare_burst(_ramp((3, 12, 12, 3), np.uint8))
    for bad in ["uint8", "float64", None, np.float32]:
        with pytest.raises(ValueError, match="dtype='input'.*dtype='float32'"):
            b.restore(b.data, dtype=bad)
    with pytest.raises(ValueError, match="last axis.*3 channel"):
        b.restore(b.data[..., :2])


def test_to_working_grey_ground_truth_adds_channel_axis():
    a = _ramp((3, 12, 12), np.uint16)
    b = prepare_burst(a)
    gt = a[0].astype(np.float64) + 0.5
    w = b.to_working(gt)
    assert w.shape == (12, 12, 1) and w.dtype == np.float32
    np.testing.assert_allclose(w[..., 0], (gt - b.lo[0]) / b.scale[0], rtol=1e-6)


# -- invalid inputs: every message names the problem and the fix ------------------------------------------------
@pytest.mark.parametrize("shape, match", [
    ((), "0-D.*stack of images"),
    ((16,), "1-D.*stack of images"),
    ((16, 16), r"single 2-D image \(shape \(16, 16\)\).*stack at least 2 frames.*np.stack"),
    ((2, 3, 16, 16, 3), r"5-D.*\(T, H, W\) or \(T, H, W, C\)"),
    ((2, 2, 3, 16, 16, 3), "6-D"),
])
def test_bad_ndim(shape, match):
    with pytest.raises(ValueError, match=match):
        prepare_burst(np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape))


def test_one_frame():
    with pytest.raises(ValueError, match=r"1 frame \(shape \(1, 64, 64\)\).*at least 2 frames.*first axis"):
        prepare_burst(np.random.default_rng(0).random((1, 64, 64)))


@pytest.mark.parametrize("shape, match", [
    ((0, 16, 16), r"axis 0, T \(frames\), has size 0"),
    ((3, 0, 16), r"axis 1, H \(height\), has size 0"),
    ((3, 16, 0), r"axis 2, W \(width\), has size 0"),
    ((3, 16, 16, 0), r"axis 3, C \(channels\), has size 0"),
])
def test_zero_size_axis(shape, match):
    with pytest.raises(ValueError, match=match):
        prepare_burst(np.zeros(shape, np.float32))


@pytest.mark.parametrize("shape", [(3, 7, 16), (3, 16, 5), (3, 4, 4, 3)])
def test_frames_too_small(shape):
    with pytest.raises(ValueError, match=r"at least 8x8 pixels") as e:
        prepare_burst(_ramp(shape))
    assert str(shape) in str(e.value)


def test_single_rgb_image_hint():
    with pytest.raises(ValueError, match=r"64x3 pixels.*single colour image \(H, W, C\).*np.stack"):
        prepare_burst(_ramp((64, 64, 3), np.uint8))


def test_channels_first_hint():
    with pytest.raises(ValueError, match=r"np.moveaxis\(burst, 1, -1\)"):
        prepare_burst(_ramp((4, 3, 32, 32), np.uint8))


@pytest.mark.parametrize("array, match", [
    (np.zeros((3, 16, 16), bool), r"dtype bool.*astype\(np.float32\)"),
    (np.zeros((3, 16, 16), np.complex64), r"dtype complex64.*np.abs\(burst\)"),
    (np.zeros((3, 16, 16), np.complex128), r"dtype complex128.*np.abs\(burst\)"),
    (np.zeros((3, 16, 16), object), r"dtype object.*np.float32"),
    (np.full((3, 16, 16), "a"), r"dtype <U1.*astype\(np.float32\)"),
    (np.full((3, 16, 16), b"a"), r"dtype \|S1.*astype\(np.float32\)"),
    (np.zeros((3, 16, 16), "datetime64[s]"), r"dtype datetime64\[s\].*np.float32"),
    (np.zeros((3, 16, 16), "timedelta64[s]"), r"dtype timedelta64\[s\].*np.float32"),
    (np.zeros((3, 16, 16), [("a", np.float32), ("b", np.int16)]), r"structured.*np.float32"),
])
def test_unsupported_dtypes(array, match):
    with pytest.raises(TypeError, match=match):
        prepare_burst(array)


def test_ragged_list():
    with pytest.raises(ValueError, match="same shape.*np.stack"):
        prepare_burst([np.zeros((16, 16)), np.zeros((16, 15))])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_nan_and_inf(dtype):
    a = _ramp((3, 16, 16, 2), dtype)
    a[1, 2, 3, 1] = np.nan
    a[2, 0, 0, 0] = np.inf
    a[2, 5, 5, 1] = -np.inf
    with pytest.raises(ValueError, match=r"3 non-finite values.*first is nan at index \(1, 2, 3, 1\).*np.nan_to_num"):
        prepare_burst(a)
    g = _ramp((3, 16, 16), dtype)
    g[0, 4, 9] = np.inf
    with pytest.raises(ValueError, match=r"1 non-finite value .*index \(0, 4, 9\)"):
        prepare_burst(g)


@pytest.mark.parametrize("array", [np.full((3, 16, 16), 7, np.uint8), np.zeros((3, 16, 16, 3), np.float32),
                                   np.broadcast_to(np.array([1.0, 2.0, 3.0]), (3, 16, 16, 3))])
def test_constant_burst(array):
    with pytest.raises(ValueError, match="constant.*nothing to fuse"):
        prepare_burst(array)


def test_float_range_overflow():
    a = _ramp((3, 16, 16), np.float64)
    a[0, 0, 0], a[0, 0, 1] = -1e308, 1e308
    with pytest.raises(ValueError, match="too wide.*rescale"):
        prepare_burst(a)


# -- property: round trip over dtypes, shapes and value ranges -----------------------------------------------------
@st.composite
def _bursts(draw):
    dtype = np.dtype(draw(st.sampled_from(ALL_DTYPES)))
    T, H, W = draw(st.integers(2, 4)), draw(st.integers(8, 20)), draw(st.integers(8, 20))
    C = draw(st.sampled_from([None, 1, 3, 5]))
    shape = (T, H, W) if C is None else (T, H, W, C)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        width = draw(st.integers(1, min(2 ** 24, int(info.max) - int(info.min))))
        lo = draw(st.integers(int(info.min), int(info.max) - width))
        hi = lo + width
        elements = st.integers(lo, hi)
    else:
        big = 1e4 if dtype == np.float16 else 1e30
        lo = float(dtype.type(draw(st.floats(-big, big / 2))))
        hi = float(dtype.type(lo + draw(st.floats(1e-3, big / 2) if dtype != np.float16 else st.floats(1.0, 1e4))))
        if not hi > lo:
            hi = float(np.nextafter(dtype.type(lo), dtype.type(np.inf)))
        elements = st.floats(lo, hi, width=dtype.itemsize * 8)
    a = draw(arrays(dtype, shape, elements=elements))
    a.flat[0] = dtype.type(lo)
    a.flat[1 if C is None else C] = dtype.type(hi)      # channel 0 spans [lo, hi]: never constant
    return a


@settings(max_examples=60, deadline=None)
@given(_bursts())
def test_round_trip_property(a):
    before = a.copy()
    b = prepare_burst(a)
    assert np.array_equal(a, before)
    C = 1 if a.ndim == 3 else a.shape[3]
    assert b.data.shape == a.shape[:3] + (C,) and b.data.dtype == np.float32
    assert b.data.min() >= 0.0 and b.data.max() <= 1.0
    r = b.restore(b.data)
    assert r.dtype == a.dtype and r.shape == a.shape
    f = b.restore(b.data, dtype="float32")
    assert f.dtype == np.float32 and f.shape == a.shape
    if a.dtype.kind in "iu":
        np.testing.assert_array_equal(r, a)          # every range here is <= 2**24: bitwise
    else:
        a64 = a.astype(np.float64)
        span = b.scale if a.ndim == 4 else b.scale[0]
        tol = span * 2.0 ** -23 + np.abs(a64) * np.finfo(a.dtype).eps
        assert np.all(np.abs(r.astype(np.float64) - a64) <= tol)
        tol32 = span * 2.0 ** -23 + np.abs(a64) * 2.0 ** -22 + np.finfo(np.float32).tiny   # float32 underflow
        assert np.all(np.abs(f.astype(np.float64) - a64) <= tol32)
