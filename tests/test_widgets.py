"""The "Fuse burst" dock widget and the result -> layers helpers, in a real napari viewer (under Xvfb).

Small bursts (4 x 48 x 48 RGB), few steps and small batches keep the whole file fast on a 2-core CPU.
Set NIR_SCREENSHOTS=1 to (re)write docs/images/fuse_widget.png from ``test_screenshot``.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

napari = pytest.importorskip("napari")

from napari_nir import _widgets  # noqa: E402
from napari_nir._layers import META_KEY, OWNER_KEY, add_result_to_viewer, fusion_layer_data  # noqa: E402
from napari_nir._widgets import FuseWidget, burst_data  # noqa: E402

FAST = {"preview_every": 5, "batch": 2048}  # small batches: 48 x 48 frames need no more
TIMEOUT_MS = 60_000
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "fuse_widget.png"


@pytest.fixture(scope="module")
def frames():
    from napari_nir._sample_data import homography_burst

    return homography_burst(4, (48, 48), seed=1).frames  # (4, 48, 48, 3) float32


@pytest.fixture
def notes(monkeypatch):
    """Notifications shown by the widget module, by kind."""
    from napari_nir import _runner

    seen = {"error": [], "warning": [], "info": []}
    for kind in seen:
        for module in (_widgets, _runner):
            if hasattr(module, f"show_{kind}"):
                monkeypatch.setattr(module, f"show_{kind}", lambda message, kind=kind: seen[kind].append(str(message)))
    return seen


def _docked(make_napari_viewer, frames, steps=30, **viewer_kwargs):
    viewer = make_napari_viewer(**viewer_kwargs)
    layer = viewer.add_image(frames.copy(), rgb=True, name="burst")
    _, widget = viewer.window.add_plugin_dock_widget("napari-nir", "Fuse burst")
    assert isinstance(widget, FuseWidget)
    widget.layer.value = layer
    widget.steps.value = steps
    widget.device.value = "cpu"
    widget.fit_options = dict(FAST)
    return viewer, layer, widget


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)


def _names(viewer):
    return [layer.name for layer in viewer.layers]


def test_fuse_adds_layers(make_napari_viewer, qtbot, frames, notes):
    viewer, layer, widget = _docked(make_napari_viewer, frames)
    layer.scale = (1.0, 0.5, 0.25)
    layer.translate = (0.0, 10.0, -5.0)
    before = layer.data.copy()
    inserted = []
    viewer.layers.events.inserted.connect(lambda event: inserted.append(event.value.name))

    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS) as done:
        worker = widget.run()
        assert worker is not None and widget.worker is worker
        assert widget.run_button.text == "Cancel"
    assert done.args == ["done"]
    assert widget.worker is None and widget.run_button.text == "Run"

    assert "burst preview" in inserted  # the live preview was shown ...
    assert _names(viewer) == ["burst", "burst canonical", "burst frames", "burst registered",
                              "burst outlines", "burst residual"]  # ... and removed
    canonical, per_frame, outlines = (viewer.layers[n] for n in ("burst canonical", "burst frames", "burst outlines"))
    assert isinstance(canonical, napari.layers.Image) and canonical.rgb
    assert canonical.data.ndim == 3 and canonical.data.shape[-1] == 3 and canonical.data.dtype == np.float32
    assert min(canonical.data.shape[:2]) >= 48  # the union of all frames
    assert isinstance(per_frame, napari.layers.Image) and per_frame.rgb
    assert per_frame.data.shape == frames.shape and per_frame.data.dtype == frames.dtype
    assert isinstance(outlines, napari.layers.Shapes) and outlines.nshapes == 4
    assert all(s.shape == (4, 2) for s in outlines.data) and set(outlines.shape_type) == {"polygon"}
    np.testing.assert_allclose(canonical.scale, [0.5, 0.25])
    np.testing.assert_allclose(canonical.translate, [10.0, -5.0])
    np.testing.assert_allclose(per_frame.scale, [1.0, 0.5, 0.25])
    np.testing.assert_allclose(outlines.scale, [0.5, 0.25])
    for out in (canonical, per_frame, outlines):
        meta = out.metadata[META_KEY]
        assert meta["software"] == "napari-nir" and meta["steps_run"] == 30 and meta["completed"]
        assert meta["parameters"]["motion"] == "homography" and meta["device"] == "cpu"
        assert out.metadata[OWNER_KEY]["source"] == "burst"
    assert widget.last_result is not None and widget.last_result.final_psnr > 10
    assert np.array_equal(layer.data, before) and layer.data.dtype == before.dtype
    assert not notes["error"] and any("PSNR" in m for m in notes["info"])


def test_cancel_then_rerun(make_napari_viewer, qtbot, frames, notes):
    import torch

    threads = torch.get_num_threads()
    viewer, layer, widget = _docked(make_napari_viewer, frames, steps=3000)
    worker = widget.run()
    events, job, steps_at_cancel = [], widget._job, []

    def first_event(event):
        events.append(event.step)
        if len(events) == 1:
            steps_at_cancel.append(len(job.history))  # steps the worker had finished when the GUI cancelled
            widget.cancel()

    worker.yielded.connect(first_event)
    assert widget.run_button.text == "Cancel"
    assert widget.run() is None  # a second run while one is running: refused with a warning
    assert notes["warning"] and widget.worker is worker
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS) as done:
        pass
    assert done.args == ["cancelled"]
    _wait(qtbot, widget)
    # stopped within a step or two of the cancel; counted on the worker's side, since yielded signals queue up
    # in the GUI thread (a CI run saw 4 events delivered for a worker that had stopped in time)
    assert len(job.history) - steps_at_cancel[0] <= 2 and len(job.history) < 3000
    assert _names(viewer) == ["burst"]  # no result layers, no preview layer
    assert widget.run_button.text == "Run" and widget.run_button.enabled and widget.layer.enabled
    assert not notes["error"]
    del worker
    gc.collect()
    assert torch.get_num_threads() == threads  # the worker's cap is undone

    widget.steps.value = 20
    assert widget.run() is not None
    _wait(qtbot, widget)
    assert _names(viewer) == ["burst", "burst canonical", "burst frames", "burst registered", "burst outlines",
                              "burst residual"]
    assert viewer.layers["burst canonical"].metadata[META_KEY]["steps_run"] == 20


def test_bad_layers_are_refused(make_napari_viewer, qtbot, frames, notes, monkeypatch):
    viewer = make_napari_viewer()
    widget = FuseWidget(viewer)  # directly, not through the plugin manager
    assert widget.run() is None and "no image layer" in notes["error"][-1]

    labels = viewer.add_labels(np.zeros((4, 48, 48), dtype=np.uint8), name="labels")
    assert labels not in widget.layer.choices  # only Image layers are offered
    with pytest.raises(TypeError, match="Image layer"):
        burst_data(labels)

    cases = {
        "flat": (viewer.add_image(frames[0, ..., 0].copy(), name="flat"), "single 2-D image"),
        "photo": (viewer.add_image(frames[0].copy(), rgb=True, name="photo"), "one RGB image"),
        "volumes": (viewer.add_image(np.random.rand(3, 4, 32, 32).astype(np.float32), rgb=False,
                                     name="volumes"), "T×Z×Y×X"),
        "nans": (viewer.add_image(np.where(frames > 0.9, np.nan, frames), rgb=True, name="nans"), "NaN"),
        "tiny": (viewer.add_image(np.random.rand(1, 48, 48).astype(np.float32), name="tiny"), "frame"),
    }
    n_layers = len(viewer.layers)
    for name, (layer, expected) in cases.items():
        assert layer in widget.layer.choices
        widget.layer.value = layer
        before = len(notes["error"])
        assert widget.run() is None, name
        assert len(notes["error"]) == before + 1, name
        assert expected.lower() in notes["error"][-1].lower(), (name, notes["error"][-1])
        assert widget.worker is None and widget.run_button.text == "Run"
    assert len(viewer.layers) == n_layers

    # unpatched, the message reaches napari's notification system (not only the terminal)
    from napari.utils import notifications

    reached = []
    monkeypatch.setattr(_widgets, "show_error", notifications.show_error)
    notifications.notification_manager.notification_ready.connect(reached.append)
    try:
        widget.layer.value = cases["flat"][0]
        assert widget.run() is None
    finally:
        notifications.notification_manager.notification_ready.disconnect(reached.append)
    assert any("single 2-D image" in str(n.message) for n in reached)


def test_error_in_worker_is_shown(make_napari_viewer, qtbot, frames, notes, monkeypatch):
    from napari_nir.core import api

    def broken(self):
        raise RuntimeError("the GPU ran out of memory (simulated); use device='cpu'")

    monkeypatch.setattr(api.FusionJob, "result", broken)
    viewer, _, widget = _docked(make_napari_viewer, frames, steps=10)
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS) as done:
        widget.run()
    assert done.args == ["error"]
    assert widget.worker is None and widget.run_button.text == "Run"
    assert notes["error"] and "out of memory (simulated)" in notes["error"][-1]
    assert _names(viewer) == ["burst"]


def test_rerun_replaces_only_own_layers(make_napari_viewer, qtbot, frames, notes):
    viewer, layer, widget = _docked(make_napari_viewer, frames, steps=20)
    mine = viewer.add_image(np.ones((10, 10), np.float32), name="burst canonical")  # the user's, same name
    similar = viewer.add_shapes([np.array([[0, 0], [5, 0], [5, 5]])], shape_type="polygon",
                               name="burst outlines (mine)")
    mine_data, similar_data = mine.data.copy(), [s.copy() for s in similar.data]
    widget.layer.value = layer

    widget.run()
    _wait(qtbot, widget)
    first = _names(viewer)
    assert "burst canonical [1]" in first  # ours, renamed by napari because the user had the name
    ours = viewer.layers["burst canonical [1]"]
    assert ours.metadata[META_KEY]["seed"] == 0

    outlines = viewer.layers["burst outlines"]
    inserted, removed = [], []
    viewer.layers.events.inserted.connect(lambda event: inserted.append(event.value.name))
    viewer.layers.events.removed.connect(lambda event: removed.append(event.value.name))
    widget.seed.value = 7
    widget.run()
    _wait(qtbot, widget)
    assert _names(viewer) == first  # replaced in place: no duplicates
    assert viewer.layers["burst canonical [1]"] is ours and ours.metadata[META_KEY]["seed"] == 7
    assert viewer.layers["burst outlines"] is outlines and outlines.metadata[META_KEY]["seed"] == 7
    assert inserted == removed == []  # the preview was shown in the last canonical: no layer added or removed

    # a re-run that is cancelled gives the borrowed canonical layer back as it was
    kept = ours.data.copy()
    widget.steps.value = 3000
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS) as done:
        widget.run()
        qtbot.waitUntil(lambda: ours.name == "burst canonical (preview)", timeout=TIMEOUT_MS)
        widget.cancel()
    assert done.args == ["cancelled"] and _names(viewer) == first
    assert ours.name == "burst canonical [1]" and np.array_equal(ours.data, kept)
    assert ours.metadata[META_KEY]["seed"] == 7
    assert viewer.layers["burst canonical"] is mine and np.array_equal(mine.data, mine_data)
    assert OWNER_KEY not in mine.metadata
    assert viewer.layers["burst outlines (mine)"] is similar
    assert all(np.array_equal(a, b) for a, b in zip(similar.data, similar_data))
    assert not notes["error"]


def test_flow_run_replaces_homography_layers(make_napari_viewer, qtbot, frames, notes):
    viewer, _, widget = _docked(make_napari_viewer, frames, steps=10)
    widget.run()
    _wait(qtbot, widget)
    assert "burst outlines" in viewer.layers
    widget.motion.value = "flow"
    widget.run()
    _wait(qtbot, widget)
    assert not notes["error"], notes["error"]
    # the residual layer is replaced in place (it was there after the homography run)
    assert _names(viewer) == ["burst", "burst canonical", "burst frames", "burst registered", "burst residual",
                              "burst flow vectors", "burst flow magnitude"]
    assert "burst outlines" not in viewer.layers  # stale outlines removed
    assert viewer.layers["burst canonical"].metadata[META_KEY]["parameters"]["motion"] == "flow"


def test_console_helper(make_napari_viewer, frames):
    import napari_nir as nir

    viewer = make_napari_viewer()
    viewer.add_image(frames, rgb=True, name="burst", scale=(1, 2, 2))
    fit = nir.fuse(frames, steps=20, device="cpu", batch=2048)
    layers = add_result_to_viewer(viewer, fit, "burst")
    assert [lay.name for lay in layers] == ["burst canonical", "burst frames", "burst registered", "burst outlines",
                                            "burst residual"]
    np.testing.assert_allclose(layers[0].scale, [2, 2])
    assert layers[0].rgb and layers[1].data.shape == frames.shape
    assert layers[0].metadata[META_KEY]["input"]["shape"] == list(frames.shape)
    again = add_result_to_viewer(viewer, fit, "burst")
    assert len(viewer.layers) == 6 and again[0] is layers[0]

    grey = frames.mean(-1)  # (T, H, W): no colour axis
    gfit = nir.fuse(grey, steps=20, device="cpu", batch=2048)
    data = fusion_layer_data(gfit, "grey")
    assert [kw["rgb"] for _, kw, _ in data[:2]] == [False, False]
    assert data[0][0].ndim == 2 and data[1][0].shape == grey.shape
    add_result_to_viewer(viewer, gfit, "grey")
    assert "grey canonical" in viewer.layers and not viewer.layers["grey canonical"].rgb


def test_screenshot(make_napari_viewer, qtbot, notes):
    from napari_nir._sample_data import homography_burst

    write = os.environ.get("NIR_SCREENSHOTS") == "1"
    if write:  # the documentation image: a bigger burst, a proper fit
        sample = homography_burst(6, (128, 128), seed=2, translation=0.15)
        steps = 300
    else:
        sample = homography_burst(4, (48, 48), seed=1)
        steps = 20
    viewer, layer, widget = _docked(make_napari_viewer, sample.frames, steps=steps, show=True)
    viewer.window.resize(1200, 760)
    widget.run()
    _wait(qtbot, widget)
    assert "burst canonical" in viewer.layers and not notes["error"]
    layer.visible = False
    viewer.reset_view()
    qtbot.wait(200)
    shot = viewer.screenshot(canvas_only=False)
    assert shot.ndim == 3 and shot.shape[-1] == 4 and float(shot[..., :3].std()) > 0
    if write:
        import imageio.v3 as iio

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(SCREENSHOT, shot[..., :3])


@pytest.mark.parametrize("task", ["rain", "fence"])
def test_separate_widget_from_the_task_table(make_napari_viewer, qtbot, task, notes):
    from napari_nir import TASKS
    from napari_nir._sample_data import separation_burst
    from napari_nir._widgets import SeparateWidget

    viewer = make_napari_viewer()
    burst = separation_burst(task, 3, (32, 32)).frames
    layer = viewer.add_image(burst.copy(), rgb=True, name="burst")
    _, widget = viewer.window.add_plugin_dock_widget("napari-nir", "Separate layers")
    assert isinstance(widget, SeparateWidget)
    assert list(widget.task.choices) == list(TASKS)  # generated from the table
    widget.layer.value, widget.task.value = layer, task
    widget.steps.value, widget.device.value = 10, "cpu"
    widget.fit_options = dict(FAST)
    assert widget.run() is not None
    _wait(qtbot, widget)
    names = _names(viewer)
    for name in TASKS[task].layers:
        assert f"burst {name}" in names
    alpha = viewer.layers["burst alpha"]
    assert alpha.data.shape == (3, 32, 32) and alpha.data.dtype == np.float32
    params = viewer.layers["burst scene"].metadata[META_KEY]["parameters"]
    # "task default" motion: the task table's choice for the preset
    assert params["task"] == task and params["motion"] == TASKS[task].default_motion(params["preset"])
    viewer.add_image(burst[:, :, :, 0], name="another layer")  # layer events reset the choices
    assert widget.motion.value == "task default"
    assert np.array_equal(layer.data, burst)
    assert not notes["error"]


def test_rigid_reflection_layer_is_shown_and_removed_with_the_next_run(make_napari_viewer):
    """A reflection with a rigid layer of its own adds "<source> interference canonical" (hidden); a later run
    of the same source without one removes it."""
    import napari_nir as nir
    from napari_nir._sample_data import separation_burst

    frames = separation_burst("reflection", 3, (32, 32)).frames
    viewer = make_napari_viewer()
    viewer.add_image(frames.copy(), rgb=True, name="burst")
    rigid = nir.separate(frames, "reflection", steps=10, device="cpu", interference_motion="homography")
    add_result_to_viewer(viewer, rigid, "burst")
    layer = viewer.layers["burst interference canonical"]
    assert layer.data.shape == (32, 32, 3) and layer.rgb and not layer.visible
    np.testing.assert_array_equal(layer.data, rigid.interference_canonical())
    free = nir.separate(frames, "reflection", steps=10, device="cpu", interference_motion="none")
    add_result_to_viewer(viewer, free, "burst")
    assert "burst interference canonical" not in _names(viewer) and "burst scene" in _names(viewer)


def _viewer_with_fit(make_napari_viewer, frames, motion):
    """A viewer holding the burst and a 10-step fit of ``motion`` added as result layers; (viewer, fit)."""
    import napari_nir as nir

    viewer = make_napari_viewer()
    viewer.add_image(frames.copy(), rgb=True, name="burst")
    fit = nir.fuse(frames, motion, steps=10, device="cpu", **FAST)
    add_result_to_viewer(viewer, fit, "burst")
    return viewer, fit


def test_flow_fit_gives_vectors_and_magnitude(make_napari_viewer, frames):
    viewer, _ = _viewer_with_fit(make_napari_viewer, frames, "flow")
    vectors = viewer.layers["burst flow vectors"]
    assert type(vectors).__name__ == "Vectors" and vectors.data.shape[1:] == (2, 3)
    assert viewer.layers["burst flow magnitude"].data.shape == (4, 48, 48)
    assert "burst outlines" not in _names(viewer)


def test_every_sample_opens(make_napari_viewer):
    """File > Open Sample: every napari-nir sample, with its ground truth as hidden layers."""
    import yaml

    import napari_nir
    from napari_nir._layers import SAMPLE_KEY
    from napari_nir._widgets import SeparateWidget

    manifest = yaml.safe_load(Path(napari_nir.__file__).with_name("napari.yaml").read_text())
    viewer = make_napari_viewer()
    fuse_open = FuseWidget(viewer)  # open before the samples: it follows each new burst
    for entry in manifest["contributions"]["sample_data"]:
        before = len(viewer.layers)
        viewer.open_sample("napari-nir", entry["key"])
        added = list(viewer.layers)[before:]
        assert added and added[0].visible and added[0].data.ndim >= 3
        assert all(not layer.visible for layer in added[1:])
        burst = added[0]
        assert burst.metadata[SAMPLE_KEY]["role"] == "burst"
        assert all(layer.metadata[SAMPLE_KEY]["role"] == "ground truth" for layer in added[1:])
        # the last layer a sample adds (selected) is its ground truth: the widgets still start on the burst
        fuse, separate = FuseWidget(viewer), SeparateWidget(viewer)
        assert fuse.layer.value is burst and separate.layer.value is burst, entry["key"]
        assert fuse_open.layer.value is burst, entry["key"]
        task = burst.metadata[SAMPLE_KEY]["task"]
        if task:
            assert separate.task.value == task
    # the user's pick is kept while the layer exists, whatever is added after it
    fuse_open.layer.value = viewer.layers["astronaut burst"]
    viewer.add_image(np.zeros((3, 8, 8), np.float32), name="another stack")
    assert fuse_open.layer.value is viewer.layers["astronaut burst"]
    viewer.layers.remove("astronaut burst")
    assert fuse_open.layer.value is viewer.layers["another stack"]


SCREENSHOT_RUNS = {  # docs/images/<name>.png: widget, settings, sample maker
    "flow_widget": ("Fuse burst", {"motion": "flow"}, "make_flow_sample", 400),
    "occlusion_widget": ("Fuse burst", {"motion": "occlusion"}, "make_occlusion_sample", 400),
    **{f"{task}_widget": ("Separate layers", {"task": task}, f"make_{task}_sample", 600)
       for task in ("reflection", "fence", "rain", "moire")},
    "drift_widget": ("Fuse burst", {"motion": "rigid"}, "make_microscopy_drift_sample", 0),
}
SCREENSHOT_SHOWN = {"drift_widget": ("registered",)}  # result layers shown instead of the canonical view


@pytest.mark.skipif(os.environ.get("NIR_SCREENSHOTS") != "1", reason="writes docs/images; set NIR_SCREENSHOTS=1")
@pytest.mark.parametrize("name", list(SCREENSHOT_RUNS))
def test_task_screenshots(make_napari_viewer, qtbot, name, notes):
    """The documentation screenshots: each task's result in the real viewer (real pixels)."""
    from napari_nir import _sample_data

    widget_name, settings, maker, steps = SCREENSHOT_RUNS[name]
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1200, 760)
    data, kwargs, _ = getattr(_sample_data, maker)()[0]
    layer = viewer.add_image(data, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget("napari-nir", widget_name)
    widget.layer.value = layer
    for key, value in settings.items():
        getattr(widget, key).value = value
    widget.steps.value, widget.device.value = steps, "cpu"
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=600_000)
    assert not notes["error"], notes["error"]
    layer.visible = False
    for role in SCREENSHOT_SHOWN.get(name, ()):
        viewer.layers[f"{layer.name} canonical"].visible = False
        viewer.layers[f"{layer.name} {role}"].visible = True
    viewer.reset_view()
    qtbot.wait(300)
    shot = viewer.screenshot(canvas_only=False)
    assert float(shot[..., :3].std()) > 0
    import imageio.v3 as iio

    iio.imwrite(SCREENSHOT.parent / f"{name}.png", shot[..., :3])


def test_occlusion_fit_adds_its_depth_map(make_napari_viewer, frames):
    """The occlusion model's w per frame is a (hidden) layer: where objects left the background's slice."""
    import napari_nir as nir

    viewer, fit = _viewer_with_fit(make_napari_viewer, frames, "occlusion")
    w = viewer.layers["burst occlusion w"]
    assert w.data.shape == (4, 48, 48) and not w.visible
    np.testing.assert_array_equal(w.data, fit.occlusion_w())
    add_result_to_viewer(viewer, nir.fuse(frames, "flow", steps=10, device="cpu", **FAST), "burst")
    assert "burst occlusion w" not in _names(viewer)  # a later flow fit of the same source replaces it


# -- one widget class configured by a spec: names, Advanced options -----------------------------------------
MAIN_CONTROLS = {"motion", "preset", "steps", "seed", "device", "task"}


def _small_burst(task="rain"):
    from napari_nir._sample_data import separation_burst

    return separation_burst(task, 3, (32, 32)).frames  # (3, 32, 32, 3)


def test_separate_widget_speaks_its_own_name(make_napari_viewer, notes):
    from napari_nir._widgets import SEPARATE_SPEC, SeparateWidget

    viewer = make_napari_viewer()
    widget = SeparateWidget(viewer)
    assert widget.spec is SEPARATE_SPEC and widget.spec.title == "Separate layers"
    assert widget.run() is None  # no layer
    flat = viewer.add_image(np.random.rand(32, 32).astype(np.float32), name="flat")
    widget.layer.value = flat
    assert widget.run() is None  # a single 2-D image
    assert len(notes["error"]) == 2
    assert notes["error"][0].startswith("Separate layers: no image layer to separate")
    assert notes["error"][1].startswith("Separate layers: ") and "Separate layers needs" in notes["error"][1]
    assert "single 2-D image" in notes["error"][1]
    assert not any("Fuse" in m for kind in notes.values() for m in kind), notes
    with pytest.raises(TypeError, match="Separate layers needs an Image layer"):
        burst_data(viewer.add_labels(np.zeros((3, 8, 8), np.uint8)), "Separate layers")
    with pytest.raises(ValueError, match="Fuse burst needs"):  # the default title
        burst_data(flat)


def test_advanced_options_are_generated_from_the_config(make_napari_viewer, qtbot, notes):
    from napari_nir._widgets import SeparateWidget
    from napari_nir.core.config import options

    viewer = make_napari_viewer()
    fuse, separate = FuseWidget(viewer), SeparateWidget(viewer)
    every = options()
    assert list(separate.advanced_options) == [flat for flat in every if flat not in MAIN_CONTROLS]
    assert list(fuse.advanced_options) == [flat for flat, opt in every.items()
                                           if flat not in MAIN_CONTROLS and opt.section != "separation"]
    for flat, field in separate.advanced_options.items():
        assert every[flat].doc in field.tooltip and field.value == ""  # empty: the preset's value
        if every[flat].choices:
            assert list(field.choices) == ["", *every[flat].choices]
    assert separate.advanced.root_native_widget.isHidden()  # compact by default
    separate.advanced_toggle.value = True
    assert not separate.advanced.root_native_widget.isHidden()
    separate.advanced_toggle.value = False
    assert separate.advanced.root_native_widget.isHidden()

    layer = viewer.add_image(_small_burst(), rgb=True, name="burst")
    separate.layer.value, separate.task.value = layer, "rain"
    separate.steps.value, separate.device.value = 5, "cpu"
    separate.fit_options = dict(FAST)  # batch 2048: the Advanced field wins
    separate.advanced_options["batch"].value = "4096"
    separate.advanced_options["loss"].value = "mse"
    separate.advanced_options["sparsity"].value = " 0.5 "
    assert separate.advanced_values() == {"batch": 4096, "loss": "mse", "sparsity": 0.5}
    with qtbot.waitSignal(separate.finished, timeout=TIMEOUT_MS) as done:
        assert separate.run() is not None
        config = separate._job.config
        description = separate.current_run.progress_bar.desc  # the activity dock's progress bar
        running = [w.enabled for w in (separate.layer, separate.task, separate.motion, separate.seed,
                                       separate.advanced_toggle, separate.advanced)]
    assert done.args == ["done"], notes["error"]
    assert config.get("batch") == 4096 and config.get("loss") == "mse" and config.get("sparsity") == 0.5
    assert config.get("preview_every") == 5  # from fit_options
    assert separate.last_result.config.get("batch") == 4096
    assert description.startswith("Separating burst"), description
    assert not any(running)  # every control was disabled while it ran ...
    assert separate.advanced.enabled and separate.task.enabled and separate.advanced_toggle.enabled  # ... not now
    finished = notes["info"] + notes["warning"]  # a warning when the verdict is doubtful (5 steps: it is)
    assert any(m.startswith("Separate layers: Separated 'burst'") for m in finished), finished
    assert not notes["error"]


def test_bad_advanced_values_are_refused(make_napari_viewer, notes):
    viewer = make_napari_viewer()
    layer = viewer.add_image(_small_burst(), rgb=True, name="burst")
    widget = FuseWidget(viewer)
    widget.layer.value, widget.device.value = layer, "cpu"
    widget.advanced_options["batch"].value = "abc"  # not readable
    assert widget.run() is None and widget.worker is None
    assert notes["error"][-1].startswith("Fuse burst: ") and "batch" in notes["error"][-1]
    assert "abc" in notes["error"][-1]
    widget.advanced_options["batch"].value = ""
    widget.advanced_options["lr_field"].value = "-1"  # readable, but fails validation
    assert widget.run() is None and widget.worker is None
    assert notes["error"][-1].startswith("Fuse burst: ") and "lr_field" in notes["error"][-1]
    assert len(notes["error"]) == 2 and widget.run_button.text == "Run" and widget.layer.enabled
    assert list(viewer.layers) == [layer]


def test_status_shows_the_stage(make_napari_viewer):
    from types import SimpleNamespace

    def event(step, stage="fit"):  # a ProgressEvent's fields
        return SimpleNamespace(step=step, total=10, loss=0.1, psnr=20.0, seconds=1.0, preview=None, stage=stage)

    from napari_nir._runner import ViewerRun
    from napari_nir._widgets import FUSE_SPEC

    viewer = make_napari_viewer()
    layer = viewer.add_image(np.random.default_rng(0).random((3, 16, 16)).astype(np.float32), name="burst")
    widget = FuseWidget(viewer)
    widget.steps.value = 10
    job = widget._make_job(layer.data)
    run = ViewerRun(viewer, FUSE_SPEC, layer, job, status=widget._show_status)  # not started: handlers by hand
    run._on_yielded(event(3, "scene warm-up"))
    assert widget.status.value.startswith("scene warm-up: step 3/10")
    run._on_yielded(event(4))  # the plain fit: no stage shown
    assert widget.status.value.startswith("step 4/10")


@pytest.fixture(scope="module")
def stack():
    from napari_nir._sample_data import microscopy_drift_stack

    return microscopy_drift_stack(5, (48, 48), max_shift_px=3.0, seed=1)  # frames (5, 2, 48, 48) uint16


def test_channels_layer_is_read_by_its_axis_labels_and_registered_whole(make_napari_viewer, qtbot, stack, notes):
    viewer = make_napari_viewer()
    layer = viewer.add_image(stack.frames.copy(), name="cells", axis_labels=("t", "c", "y", "x"))
    layer.scale = (1.0, 1.0, 0.5, 0.5)
    _, widget = viewer.window.add_plugin_dock_widget("napari-nir", "Fuse burst")
    widget.layer.value = layer
    widget.motion.value = "rigid"
    widget.steps.value = 20
    widget.device.value = "cpu"
    widget.register_on.value = "1"
    widget.fit_options = dict(FAST)
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS) as done:
        assert widget.run() is not None
    assert done.args == ["done"], notes
    registered = viewer.layers["cells registered"]
    assert registered.data.shape == stack.frames.shape and registered.data.dtype == np.uint16
    assert list(registered.scale) == [1.0, 1.0, 0.5, 0.5]
    assert widget.last_result.provenance()["axes"] == {"input": "TCYX", "registered_on": "channel 1"}
    np.testing.assert_array_equal(layer.data, stack.frames)  # the source layer is untouched


def test_ambiguous_4d_layer_asks_for_its_axes(make_napari_viewer, stack, notes):
    viewer = make_napari_viewer()
    layer = viewer.add_image(stack.frames.copy(), name="cells")  # napari's default labels say nothing
    _, widget = viewer.window.add_plugin_dock_widget("napari-nir", "Fuse burst")
    widget.layer.value = layer
    assert widget.run() is None
    assert "axes" in notes["error"][-1] and "TCYX" in notes["error"][-1]
    widget.axes.value = "TZYX"
    widget.register_on.value = "two"
    assert widget.run() is None and "register on" in notes["error"][-1]


def test_apply_alignment_registers_a_labels_layer(make_napari_viewer, qtbot, stack, notes):
    import napari_nir as nir

    viewer = make_napari_viewer()
    grey = stack.frames[:, 0]
    viewer.add_image(grey, name="cells")
    labels = np.zeros(grey.shape, np.uint8)
    labels[:, 8:20, 10:30] = 4
    labels[:, 26:40, 6:40] = 7
    viewer.add_labels(labels, name="nuclei")
    fit = nir.fuse(grey, "rigid", steps=20, device="cpu", batch=2048)
    _widgets.FITTED.clear()
    _widgets.FITTED["cells (rigid)"] = fit
    _, widget = viewer.window.add_plugin_dock_widget("napari-nir", "Apply alignment")
    assert isinstance(widget, _widgets.ApplyWidget)
    widget.reset_choices()
    widget.layers.value = [viewer.layers["nuclei"], viewer.layers["cells"]]
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS) as done:
        assert widget.run() is not None
    assert done.args == ["done"], notes
    registered = viewer.layers["nuclei registered"]
    assert type(registered).__name__ == "Labels" and set(np.unique(registered.data)) <= {0, 4, 7}
    np.testing.assert_array_equal(viewer.layers["cells registered"].data, fit.registered())
    _widgets.FITTED.clear()


def test_gui_stays_responsive_during_a_200_frame_fit(make_napari_viewer, qtbot, notes):
    """The longest gap between ticks of a 10 ms GUI timer while a 200-frame fit runs in the worker (small frames:
    the event loop is what is measured, not the fit)."""
    import time

    from qtpy.QtCore import QTimer

    rng = np.random.default_rng(0)
    base = rng.random((40, 40)).astype(np.float32)
    frames = np.stack([np.roll(base, (t % 3, t % 5), (0, 1)) for t in range(200)])
    viewer = make_napari_viewer()
    layer = viewer.add_image(frames, name="long")
    _, widget = viewer.window.add_plugin_dock_widget("napari-nir", "Fuse burst")
    widget.layer.value = layer
    widget.motion.value = "translation"
    widget.steps.value = 60
    widget.device.value = "cpu"
    widget.fit_options = {"preview_every": 5, "batch": 4096, "init": "identity"}
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS) as done:
        assert widget.run() is not None
    timer.stop()
    assert done.args == ["done"], notes
    gaps = np.diff(ticks)
    assert len(gaps) > 20
    print(f"200-frame fit: {len(gaps)} timer ticks, longest event-loop stall {gaps.max() * 1000:.0f} ms")
    assert gaps.max() < 0.2, f"longest event-loop stall {gaps.max() * 1000:.0f} ms"


def test_stops_when_the_dock_closes_or_the_layer_goes(make_napari_viewer, qtbot, frames, notes):
    """Closing the dock, removing the source layer or closing the viewer stops a fit within a step: no layers,
    no preview left."""
    import napari_nir

    viewer = make_napari_viewer()
    layer = viewer.add_image(frames.copy(), rgb=True, name="burst")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-nir", "Fuse burst")
    widget.steps.value, widget.device.value, widget.fit_options = 3000, "cpu", {**FAST, "preview_every": 1}
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS) as done:
        worker = widget.run()
        qtbot.waitUntil(lambda: "burst preview" in viewer.layers, timeout=TIMEOUT_MS)
        job = widget._job
        viewer.window.remove_dock_widget(dock)  # what the dock's close button does
    assert done.args == ["cancelled"] and worker is not None
    assert len(job.history) < 3000 and _names(viewer) == ["burst"]
    assert "dock was closed" in widget.current_run.message

    _, widget = viewer.window.add_plugin_dock_widget("napari-nir", "Fuse burst")
    widget.layer.value, widget.steps.value, widget.fit_options = layer, 3000, {**FAST, "preview_every": 1}
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS) as done:
        widget.run()
        qtbot.waitUntil(lambda: "burst preview" in viewer.layers, timeout=TIMEOUT_MS)
        viewer.layers.remove(layer)
    assert done.args == ["cancelled"] and _names(viewer) == []
    assert "'burst' was removed" in widget.current_run.message
    assert widget.status.value == widget.current_run.message  # the full text, in the status line too

    # closing the viewer (it removes every layer) stops a console run the same way
    layer = viewer.add_image(frames.copy(), rgb=True, name="burst")
    run = napari_nir.run_in_viewer(viewer, layer, steps=3000, device="cpu", **FAST)
    with qtbot.waitSignal(run.finished, timeout=TIMEOUT_MS) as done:
        qtbot.waitUntil(lambda: len(run.job.history) > 0, timeout=TIMEOUT_MS)
        viewer.close()
    assert done.args == ["cancelled"] and len(run.job.history) < 3000


def test_cancel_during_the_start_adds_nothing(make_napari_viewer, qtbot, frames, notes, monkeypatch):
    """A cancel while the feature start runs (no progress events yet) ends the run there."""
    import threading

    from napari_nir.core import motion

    reached, clicked = threading.Event(), threading.Event()
    original = motion.feature_homographies

    def slow_start(*args, **kwargs):  # the start of a large burst: still matching when the click lands
        reached.set()
        clicked.wait(TIMEOUT_MS / 1000)
        return original(*args, **kwargs)

    monkeypatch.setattr(motion, "feature_homographies", slow_start)
    viewer, _, widget = _docked(make_napari_viewer, frames, steps=3000)
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS) as done:
        widget.run()
        job = widget._job
        qtbot.waitUntil(reached.is_set, timeout=TIMEOUT_MS)
        widget.cancel()  # in the GUI thread, while the worker is inside the start
        clicked.set()
    assert done.args == ["cancelled"]
    assert job.model is None and job.history == []  # stopped inside the start: no model, no step
    assert _names(viewer) == ["burst"] and not notes["error"]


def test_console_call_returns_at_once_and_adds_the_layers(make_napari_viewer, qtbot, frames, notes):
    import napari_nir

    viewer = make_napari_viewer()
    layer = viewer.add_image(frames.copy(), rgb=True, name="burst")
    run = napari_nir.run_in_viewer(viewer, "burst", steps=20, device="cpu", **FAST)
    assert run.running and run.result is None  # returned before the fit ended
    with qtbot.waitSignal(run.finished, timeout=TIMEOUT_MS) as done:
        pass
    assert done.args == ["done"] and run.result is not None and run.outcome == "done"
    assert "burst canonical" in viewer.layers and "burst preview" not in viewer.layers
    assert run.message.startswith("Fuse burst: Fused 'burst'")
    sep = napari_nir.run_in_viewer(viewer, layer, "rain", steps=3000, device="cpu", **FAST)
    sep.cancel()
    with qtbot.waitSignal(sep.finished, timeout=TIMEOUT_MS) as done:
        pass
    assert done.args == ["cancelled"] and sep.message.startswith("Separate layers: cancelled")
    with pytest.raises(ValueError, match="no layer named"):
        napari_nir.run_in_viewer(viewer, "nothing")
