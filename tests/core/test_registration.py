"""Registration outputs: registered stacks, apply() on channels, planes, labels and other resolutions, transforms
in and out (pystackreg's convention checked against pystackreg itself when it is installed), axes."""
from __future__ import annotations

import numpy as np
import pytest

import napari_nir as nir
from napari_nir._sample_data import corner_error, drift_burst, microscopy_drift_stack
from napari_nir.core import registration


@pytest.fixture(scope="module")
def drift():
    return drift_burst(6, (64, 64), step_px=1.5, rotation_deg=0.6, noise=0.01, seed=4)


@pytest.fixture(scope="module")
def rigid_fit(drift):
    return nir.fuse(drift.frames, "rigid", steps=120, device="cpu", seed=0)


@pytest.fixture(scope="module")
def stack():
    """(T, C, Y, X) uint16 two-channel microscopy stack, Poisson-Gaussian noise, known rigid drift."""
    return microscopy_drift_stack(6, (64, 64), max_shift_px=4.0, max_rotation_deg=1.0, seed=2)


@pytest.fixture(scope="module")
def channel_fit(stack):
    return nir.fuse(stack.frames, "rigid", axes="TCYX", register_on=0, steps=120, device="cpu", seed=0)


def _interior(mask_source: np.ndarray, border: int = 6) -> np.ndarray:
    keep = np.ones(mask_source.shape[-2:], bool)
    keep[:border] = keep[-border:] = False
    keep[:, :border] = keep[:, -border:] = False
    return keep


def test_registered_frames_agree_with_each_other_far_better_than_the_input(drift, rigid_fit):
    registered = rigid_fit.registered(order=3)
    assert registered.shape == drift.frames.shape and registered.dtype == drift.frames.dtype
    keep = _interior(registered, 10)
    spread_in = np.std(drift.clean, axis=0)[keep].mean()
    # the noise-free frames warped by the fitted transforms: what is left is the alignment error alone
    clean = rigid_fit.apply(drift.clean, order=3)
    spread_out = np.std(clean, axis=0)[keep].mean()
    assert spread_out < 0.15 * spread_in, (spread_in, spread_out)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_registered_keeps_dtype_and_range_with_cubic_interpolation(drift, rigid_fit, dtype):
    base = drift.frames - drift.frames.min()
    if np.dtype(dtype).kind == "f":
        data = (base * 3 - 1).astype(dtype)
    else:
        info = np.iinfo(dtype)
        data = np.rint(info.min + base / base.max() * (float(info.max) - info.min)).astype(dtype)  # full range
    out = rigid_fit.apply(data, order=3)
    assert out.dtype == data.dtype and out.shape == data.shape
    covered = rigid_fit.apply(np.ones(data.shape, np.uint8), order=0) == 1
    assert covered.mean() > 0.8 and np.all(out[~covered] == 0)  # uncovered: the fill (0, clipped to the dtype)
    for t in range(len(data)):  # cubic overshoot never leaves the frame's own range: no wrap-around, no negatives
        inside = out[t][covered[t]]
        assert inside.min() >= data[t].min() and inside.max() <= data[t].max()


def test_apply_reproduces_registered_exactly_numpy_and_dask(drift, rigid_fit):
    dask_array = pytest.importorskip("dask.array")
    for order in (0, 1, 3):
        registered = rigid_fit.registered(order=order)
        assert np.array_equal(rigid_fit.apply(drift.frames, order=order), registered)
    lazy = rigid_fit.apply(dask_array.from_array(drift.frames, chunks=(2, 64, 64)))
    assert isinstance(lazy, dask_array.Array) and lazy.shape == drift.frames.shape
    assert np.array_equal(lazy.compute(), rigid_fit.registered())


def test_apply_maps_labels_without_inventing_any(drift, rigid_fit):
    labels = np.zeros(drift.frames.shape, np.uint16)
    labels[:, 10:30, 12:40] = 3
    labels[:, 35:55, 20:50] = 9
    out = rigid_fit.apply(labels, order=0)
    assert out.dtype == np.uint16 and set(np.unique(out)) <= {0, 3, 9}
    assert set(np.unique(out)) == {0, 3, 9}


def test_apply_to_another_resolution_scales_the_grid(drift, rigid_fit):
    from scipy.ndimage import zoom

    big = zoom(drift.clean, (1, 2, 2), order=1, grid_mode=True, mode="grid-constant")
    out = rigid_fit.apply(big, order=1)
    assert out.shape == big.shape
    small = rigid_fit.apply(drift.clean, order=1)
    grid = rigid_fit.registration_grid()
    scaled = grid.scaled(2.0, (128, 128))
    s = np.array([[2, 0, 0.5], [0, 2, 0.5], [0, 0, 1.0]])
    assert np.allclose(scaled.transforms, s @ grid.transforms @ np.linalg.inv(s))
    downsampled = out.reshape(len(out), 64, 2, 64, 2).mean((2, 4))  # back to the fit's pixels
    keep = _interior(small, 8)
    assert np.abs(downsampled - small)[:, keep].mean() < 0.02


def test_reference_frame_grid_leaves_that_frame_unchanged(drift, rigid_fit):
    out = rigid_fit.registered(reference=2)
    keep = _interior(out, 1)
    assert np.abs(out[2] - drift.frames[2])[keep].max() < 1e-5
    assert np.allclose(rigid_fit.transforms(reference=2)[2], np.eye(3), atol=1e-9)
    union = rigid_fit.registered(extent="union")
    assert union.shape[1] >= 64 and union.shape[2] >= 64


def test_transforms_conventions_and_init_round_trip(drift, rigid_fit):
    ours = rigid_fit.transforms()
    theirs = rigid_fit.transforms(convention="pystackreg")
    assert np.allclose(theirs @ ours, np.eye(3), atol=1e-9)
    assert np.allclose(nir.convert_transforms(theirs, "pystackreg", "napari-nir"), ours)
    # rigid: a rotation block and no perspective
    assert np.allclose(ours[:, 2, :2], 0, atol=1e-12)
    assert np.allclose(np.einsum("tij,tkj->tik", ours[:, :2, :2], ours[:, :2, :2]), np.eye(2), atol=1e-9)
    # a fit started from these transforms begins where the first one ended (1 step)
    started = nir.fuse(drift.frames, "rigid", init=ours, steps=1, device="cpu")
    assert np.abs(started.transforms() - ours).max() < 0.05
    assert "initial_transforms" in started.provenance()
    with pytest.raises(ValueError, match="shape"):
        nir.fuse(drift.frames, "rigid", init=ours[:3], steps=1, device="cpu")
    with pytest.raises(ValueError, match="singular"):
        nir.fuse(drift.frames, "rigid", init=np.zeros((6, 3, 3)), steps=1, device="cpu")


def test_pystackreg_reads_our_transforms_and_we_read_theirs(drift, rigid_fit):
    """pystackreg's transform_stack with our 'pystackreg' tmats reproduces registered(order=3) (both cubic
    B-splines); its own registration converted to ours starts a fit."""
    stackreg = pytest.importorskip("pystackreg")
    frames = drift.clean
    theirs = stackreg.StackReg(stackreg.StackReg.RIGID_BODY).transform_stack(
        frames, tmats=rigid_fit.transforms(convention="pystackreg"))
    ours = rigid_fit.apply(frames, order=3)
    keep = _interior(ours, 6)
    assert np.sqrt(np.mean((theirs - ours)[:, keep] ** 2)) < 1e-3 * np.ptp(frames)
    tmats = stackreg.StackReg(stackreg.StackReg.RIGID_BODY).register_stack(frames, reference="mean")
    fit = nir.fuse(drift.frames, "rigid", init=nir.convert_transforms(tmats, "pystackreg", "napari-nir"),
                   steps=60, device="cpu")
    assert corner_error(fit.homographies, drift.homographies, (64, 64)).mean() < 0.5


def test_channels_axis_registers_on_one_channel_and_applies_to_all(stack, channel_fit):
    assert channel_fit.source_axes == "TCYX" and channel_fit.channels == 1
    out = channel_fit.registered()
    assert out.shape == stack.frames.shape and out.dtype == np.uint16
    assert channel_fit.provenance()["axes"] == {"input": "TCYX", "registered_on": "channel 0"}
    error = corner_error(channel_fit.homographies, stack.homographies, (64, 64))
    assert error.mean() < 0.5
    # channel 1 follows channel 0's alignment: its noise-free rates agree across the registered frames
    clean = channel_fit.apply(stack.clean, axes="TCYX", order=3)
    keep = _interior(clean, 10)
    assert np.std(clean[:, 1], 0)[keep].mean() < 0.25 * np.std(stack.clean[:, 1], 0)[keep].mean()


def test_planes_axis_uses_the_maximum_projection_by_default(stack):
    volume = np.stack([stack.frames[:, 0], stack.frames[:, 1] // 2, stack.frames[:, 0] // 3], 1)  # T, Z, Y, X
    fit = nir.fuse(volume, "translation", axes="TZYX", steps=5, device="cpu")
    assert fit.provenance()["axes"]["registered_on"] == "the maximum projection over Z"
    assert fit.registered().shape == volume.shape
    plane = nir.fuse(volume, "translation", axes="TZYX", register_on=2, steps=5, device="cpu")
    assert plane.provenance()["axes"]["registered_on"] == "plane 2"


@pytest.mark.parametrize("axes, register_on, message", [
    ("TYX", None, "names 3 axes"), ("TCQX", None, "unknown letter"), ("TCCX", None, "twice"),
    ("CZYX", None, "must contain T"), ("TCYX", 5, "channel must be an index"), ("TCYX", "max", "channel must be"),
])
def test_axes_errors_are_clear(stack, axes, register_on, message):
    with pytest.raises(ValueError, match=message):
        nir.fuse(stack.frames, "translation", axes=axes, register_on=register_on, steps=1, device="cpu")


def test_apply_and_registered_refuse_what_they_cannot_do(drift, rigid_fit, tmp_path):
    with pytest.raises(ValueError, match="frames on its T axis"):
        rigid_fit.apply(drift.frames[:4])
    with pytest.raises(ValueError, match="pixels"):
        rigid_fit.apply(drift.frames[:, :50])
    with pytest.raises(ValueError, match="order"):
        rigid_fit.registered(order=2)
    with pytest.raises(ValueError, match="out of range"):
        rigid_fit.registered(reference=6)
    with pytest.raises(ValueError, match="pystackreg transforms"):
        rigid_fit.transforms(convention="pystackreg", extent="union")
    rigid_fit.save(tmp_path / "fit.npz")
    loaded = nir.load(tmp_path / "fit.npz")
    with pytest.raises(ValueError, match="apply"):
        loaded.registered()
    assert np.array_equal(loaded.apply(drift.frames), rigid_fit.registered())
    before = drift.frames.copy()
    rigid_fit.apply(drift.frames, order=3)
    assert np.array_equal(drift.frames, before)  # the caller's array is never written


def test_flow_registered_aligns_the_frames():
    from napari_nir._sample_data import flow_burst

    sample = flow_burst(3, (48, 48), seed=1)
    fit = nir.fuse(sample.frames, "flow", steps=30, device="cpu", batch=2048)
    out = fit.registered()
    assert out.shape == sample.frames.shape
    with pytest.raises(ValueError, match="flow"):
        fit.transforms()


def test_resample_frame_fills_outside_and_copies_labels():
    frame = np.arange(16, dtype=np.uint8).reshape(4, 4)
    positions = np.array([[0.0, 0.0], [3.0, 3.0], [-2.0, 1.0], [1.4, 2.6]])  # (col, row)
    out = registration.resample_frame(frame, positions, (1, 4), 0, fill=255)
    assert out.tolist() == [[0, 15, 255, 13]]


def test_zarr_input_is_registered_lazily_frame_by_frame(drift, rigid_fit):
    zarr = pytest.importorskip("zarr")
    dask_array = pytest.importorskip("dask.array")
    store = zarr.create_array(store=zarr.storage.MemoryStore(), shape=drift.frames.shape, chunks=(1, 64, 64),
                              dtype=drift.frames.dtype)
    store[:] = drift.frames
    lazy = rigid_fit.apply(store)
    assert isinstance(lazy, dask_array.Array) and lazy.chunks[0] == (1,) * len(drift.frames)
    assert np.array_equal(lazy.compute(), rigid_fit.registered())


def test_registered_stack_sits_on_the_canonical_view(drift, rigid_fit):
    """registered_origin: the registered grid's first pixel on the union canonical view; the registered frames
    there agree with the canonical view (napari overlays them at that offset)."""
    from scipy.ndimage import map_coordinates

    row, col = rigid_fit.registered_origin()
    canonical = rigid_fit.canonical(dtype="float32")
    mean = rigid_fit.registered(order=1).astype(np.float32).mean(0)
    rr, cc = np.mgrid[10:54, 10:54].astype(float)
    window = map_coordinates(canonical, [rr + row, cc + col], order=1)  # the same pixels on the canonical view
    assert np.abs(window - mean[10:54, 10:54]).mean() < 0.02 * np.ptp(drift.frames)
    shifted = map_coordinates(canonical, [rr + row + 1.5, cc + col], order=1)  # a pixel and a half off: not so
    assert np.abs(shifted - mean[10:54, 10:54]).mean() > 2 * np.abs(window - mean[10:54, 10:54]).mean()
