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

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, LineEdit, PushButton, SpinBox
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal

from ._layers import OWNER_KEY, add_fusion_layer_data, fusion_layer_data, preview_image, separation_layer_data
from .core.config import PRESETS, parse_value
from .core.config import options as config_options
from .core.motions import MOTIONS
from .core.registration import parse_axes, parse_register_on

if TYPE_CHECKING:
    import napari
    from magicgui.widgets.bases import ValueWidget
    from napari.layers import Layer

__all__ = ["JobSpec", "JobWidget", "FuseWidget", "SeparateWidget", "ApplyWidget", "FUSE_SPEC", "SEPARATE_SPEC",
           "FITTED", "burst_data", "layer_axes", "device_choices", "advanced_options"]

# the results fitted in this session by the job widgets, newest last: what "Apply alignment" offers. Each holds
# its model and a float32 copy of its burst, so only the last FITTED_KEPT are kept
FITTED: dict[str, Any] = {}
FITTED_KEPT = 5

PREVIEW_INTERVAL_S = 2.0  # the preview layer is refreshed at most this often (the first preview at once)
STATUS_INTERVAL_S = 0.25  # the status line and progress-bar text
_PREVIEW_MAX_SIDE = 192  # render.preview_canonical's default: longer side of a preview, in working pixels
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


def worker_threads() -> int:
    """torch threads for a fit in a worker: all cores but one, so napari's GUI thread keeps a core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


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


def _job_generator(job, cancelled, source_name: str, scale, translate, rgb: bool, threads: int,
                   restore_threads: int, to_layers=fusion_layer_data):
    """Runs in the worker thread: yields ProgressEvents; returns (fit, layer data) or None when cancelled.

    The outputs are rendered here too (not in the GUI thread); only layer creation happens in the GUI.
    """
    import torch

    torch.set_num_threads(threads)
    try:
        for event in job.run():  # noqa: UP028 - not yield from: the worker's send/close must not reach the job
            yield event
        if cancelled():
            return None
        fit = job.result()
        return fit, to_layers(fit, source_name, scale=scale, translate=translate, rgb=rgb)
    except RuntimeError as exc:
        # superqt's GeneratorWorker takes a RuntimeError from the generator for "the worker was deleted" and
        # ends silently (no errored, no finished: the run would never end in the GUI). torch reports CUDA
        # failures (and FusionJob its out-of-memory advice) as RuntimeError, so hand it over as another type.
        raise FitFailed(str(exc) or type(exc).__name__) from exc
    finally:
        torch.set_num_threads(restore_threads)


class FitFailed(Exception):
    """A RuntimeError raised inside a fit, re-raised as a type the thread worker reports (see above)."""


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
        self.worker = None
        self.last_result = None
        self._job = None
        self._cancelled = False
        self._outcome = ""
        self._source = ""
        self._preview_layer = None
        self._preview_factor = 1.0
        self._preview_place = ([1.0, 1.0], [0.0, 0.0])
        self._last_preview = -math.inf
        self._last_status = -math.inf

        events = self._viewer.layers.events
        for emitter in (events.inserted, events.removed, events.reordered):
            emitter.connect(self.reset_choices)
        self.reset_choices()
        active = self._viewer.layers.selection.active
        if active is not None and active in [value for _, value in self._layer_choices()]:
            self.layer.value = active
        self.native.destroyed.connect(self._on_destroyed)

    # -- controls -----------------------------------------------------------------------------------
    def _layer_choices(self, *_) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, Image) and not layer.metadata.get(OWNER_KEY)]

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

    # -- run / cancel -------------------------------------------------------------------------------
    def run(self):
        """Validate the inputs and start a fit in a thread worker. Returns the worker, or None (refused:
        already running, or bad input; a notification says why)."""
        title = self.spec.title
        if self.worker is not None:
            show_warning(f"{title}: a run is already in progress; press Cancel to stop it first.")
            return None
        layer = self.layer.value
        if layer is None or layer not in self._viewer.layers:
            show_error(f"{title}: no image layer to {self.spec.action}. Open a burst as one image layer "
                       f"({ACCEPTED}), e.g. File > Open Sample > napari-nir, and pick it under 'burst'.")
            return None
        try:
            axes = layer_axes(layer, getattr(getattr(self, "axes", None), "value", "auto"))
            if axes is None:
                data = burst_data(layer, title)
            else:
                data = layer.data[0] if layer.multiscale else layer.data
            job = self._make_job(data, axes)
        except (ValueError, TypeError) as exc:
            show_error(f"{title}: {exc}")
            return None

        import torch

        self._job = job
        self._cancelled = False
        self._outcome = ""
        self._source = layer.name
        self._last_preview = self._last_status = -math.inf
        picks = [-3, -2, -1] if axes is None else [axes.index(a) for a in "TYX"]  # T, Y, X of the layer
        frame_scale = [layer.scale[i] for i in picks]
        frame_shift = [layer.translate[i] for i in picks]
        longest = max(job.burst.H, job.burst.W)
        working = job.config.get("working_size") or longest
        self._preview_factor = longest / min(longest, working, _PREVIEW_MAX_SIDE)
        self._preview_place = ([s * self._preview_factor for s in frame_scale[1:]], frame_shift[1:])
        worker = create_worker(
            _job_generator, job, lambda: self._cancelled, layer.name, frame_scale,
            frame_shift, bool(layer.rgb), worker_threads(), torch.get_num_threads(),
            self.spec.to_layers,
            _progress={"total": job.config.steps, "desc": f"{self.spec.verb} {layer.name}"},
            _ignore_errors=True,  # errors are shown with show_error by _on_errored, not re-raised
        )
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._set_running(True)
        self.status.value = f"starting: {job.config.steps} steps on {job.device}"
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the run after the current step; no result layers are added. No-op when idle."""
        if self.worker is None:
            return
        self._cancelled = True
        if self._job is not None:
            self._job.stop()
        self.worker.quit()
        self.run_button.text = "Cancelling..."
        self.run_button.enabled = False
        self.status.value = "cancelling..."

    # -- worker signals (GUI thread) ------------------------------------------------------------------
    def _on_yielded(self, event) -> None:
        if self._cancelled:
            return
        now = time.monotonic()
        if now - self._last_status >= STATUS_INTERVAL_S or event.step == event.total:
            self._last_status = now
            prefix = "" if event.stage == "fit" else f"{event.stage}: "
            self.status.value = (f"{prefix}step {event.step}/{event.total}  loss {event.loss:.4g}  "
                                 f"PSNR {event.psnr:.2f} dB  {event.seconds:.0f} s")
            pbar = getattr(self.worker, "pbar", None)
            if pbar is not None:
                pbar.set_description(f"{self.spec.verb} {self._source}: {prefix}loss {event.loss:.3g}, "
                                     f"PSNR {event.psnr:.1f} dB")
        if event.preview is not None and now - self._last_preview >= PREVIEW_INTERVAL_S:
            self._last_preview = now
            self._show_preview(event.preview)

    def _show_preview(self, preview: np.ndarray) -> None:
        image, rgb = preview_image(preview)
        layer = self._preview_layer
        if layer is not None and layer in self._viewer.layers and layer.rgb == rgb:
            layer.data = image
            return
        if layer is not None and layer in self._viewer.layers:
            self._viewer.layers.remove(layer)
        scale, translate = self._preview_place
        self._preview_layer = self._viewer.add_image(
            image, name=f"{self._source} preview", rgb=rgb, contrast_limits=(0.0, 1.0), scale=scale,
            translate=translate, metadata={OWNER_KEY: {"source": self._source, "role": "preview"}})

    def _on_returned(self, value) -> None:
        if self._cancelled or value is None:
            return
        fit, layer_data = value
        try:
            self._remove_preview()
            add_fusion_layer_data(self._viewer, self._source, layer_data)
        except Exception as exc:  # noqa: BLE001 - shown to the user, never only in the terminal
            self._outcome = "error"
            show_error(f"{self.spec.title}: the fit finished but its layers could not be added "
                       f"({type(exc).__name__}: {exc})")
            return
        self.last_result = fit
        FITTED[f"{self._source} ({fit.motion}, {time.strftime('%H:%M:%S')})"] = fit
        while len(FITTED) > FITTED_KEPT:
            FITTED.pop(next(iter(FITTED)))
        self._outcome = "done"
        psnr = "?" if fit.final_psnr is None else f"{fit.final_psnr:.2f} dB"
        seconds = 0.0 if fit.seconds is None else fit.seconds
        task = fit.config.get("task") or ""
        what = f"{task}, {fit.motion}" if task else f"{fit.motion}"
        done = (f"{self.spec.past} {self._source!r}: PSNR {psnr} in {seconds:.1f} s "
                f"({fit.history[-1]['step'] if fit.history else 0} steps, {what}, {fit.config.get('device')}).")
        found = fit.diagnostics()  # computed in the worker with the residual layer
        if found.verdict == "good":
            show_info(done + " Verdict: good.")
        else:  # never a quietly damaged result: say what does not hold, and where to look
            show_warning(done + f" Verdict: {found.verdict}: " + " ".join(found.reasons[:3])
                         + (f" (+{len(found.reasons) - 3} more)" if len(found.reasons) > 3 else "")
                         + f" See the layer {self._source + ' residual'!r}.")

    def _on_errored(self, exc: BaseException) -> None:
        self._outcome = "error"
        if isinstance(exc, (ValueError, TypeError, RuntimeError, FitFailed)):
            message = str(exc)
        else:
            message = f"{type(exc).__name__}: {exc}"
        show_error(f"{self.spec.title} failed: {message}")

    def _on_aborted(self) -> None:
        self._cancelled = True  # also when quit came from napari's activity dock / status bar

    def _on_finished(self) -> None:
        if self._cancelled:
            self._outcome = "cancelled"
        outcome = self._outcome or "cancelled"
        self.worker = None
        self._job = None
        try:
            self._remove_preview()
            self._set_running(False)
            self.status.value = {"done": "done", "cancelled": "cancelled: no layers added",
                                 "error": "failed: see the notification"}[outcome]
        except RuntimeError:  # the dock widget was closed while the run ended
            pass
        if outcome == "cancelled":
            show_info(f"{self.spec.title}: cancelled; no layers were added for {self._source!r}.")
        self.finished.emit(outcome)

    def _remove_preview(self) -> None:
        layer, self._preview_layer = self._preview_layer, None
        if layer is not None and layer in self._viewer.layers:
            self._viewer.layers.remove(layer)

    def _on_destroyed(self, *_) -> None:
        if self.worker is not None:
            self.cancel_quietly()

    def cancel_quietly(self) -> None:
        """Stop a run without touching the (possibly deleted) controls."""
        self._cancelled = True
        if self._job is not None:
            self._job.stop()
        if self.worker is not None:
            self.worker.quit()


class FuseWidget(JobWidget):
    """The "Fuse burst" dock widget: ``JobWidget`` with ``FUSE_SPEC``."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer, FUSE_SPEC)


class SeparateWidget(JobWidget):
    """The "Separate layers" dock widget: ``JobWidget`` with ``SEPARATE_SPEC`` (a task menu generated from the
    task table, ``napari_nir.core.tasks.TASKS``)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer, SEPARATE_SPEC)


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
