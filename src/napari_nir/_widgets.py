"""napari dock widgets. Thin: they validate in the GUI thread, run ``core`` in a napari thread worker, and
turn results into layers with ``_layers``.

Both dock widgets are one class, ``JobWidget``, configured by a ``JobSpec`` (its title, the verb of its
progress bar, how to build the core job, how to turn the result into layers, its extra controls), so every
message names the widget it comes from:

"Fuse burst" (``FuseWidget``): pick an image layer holding a burst (T x H x W, or T x H x W x 3/4 shown as
RGB), a motion model, a preset, steps, device and seed; Run. While it runs the button is Cancel, the activity
dock shows step / loss / PSNR, and a "<burst> preview" layer shows the canonical view every few seconds.
On success "<burst> canonical", "<burst> frames" and "<burst> outlines" are added (or replaced: only the
plugin's own layers).

"Separate layers" (``SeparateWidget``): the same plus a task from the task table (``core.tasks.TASKS``).

"Advanced options" (hidden by default) lists every other option of the configuration (``core.config.options()``,
with its description as tooltip); an empty field keeps the preset's value. Scripting::

    dock, w = viewer.window.add_plugin_dock_widget("napari-nir", "Fuse burst")
    w.steps.value = 200; w.advanced_options["batch"].value = "8192"; w.run(); ...; w.cancel()
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, LineEdit, PushButton, SpinBox
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_warning
from psygnal import Signal
from qtpy.QtCore import QEvent, QObject

from ._layers import OWNER_KEY, SAMPLE_KEY, fusion_layer_data, separation_layer_data
from ._runner import FITTED, ViewerRun
from .core.config import PRESETS, parse_value
from .core.config import options as config_options
from .core.motions import MOTIONS
from .core.registration import parse_axes, parse_register_on

if TYPE_CHECKING:
    import napari
    from magicgui.widgets.bases import ValueWidget
    from napari.layers import Layer

__all__ = ["run_in_viewer", "default_burst", "is_burst_layer", "JobSpec", "JobWidget", "FuseWidget",
           "SeparateWidget", "ApplyWidget", "FUSE_SPEC", "SEPARATE_SPEC", "FITTED", "burst_data", "layer_axes",
           "device_choices", "advanced_options"]

_ADVANCED_HEIGHT = 260  # pixels: the Advanced section scrolls inside this height

ACCEPTED = "a stack of frames: T×H×W (grey) or T×H×W×3/4 shown as RGB"
TASK_DEFAULT = "task default"
MAIN_OPTIONS = frozenset({"motion", "preset", "steps", "seed", "device", "task"})  # set by the main controls
PRESET_VALUE = "(preset)"  # the label of the empty choice of an Advanced menu


# -- the spec -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    """What makes one job widget: its names, its job, its layers and its extra controls.

    title: the widget's name, the prefix of its messages ("Fuse burst"). verb, past: "Fusing" (progress bar)
    and "Fused" (the message on success). action: what it does to a layer, for "no image layer to <action>".
    make_job(data, values, options): the core job (validates at once: ValueError/TypeError), with ``values``
    the controls' values by name (motion, preset, steps (None: the preset's), device, seed and those of the
    extra controls) and ``options`` further config options by flat name. to_layers(fit, source_name, scale=,
    translate=, rgb=): the result's layer data. extra_controls: factories of further controls (each a
    value widget with a ``name``; the widget gets it as an attribute of that name), shown under the layer.
    motion_choices, motion_tooltip, motion_default: the motion menu. skip_sections: config sections left out
    of Advanced.
    """

    title: str
    verb: str
    past: str
    action: str
    make_job: Callable[[Any, dict, dict], Any]
    to_layers: Callable[..., Any]
    motion_choices: tuple[str, ...]
    motion_tooltip: str = ""
    motion_default: str | None = None  # None: the first choice
    extra_controls: tuple[Callable[[], ValueWidget], ...] = ()
    skip_sections: tuple[str, ...] = ()


def _make_fusion_job(data, values: dict, options: dict):
    from .core.api import FusionJob

    return FusionJob(data, values["motion"], preset=values["preset"], steps=values["steps"], device=values["device"],
                     seed=values["seed"], axes=values.get("axes"), register_on=values.get("register_on"), **options)


def _make_separation_job(data, values: dict, options: dict):
    from .core.api import SeparationJob

    motion = None if values["motion"] == TASK_DEFAULT else values["motion"]
    return SeparationJob(data, values["task"], motion=motion, preset=values["preset"], steps=values["steps"],
                         device=values["device"], seed=values["seed"], axes=values.get("axes"),
                         register_on=values.get("register_on"), **options)


AXES_CHOICES = ("auto", "TYX", "TCYX", "TZYX", "CTYX", "ZTYX", "TZCYX", "TCZYX")


def _axes_control() -> ComboBox:
    """How to read a layer that is not a plain burst: its axes (auto: the layer's axis labels, or a burst)."""
    return ComboBox(name="axes", label="axes", choices=list(AXES_CHOICES), value="auto",
                    tooltip="the layer's axes: T frames, Y, X, C channels, Z planes. auto: the layer's axis labels "
                            "when they name t, c/z, y, x; else T×H×W, or T×H×W×3/4 shown as RGB")


def _register_on_control() -> LineEdit:
    widget = LineEdit(name="register_on", label="register on", value="",
                      tooltip="what the fit reads of a C or Z axis: a channel or plane index, or 'max' (the maximum "
                              "projection over Z); empty: all channels jointly, the maximum projection over Z. "
                              "The registered output has every channel and plane")
    widget.native.setPlaceholderText("all channels / max over Z")
    return widget


def layer_axes(layer, choice: str = "auto") -> str | None:
    """The axes string of a layer for a fit (None: a plain burst as ``burst_data`` reads it).

    choice: from the axes menu; "auto" reads the layer's ``axis_labels`` when they are single letters of
    T, C, Z, Y, X covering T, Y and X (napari's default labels "0", "1", ... say nothing)."""
    if choice and choice != "auto":
        return choice
    if getattr(layer, "rgb", False):
        return None
    labels = [str(label).strip().upper() for label in getattr(layer, "axis_labels", ())]
    letters = "".join(label[:1] for label in labels if len(label) == 1)
    if len(letters) == len(labels) and set("TYX") <= set(letters) and set(letters) <= set("TCZYX") \
            and len(set(letters)) == len(letters) and letters not in ("TYX",):
        return letters
    return None


def _task_control() -> ComboBox:
    """The task menu, generated from the task table: each entry with its description in the tooltip."""
    from .core.tasks import TASKS

    return ComboBox(name="task", label="task", choices=[(t.title, t.name) for t in TASKS.values()],
                    value=next(iter(TASKS)),
                    tooltip="\n".join(f"{t.title}: {t.description}" for t in TASKS.values()))


def _motion_tooltip() -> str:
    """The motion menu's tooltip, generated from the motion table: each model with its description."""
    return "\n".join(f"{name}: {getattr(m, 'description', '')}" for name, m in MOTIONS.items())


FUSE_SPEC = JobSpec(
    title="Fuse burst", verb="Fusing", past="Fused", action="fuse", make_job=_make_fusion_job,
    to_layers=fusion_layer_data, motion_choices=tuple(MOTIONS), motion_tooltip=_motion_tooltip(),
    motion_default="homography",
    extra_controls=(_axes_control, _register_on_control),
    skip_sections=("separation",),  # fusion ignores them
)

SEPARATE_SPEC = JobSpec(
    title="Separate layers", verb="Separating", past="Separated", action="separate",
    make_job=_make_separation_job, to_layers=separation_layer_data,
    motion_choices=(TASK_DEFAULT, *MOTIONS),  # static choices: magicgui's reset_choices restores these
    motion_tooltip="the scene's motion model; 'task default' uses the task table's choice\n" + _motion_tooltip(),
    extra_controls=(_task_control, _axes_control, _register_on_control),
)


# -- helpers --------------------------------------------------------------------------------------------
def burst_data(layer: Layer, title: str | JobSpec = "Fuse burst"):
    """The burst array of an image layer: (T, H, W) or (T, H, W, C) with C the RGB(A) axis (``layer.rgb``).

    Multiscale layers give their full-resolution level. Raises TypeError/ValueError saying which layouts
    are accepted and how to get one; ``title`` (or a JobSpec) names the widget asking.
    """
    from napari.layers import Image

    if isinstance(title, JobSpec):
        title = title.title
    name = getattr(layer, "name", "?")
    if not isinstance(layer, Image):
        raise TypeError(f"layer {name!r} is a {type(layer).__name__} layer; {title} needs an Image layer "
                        f"holding {ACCEPTED}")
    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(int(s) for s in data.shape)
    nd = len(shape)
    if layer.rgb:
        if nd == 4:
            return data
        if nd == 3:
            raise ValueError(f"layer {name!r} is one RGB image {shape}, not a burst. {title} needs several "
                             f"frames of one scene, {ACCEPTED}: open the frames together as one stack "
                             "(File > Open Files as Stack...) or stack them (np.stack(frames)).")
        raise ValueError(f"layer {name!r} is an RGB stack with {nd - 1} non-colour axes {shape}; {title} "
                         f"accepts {ACCEPTED}. Add one burst as its own layer, e.g. "
                         "viewer.add_image(layer.data[:, z], rgb=True).")
    if nd == 3:
        return data
    if nd == 2:
        raise ValueError(f"layer {name!r} is a single 2-D image {shape}, not a burst. {title} needs several "
                         f"frames of one scene, {ACCEPTED}: open the frames together as one stack "
                         "(File > Open Files as Stack...) or stack them (np.stack(frames)).")
    if nd == 4:
        raise ValueError(f"layer {name!r} is 4-D {shape} and not RGB, so its layout is ambiguous (T×Z×Y×X? "
                         f"T×C×Y×X?). Choose its layout in the 'axes' menu (e.g. TCYX: channels, TZYX: planes); "
                         "for colour frames add the layer with rgb=True.")
    raise ValueError(f"layer {name!r} has {nd} axes {shape}; {title} accepts {ACCEPTED}.")


def layer_burst(layer, axes: str | None, title: str | JobSpec = "Fuse burst"):
    """The array of ``layer`` a fit reads: the burst as ``burst_data`` checks it when ``axes`` is None
    (``layer_axes``), else the layer's full-resolution data, which the job reads in those axes."""
    if axes is None:
        return burst_data(layer, title)
    return layer.data[0] if layer.multiscale else layer.data


def is_ground_truth(layer) -> bool:
    """A layer the plugin's samples mark as ground truth (``metadata[SAMPLE_KEY]["role"]``)."""
    return (getattr(layer, "metadata", {}).get(SAMPLE_KEY) or {}).get("role") == "ground truth"


def is_burst_layer(layer) -> bool:
    """An image layer holding a stack of frames (T >= 2 before Y, X and an RGB axis) that is neither a result of
    ours nor a sample's ground truth."""
    from napari.layers import Image

    if not isinstance(layer, Image) or layer.metadata.get(OWNER_KEY) or is_ground_truth(layer):
        return False
    shape = (layer.data[0] if layer.multiscale else layer.data).shape
    return len(shape) - (1 if layer.rgb else 0) >= 3 and shape[0] >= 2


def default_burst(viewer, choices: list):
    """The burst menu's default among ``choices`` (layers): the selected layer when it is a burst, else the newest
    burst (``is_burst_layer``; newest: last in the layer list), else the newest layer that is not ground truth,
    else None. Never a sample's ground truth while anything else is there."""
    active = viewer.layers.selection.active
    if active in choices and is_burst_layer(active):
        return active
    for pool in ([layer for layer in choices if is_burst_layer(layer)],
                 [layer for layer in choices if not is_ground_truth(layer)], choices):
        if pool:
            return pool[-1]
    return None


def device_choices() -> list[tuple[str, str]]:
    """(label, value) pairs: "auto", "cpu", every CUDA device torch sees ("cuda:N (name)"), and "mps"."""
    import torch

    out = [("auto (GPU when present)", "auto"), ("cpu", "cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out.append((f"cuda:{i} ({torch.cuda.get_device_name(i)})", f"cuda:{i}"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append(("mps", "mps"))
    return out


_WARMED: list = []


def _warm_up_imports() -> None:
    """Import the fitting code (``core.api`` and what it pulls in: scikit-image, the renderers, and torch._dynamo,
    which torch.optim's optimisers import when the first fit builds one: 0.9 s) and napari's shapes layer in a
    thread worker once per session, while the user sets up the first run: the first Run click then builds its job
    without importing anything in the GUI thread (it froze napari for 0.8-1.2 s), and the first result's outlines
    appear without loading modules (0.5 s)."""
    if _WARMED:
        return
    _WARMED.append(True)

    def work():
        import importlib

        for module in ("napari_nir._layers", "skimage.feature", "skimage.measure", "torch._dynamo"):
            importlib.import_module(module)
        from .core.api import FusionJob

        # a tiny job: its memory check builds the networks on torch's meta device (first use of those code paths)
        FusionJob(np.random.default_rng(0).random((2, 16, 16)).astype(np.float32), "homography", device="cpu")
        # the outlines' shapes layer loads some 40 compiled modules on first use (its triangulation): 0.5 s
        from napari.layers import Shapes

        Shapes([np.array([[0.0, 0.0], [0.0, 4.0], [4.0, 4.0], [4.0, 0.0]])], shape_type="polygon",
               features={"frame": [0]}, text={"string": "{frame}"})
        importlib.import_module("napari._vispy.layers.shapes")

    create_worker(work, _ignore_errors=True).start()


def advanced_options(spec: JobSpec) -> dict:
    """{flat name: Option} of the options the spec's Advanced section lists: every config option except the
    main controls' and the spec's skipped sections, in ``options()`` order."""
    return {flat: opt for flat, opt in config_options().items()
            if flat not in MAIN_OPTIONS and opt.section not in spec.skip_sections}


def _advanced_control(opt) -> ValueWidget:
    """One Advanced field: a menu for choices and booleans, else a line of text (empty: the preset's value)."""
    default = list(opt.default) if isinstance(opt.default, tuple) else opt.default
    tooltip = f"{opt.doc}\n{opt.path}; default {default!r}; empty: the preset's value"
    choices = opt.choices
    if choices is None and opt.annotation is bool:
        choices = ("true", "false")
    if choices is not None:
        return ComboBox(name=opt.flat, label=opt.flat, choices=[(PRESET_VALUE, ""), *[(str(c), str(c))
                                                                                    for c in choices]],
                        value="", tooltip=tooltip)
    widget = LineEdit(name=opt.flat, label=opt.flat, value="", tooltip=tooltip)
    widget.native.setPlaceholderText(PRESET_VALUE)
    return widget


# -- the widget -----------------------------------------------------------------------------------------
class JobWidget(Container):
    """A job dock widget configured by a ``JobSpec`` (see the module docstring).

    For scripts and tests: ``run()`` starts (returns the worker, or None when it refused with a
    notification), ``cancel()``, ``worker`` (None when idle), ``finished`` (a signal emitted with
    "done" / "cancelled" / "error" once a run is over and the widget is idle again), ``last_result`` (the
    last successful result), ``fit_options`` (extra config options by flat name, e.g. {"preview_every": 5};
    the Advanced fields override them), ``advanced_options`` ({flat name: Advanced field}).
    """

    finished = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer, spec: JobSpec):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.spec = spec
        self.layer = ComboBox(name="layer", label="burst", choices=self._layer_choices,
                              tooltip=f"Image layer holding {ACCEPTED}")
        self.extra_controls = [make() for make in spec.extra_controls]
        for control in self.extra_controls:
            setattr(self, control.name, control)
        self.motion = ComboBox(name="motion", label="motion", choices=list(spec.motion_choices),
                               value=spec.motion_default or spec.motion_choices[0], tooltip=spec.motion_tooltip)
        self.preset = ComboBox(name="preset", label="preset", choices=list(PRESETS), value=PRESETS[0],
                               tooltip="fast: multiresolution grid field, seconds to minutes on a CPU; paper: the "
                                       "official SIREN configuration (slow without a GPU)")
        self.steps = SpinBox(name="steps", label="steps", value=0, min=0, max=1_000_000, step=100,
                             tooltip="optimisation steps; 0 = the preset's default")
        self.device = ComboBox(name="device", label="device", choices=device_choices(), value="auto",
                               tooltip="auto uses a CUDA/MPS GPU when torch sees one, else the CPU")
        self.seed = SpinBox(name="seed", label="seed", value=0, min=0, max=2**31 - 1,
                            tooltip="the same seed and settings give the same result")
        self.advanced_toggle = CheckBox(name="advanced_toggle", label="", text="Advanced options", value=False,
                                        tooltip="every other option of the configuration; empty keeps the "
                                                "preset's value")
        self.advanced_options = {flat: _advanced_control(opt) for flat, opt in advanced_options(spec).items()}
        self.advanced = Container(name="advanced", label="", labels=True, scrollable=True,
                                  widgets=list(self.advanced_options.values()))
        scroll = self.advanced.root_native_widget  # the scroll area around the fields
        scroll.setMinimumHeight(min(_ADVANCED_HEIGHT, 30 * max(1, len(self.advanced_options))))
        scroll.setMaximumHeight(_ADVANCED_HEIGHT)
        self.advanced.visible = False
        self.run_button = PushButton(name="run_button", text="Run")
        self.status = Label(name="status", label="", value="")
        self.extend([*self._controls(), self.run_button, self.status])
        self.advanced_toggle.changed.connect(self._on_advanced_toggled)
        self.run_button.changed.connect(self._on_button)

        self.fit_options: dict[str, Any] = {}
        self.current_run: ViewerRun | None = None  # the run in progress, else the last one
        self.last_result = None
        self._chosen = None  # the layer the user picked in the burst menu, kept while it exists
        self._choosing = False
        self.status.native.setWordWrap(True)  # the full text of every message, never cut
        self.layer.changed.connect(self._on_layer_picked)
        events = self._viewer.layers.events
        for emitter in (events.inserted, events.removed, events.reordered):
            emitter.connect(self._refresh_layers)
        self._refresh_layers()
        self._native_filter = _ParentWatcher(self._on_dock_closed)
        self.native.installEventFilter(self._native_filter)
        _warm_up_imports()
        self.native.destroyed.connect(self._on_dock_closed)

    # -- the burst menu -----------------------------------------------------------------------------
    def _layer_choices(self, *_) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, Image) and not layer.metadata.get(OWNER_KEY)]

    def _refresh_layers(self, *_) -> None:
        """Re-list the layers and pick the burst: the user's choice while it exists, else ``default_burst``."""
        self._choosing = True
        try:
            self.reset_choices()
            choices = [layer for _, layer in self._layer_choices()]
            if self._chosen is not None and self._chosen in choices:
                pick = self._chosen
            else:
                self._chosen = None
                pick = default_burst(self._viewer, choices)
            if pick is not None and self.layer.value is not pick:
                self.layer.value = pick
        finally:
            self._choosing = False
        self._on_burst_shown(self.layer.value)

    def _on_layer_picked(self, layer) -> None:
        if not self._choosing:
            self._chosen = layer  # the user's (or a script's) choice
            self._on_burst_shown(layer)

    def _on_burst_shown(self, layer) -> None:
        """A hook for the layer now in the burst menu (the separation widget picks the sample's task)."""

    def _controls(self) -> list:
        """Every control a run reads (disabled while it runs)."""
        return [self.layer, *self.extra_controls, self.motion, self.preset, self.steps, self.device, self.seed,
                self.advanced_toggle, self.advanced]

    def _on_advanced_toggled(self, shown: bool) -> None:
        self.advanced.visible = bool(shown)

    def control_values(self) -> dict[str, Any]:
        """The main and extra controls' values by name, as ``JobSpec.make_job`` takes them."""
        values = {"motion": self.motion.value, "preset": self.preset.value, "steps": int(self.steps.value) or None,
                  "device": self.device.value, "seed": int(self.seed.value)}
        values.update({control.name: control.value for control in self.extra_controls})
        return values

    def advanced_values(self) -> dict[str, Any]:
        """The Advanced fields that are filled in, parsed (ValueError naming the option when one is not
        readable); empty fields are left out (the preset's value)."""
        out = {}
        for flat, widget in self.advanced_options.items():
            text = "" if widget.value is None else str(widget.value).strip()
            if text:
                out[flat] = parse_value(flat, text)
        return out

    def _make_job(self, data, axes: str | None = None):
        """The job for the current settings (validates at once: ValueError/TypeError on bad input); ``axes``:
        the layer's axes when it is not a plain burst (``layer_axes``)."""
        options = {**self.fit_options, **self.advanced_values()}
        values = self.control_values()
        if "axes" in values:
            values["axes"] = axes
        if "register_on" in values:
            values["register_on"] = parse_register_on(values["register_on"])
        return self.spec.make_job(data, values, options)

    def _on_button(self, *_) -> None:
        if self.worker is None:
            self.run()
        else:
            self.cancel()

    def _set_running(self, running: bool) -> None:
        for widget in self._controls():
            widget.enabled = not running
        self.run_button.text = "Cancel" if running else "Run"
        self.run_button.enabled = True

    @property
    def worker(self):
        """The thread worker of the run in progress; None when idle (also while nothing has run)."""
        run = self.current_run
        return run.worker if run is not None and run.running else None

    @property
    def _job(self):
        run = self.current_run
        return run.job if run is not None and run.running else None

    def _refuse(self, text: str) -> None:
        """A run that does not start: the full text in a notification and in the status line."""
        show_error(text)
        self.status.value = text

    # -- run / cancel -------------------------------------------------------------------------------
    def run(self):
        """Validate the inputs and start a fit in a thread worker. Returns the worker, or None (refused:
        already running, or bad input; a notification and the status line say why)."""
        title = self.spec.title
        if self.worker is not None:
            show_warning(f"{title}: a run is already in progress; press Cancel to stop it first.")
            return None
        layer = self.layer.value
        if layer is None or layer not in self._viewer.layers:
            self._refuse(f"{title}: no image layer to {self.spec.action}. Open a burst as one image layer "
                         f"({ACCEPTED}), e.g. File > Open Sample > napari-nir, and pick it under 'burst'.")
            return None
        try:
            axes = layer_axes(layer, getattr(getattr(self, "axes", None), "value", "auto"))
            job = self._make_job(layer_burst(layer, axes, title), axes)
        except (ValueError, TypeError) as exc:
            self._refuse(f"{title}: {exc}")
            return None

        run = ViewerRun(self._viewer, self.spec, layer, job, axes=axes, status=self._show_status)
        run.finished.connect(self._on_run_finished)
        self.current_run = run
        self._set_running(True)
        run.start()
        return run.worker

    def cancel(self) -> None:
        """Stop the run after the current step (or within a frame or pair of its start); no result layers are
        added. No-op when idle."""
        run = self.current_run
        if run is None or not run.running:
            return
        self.run_button.text = "Cancelling..."
        self.run_button.enabled = False
        run.cancel()

    def _show_status(self, text: str) -> None:
        self.status.value = text

    def _on_run_finished(self, outcome: str) -> None:
        run = self.current_run
        if outcome == "done" and run is not None:
            self.last_result = run.result
        try:
            self._set_running(False)
        except RuntimeError:  # the dock widget was deleted while the run ended
            pass
        self.finished.emit(outcome)

    def _on_dock_closed(self, *_) -> None:
        """The dock was closed (napari takes the widget out of it) or deleted: stop the run, drop its preview."""
        run = self.current_run
        if run is not None and run.running:
            run.cancel(f"the {self.spec.title} dock was closed")


class _ParentWatcher(QObject):
    """Calls ``on_orphaned()`` when the watched widget loses its parent: napari's dock close button takes the
    widget out of its dock (``setParent(None)``) without deleting it, so ``destroyed`` may never come."""

    def __init__(self, on_orphaned):
        super().__init__()
        self._on_orphaned = on_orphaned

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.ParentChange and watched.parent() is None:
            self._on_orphaned()
        return False


class FuseWidget(JobWidget):
    """The "Fuse burst" dock widget: ``JobWidget`` with ``FUSE_SPEC``."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer, FUSE_SPEC)


class SeparateWidget(JobWidget):
    """The "Separate layers" dock widget: ``JobWidget`` with ``SEPARATE_SPEC`` (a task menu generated from the
    task table, ``napari_nir.core.tasks.TASKS``). The task starts on the one a sample burst names
    (``metadata[SAMPLE_KEY]["task"]``), else on the last task picked in this session."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer, SEPARATE_SPEC)
        if _LAST_TASK and not self._sample_task(self.layer.value):
            self.task.value = _LAST_TASK[0]
        self.task.changed.connect(self._remember_task)

    @staticmethod
    def _sample_task(layer) -> str | None:
        task = (getattr(layer, "metadata", {}).get(SAMPLE_KEY) or {}).get("task")
        from .core.tasks import TASKS

        return task if task in TASKS else None

    def _on_burst_shown(self, layer) -> None:
        task = self._sample_task(layer)
        if task is not None and getattr(self, "task", None) is not None and self.task.value != task:
            self._following_sample = True
            try:
                self.task.value = task
            finally:
                self._following_sample = False

    def _remember_task(self, task) -> None:
        if not getattr(self, "_following_sample", False):  # the user's pick, not the sample's
            _LAST_TASK[:] = [task]


_LAST_TASK: list[str] = []  # the task last picked in a Separate layers widget in this session


# -- the console call ---------------------------------------------------------------------------------------
def run_in_viewer(viewer, layer, task: str = "fuse", *, motion: str | None = None, preset: str = "fast",
                  steps: int | None = None, device: str = "auto", seed: int = 0, axes: str | None = None,
                  register_on=None, **options) -> ViewerRun:
    """Fit ``layer`` (an image layer of ``viewer`` or its name) in a thread worker, the way the dock widgets do,
    and return at once: napari stays responsive, the status bar's activity dock shows the progress, a preview
    layer the canonical view, and the result's layers appear when it ends. For napari's console::

        run = napari_nir.run_in_viewer(viewer, "astronaut burst")            # fusion, homography
        run = napari_nir.run_in_viewer(viewer, "rain burst", "rain")         # a separation task
        run.cancel()       # stops it within a step; run.outcome, run.result, run.message once it ends

    task: "fuse" or a separation task of ``napari_nir.TASKS``. motion: the motion model (fusion default
    "homography"; separation: the task's). axes: the layer's axes when it is not a burst (default: its axis
    labels, as the widgets read them). Other arguments as ``napari_nir.fuse``. Bad input raises at once
    (ValueError/TypeError, as ``napari_nir.fuse``); the layer's data is never modified.
    """
    from napari.layers import Image

    if isinstance(layer, str):
        if layer not in viewer.layers:
            raise ValueError(f"no layer named {layer!r} in the viewer; its layers: "
                             f"{', '.join(repr(item.name) for item in viewer.layers) or 'none'}")
        layer = viewer.layers[layer]
    if not isinstance(layer, Image):
        raise TypeError(f"run_in_viewer needs an image layer (or its name), got {type(layer).__name__}")
    spec = FUSE_SPEC if task == "fuse" else SEPARATE_SPEC
    axes = layer_axes(layer, axes or "auto")
    data = layer_burst(layer, axes, spec)
    values = {"motion": motion or (spec.motion_default if task == "fuse" else TASK_DEFAULT), "preset": preset,
              "steps": steps, "device": device, "seed": seed, "axes": axes, "register_on": register_on,
              "task": task}
    job = spec.make_job(data, values, options)
    return ViewerRun(viewer, spec, layer, job, axes=axes).start()


# -- apply a fitted alignment to other layers ---------------------------------------------------------------
ORDER_CHOICES = (("auto (labels: nearest, images: linear)", "auto"), ("nearest (0)", 0), ("linear (1)", 1),
                 ("cubic (3)", 3))


def apply_to_layer(fit, layer, order="auto", reference="canonical"):
    """(data, kwargs, layer type) of ``layer`` registered with ``fit`` (``FusionResult.apply``): "<layer>
    registered", same type (labels stay labels, with order 0), its T, Y, X placed like the layer.

    Axes: the fit's input axes when the layer has the input's shape, an RGB layer as T x H x W x C, else its
    axis labels when they name T, Y, X (``layer_axes``), else T x H x W. Another resolution of the same frames
    (same aspect) is scaled."""
    from napari.layers import Labels

    is_labels = isinstance(layer, Labels)
    chosen = 0 if (order == "auto" and is_labels) else (1 if order == "auto" else int(order))
    if is_labels and chosen != 0:
        raise ValueError(f"layer {layer.name!r} holds labels: use nearest (0) so that no label is invented")
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    same = tuple(np.shape(data)) == tuple(fit.input_shape)
    axes = None
    if not same or fit.source_axes not in ("TYX", "TYXC"):
        axes = "TYXC" if getattr(layer, "rgb", False) else layer_axes(layer)
    registered = fit.apply(data, axes=axes, order=chosen, reference=reference)
    # the axes apply() read: these, else the fit's input's (same shape), else a burst's (parse_axes' default)
    letters = axes or (fit.source_axes if same else parse_axes(None, np.shape(data)))
    kwargs = {"name": f"{layer.name} registered", "scale": list(layer.scale), "translate": list(layer.translate),
              "metadata": {OWNER_KEY: {"source": layer.name, "role": "registered"},
                           "napari_nir": {**fit.provenance(), "output": {"role": "registered", "axes": letters,
                                                                         "order": chosen,
                                                                         "reference": reference}}}}
    if not is_labels:
        kwargs["rgb"] = bool(getattr(layer, "rgb", False))
    return registered, kwargs, "labels" if is_labels else "image"


class ApplyWidget(Container):
    """"Apply alignment": register other layers (channels, labels, another resolution) with a fitted result.

    Pick one of this session's fits (``FITTED``, from "Fuse burst" and "Separate layers") and one or more image or
    labels layers of the same frames; Apply adds "<layer> registered" for each (labels with nearest
    interpolation: labels are copied, never blended). Runs in a thread worker; ``finished`` is emitted with
    "done" or "error". For scripts: ``fits``, ``layers``, ``order``, ``reference`` are the controls."""

    finished = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        from magicgui.widgets import Select

        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.fits = ComboBox(name="fits", label="alignment", choices=self._fit_choices,
                             tooltip="a result fitted in this session by Fuse burst or Separate layers")
        self.layers = Select(name="layers", label="layers", choices=self._layer_choices,
                             tooltip="image or labels layers holding the same frames (T, Y, X; any channels)")
        self.order = ComboBox(name="order", label="interpolation", choices=list(ORDER_CHOICES), value="auto")
        self.reference = LineEdit(name="reference", label="reference", value="canonical",
                                  tooltip="'canonical' (the frames' average pose) or a frame index")
        self.apply_button = PushButton(name="apply_button", text="Apply")
        self.status = Label(name="status", label="", value="")
        self.extend([self.fits, self.layers, self.order, self.reference, self.apply_button, self.status])
        self.apply_button.changed.connect(self.run)
        self.worker = None
        events = self._viewer.layers.events
        for emitter in (events.inserted, events.removed):
            emitter.connect(self.reset_choices)

    def _fit_choices(self, *_) -> list[tuple[str, Any]]:
        return [(name, fit) for name, fit in reversed(FITTED.items())]

    def _layer_choices(self, *_) -> list[tuple[str, Any]]:
        from napari.layers import Image, Labels

        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, (Image, Labels)) and not layer.metadata.get(OWNER_KEY)]

    def run(self, *_):
        """Start applying; returns the worker, or None with a notification saying why not."""
        self.reset_choices()
        fit, layers = self.fits.value, list(self.layers.value or [])
        if fit is None:
            show_error("Apply alignment: no fitted alignment yet; run Fuse burst (e.g. motion rigid) first.")
            return None
        if not layers:
            show_error("Apply alignment: pick one or more layers to register.")
            return None
        text = str(self.reference.value).strip()
        reference = int(text) if text.lstrip("-").isdigit() else text
        order = self.order.value

        def work():
            return [apply_to_layer(fit, layer, order, reference) for layer in layers]

        worker = create_worker(work, _ignore_errors=True)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        self.worker = worker
        self.apply_button.enabled = False
        self.status.value = f"registering {len(layers)} layer(s)..."
        worker.start()
        return worker

    def _on_returned(self, items) -> None:
        from ._layers import add_layer_data

        add_layer_data(self._viewer, items)
        self._done("done", f"added {', '.join(kwargs['name'] for _, kwargs, _ in items)}")

    def _on_errored(self, exc: BaseException) -> None:
        show_error(f"Apply alignment failed: {exc}")
        self._done("error", "failed: see the notification")

    def _done(self, outcome: str, status: str) -> None:
        self.worker = None
        self.apply_button.enabled = True
        self.status.value = status
        self.finished.emit(outcome)
