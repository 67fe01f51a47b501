"""napari dock widgets. Thin: they validate in the GUI thread, run ``core`` in a napari thread worker, and
turn results into layers with ``_layers``.

"Fuse burst" (``FuseWidget``): pick an image layer holding a burst (T x H x W, or T x H x W x 3/4 shown as
RGB), a motion model, a preset, steps, device and seed; Run. While it runs the button is Cancel, the activity
dock shows step / loss / PSNR, and a "<burst> preview" layer shows the canonical view every few seconds.
On success "<burst> canonical", "<burst> frames" and "<burst> outlines" are added (or replaced: only the
plugin's own layers). Scripting::

    dock, w = viewer.window.add_plugin_dock_widget("napari-nir", "Fuse burst")
    w.steps.value = 200; w.run(); ...; w.cancel()
"""
from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton, SpinBox
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal

from ._layers import OWNER_KEY, add_fusion_layer_data, fusion_layer_data, preview_image, separation_layer_data
from .core.fit import MOTIONS, PRESETS

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

    from .core.api import FusionJob

__all__ = ["FuseWidget", "burst_data", "device_choices"]

PREVIEW_INTERVAL_S = 2.0  # the preview layer is refreshed at most this often (the first preview at once)
STATUS_INTERVAL_S = 0.25  # the status line and progress-bar text
_PREVIEW_MAX_SIDE = 192  # render.preview_canonical's default: longer side of a preview, in working pixels

ACCEPTED = "a stack of frames: T×H×W (grey) or T×H×W×3/4 shown as RGB"


def burst_data(layer: Layer):
    """The burst array of an image layer: (T, H, W) or (T, H, W, C) with C the RGB(A) axis (``layer.rgb``).

    Multiscale layers give their full-resolution level. Raises TypeError/ValueError saying which layouts
    are accepted and how to get one.
    """
    from napari.layers import Image

    name = getattr(layer, "name", "?")
    if not isinstance(layer, Image):
        raise TypeError(f"layer {name!r} is a {type(layer).__name__} layer; Fuse burst needs an Image layer "
                        f"holding {ACCEPTED}")
    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(int(s) for s in data.shape)
    nd = len(shape)
    if layer.rgb:
        if nd == 4:
            return data
        if nd == 3:
            raise ValueError(f"layer {name!r} is one RGB image {shape}, not a burst. Fuse burst needs several "
                             f"frames of one scene, {ACCEPTED}: open the frames together as one stack "
                             "(File > Open Files as Stack...) or stack them (np.stack(frames)).")
        raise ValueError(f"layer {name!r} is an RGB stack with {nd - 1} non-colour axes {shape}; Fuse burst "
                         f"accepts {ACCEPTED}. Add one burst as its own layer, e.g. "
                         "viewer.add_image(layer.data[:, z], rgb=True).")
    if nd == 3:
        return data
    if nd == 2:
        raise ValueError(f"layer {name!r} is a single 2-D image {shape}, not a burst. Fuse burst needs several "
                         f"frames of one scene, {ACCEPTED}: open the frames together as one stack "
                         "(File > Open Files as Stack...) or stack them (np.stack(frames)).")
    if nd == 4:
        raise ValueError(f"layer {name!r} is 4-D {shape} and not RGB, so its layout is ambiguous (T×Z×Y×X? "
                         f"T×H×W×C?). Fuse burst accepts {ACCEPTED}. For a time series of volumes pick one "
                         "plane: viewer.add_image(layer.data[:, z]); for colour frames add the layer with "
                         "rgb=True; for another multichannel burst (channels last) run "
                         "napari_nir.fuse(layer.data) in the console, or split the channels (channel_axis) "
                         "and fuse each.")
    raise ValueError(f"layer {name!r} has {nd} axes {shape}; Fuse burst accepts {ACCEPTED}.")


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


def _fusion_generator(job: FusionJob, cancelled, source_name: str, scale, translate, rgb: bool, threads: int,
                      restore_threads: int, to_layers=fusion_layer_data):
    """Runs in the worker thread: yields ProgressEvents; returns (fit, layer data) or None when cancelled.

    The outputs are rendered here too (not in the GUI thread); only layer creation happens in the GUI.
    """
    import torch

    torch.set_num_threads(threads)
    try:
        for event in job.run():
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


class FuseWidget(Container):
    """The "Fuse burst" dock widget (see the module docstring).

    For scripts and tests: ``run()`` starts (returns the worker, or None when it refused with a
    notification), ``cancel()``, ``worker`` (None when idle), ``finished`` (a signal emitted with
    "done" / "cancelled" / "error" once a run is over and the widget is idle again), ``last_result`` (the
    last successful FusionResult), ``fit_options`` (extra FitConfig options, e.g. {"preview_every": 5}).
    """

    finished = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.layer = ComboBox(name="layer", label="burst", choices=self._layer_choices,
                              tooltip=f"Image layer holding {ACCEPTED}")
        self.motion = ComboBox(name="motion", label="motion", choices=list(self.motion_choices),
                               value=self.motion_choices[0],
                               tooltip="homography: camera rotation / planar scene; flow: non-rigid motion; "
                                       "occlusion: flow where things hide and reveal each other")
        self.preset = ComboBox(name="preset", label="preset", choices=list(PRESETS), value=PRESETS[0],
                               tooltip="fast: multiresolution grid field, seconds to minutes on a CPU; paper: the official "
                                       "SIREN configuration (slow without a GPU)")
        self.steps = SpinBox(name="steps", label="steps", value=0, min=0, max=1_000_000, step=100,
                             tooltip="optimisation steps; 0 = the preset's default")
        self.device = ComboBox(name="device", label="device", choices=device_choices(), value="auto",
                               tooltip="auto uses a CUDA/MPS GPU when torch sees one, else the CPU")
        self.seed = SpinBox(name="seed", label="seed", value=0, min=0, max=2**31 - 1,
                            tooltip="the same seed and settings give the same result")
        self.run_button = PushButton(name="run_button", text="Run")
        self.status = Label(name="status", label="", value="")
        self.extend([self.layer, self.motion, self.preset, self.steps, self.device, self.seed, self.run_button,
                     self.status])
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

    verb = "Fusing"
    to_layers = staticmethod(fusion_layer_data)
    motion_choices: tuple[str, ...] = MOTIONS

    def _make_job(self, data):
        """The job for the current settings (validates at once: ValueError/TypeError on bad input)."""
        from .core.api import FusionJob

        return FusionJob(data, self.motion.value, preset=self.preset.value, steps=int(self.steps.value) or None,
                         device=self.device.value, seed=int(self.seed.value), **self.fit_options)

    def _on_button(self, *_) -> None:
        if self.worker is None:
            self.run()
        else:
            self.cancel()

    def _set_running(self, running: bool) -> None:
        for widget in (self.layer, self.motion, self.preset, self.steps, self.device, self.seed):
            widget.enabled = not running
        self.run_button.text = "Cancel" if running else "Run"
        self.run_button.enabled = True

    # -- run / cancel -------------------------------------------------------------------------------
    def run(self):
        """Validate the inputs and start a fit in a thread worker. Returns the worker, or None (refused:
        already running, or bad input; a notification says why)."""
        from .core.api import FusionJob

        if self.worker is not None:
            show_warning("Fuse burst: a run is already in progress; press Cancel to stop it first.")
            return None
        layer = self.layer.value
        if layer is None or layer not in self._viewer.layers:
            show_error("Fuse burst: no image layer to fuse. Open a burst as one image layer "
                       f"({ACCEPTED}), e.g. File > Open Sample > napari-nir, and pick it under 'burst'.")
            return None
        try:
            data = burst_data(layer)
            job = self._make_job(data)
        except (ValueError, TypeError) as exc:
            show_error(f"Fuse burst: {exc}")
            return None

        import torch

        self._job = job
        self._cancelled = False
        self._outcome = ""
        self._source = layer.name
        self._last_preview = self._last_status = -math.inf
        spatial_scale, spatial_shift = list(layer.scale[-2:]), list(layer.translate[-2:])
        longest = max(job.burst.H, job.burst.W)
        working = job.config.working_size or longest
        self._preview_factor = longest / min(longest, working, _PREVIEW_MAX_SIDE)
        self._preview_place = ([s * self._preview_factor for s in spatial_scale], spatial_shift)
        worker = create_worker(
            _fusion_generator, job, lambda: self._cancelled, layer.name, list(layer.scale[-3:]),
            list(layer.translate[-3:]), bool(layer.rgb), worker_threads(), torch.get_num_threads(),
            self.to_layers,
            _progress={"total": job.config.steps, "desc": f"{self.verb} {layer.name}"},
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
            self.status.value = (f"step {event.step}/{event.total}  loss {event.loss:.4g}  "
                                 f"PSNR {event.psnr:.2f} dB  {event.seconds:.0f} s")
            pbar = getattr(self.worker, "pbar", None)
            if pbar is not None:
                pbar.set_description(f"Fusing {self._source}: loss {event.loss:.3g}, PSNR {event.psnr:.1f} dB")
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
            show_error(f"Fuse burst: the fit finished but its layers could not be added ({type(exc).__name__}: "
                       f"{exc})")
            return
        self.last_result = fit
        self._outcome = "done"
        psnr = "?" if fit.final_psnr is None else f"{fit.final_psnr:.2f} dB"
        seconds = 0.0 if fit.seconds is None else fit.seconds
        show_info(f"Fused {self._source!r}: PSNR {psnr} in {seconds:.1f} s "
                  f"({fit.history[-1]['step'] if fit.history else 0} steps, {fit.motion}, {fit.config.device}).")

    def _on_errored(self, exc: BaseException) -> None:
        self._outcome = "error"
        if isinstance(exc, (ValueError, TypeError, RuntimeError, FitFailed)):
            message = str(exc)
        else:
            message = f"{type(exc).__name__}: {exc}"
        show_error(f"Fuse burst failed: {message}")

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
            show_info(f"Fuse burst: cancelled; no layers were added for {self._source!r}.")
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


TASK_DEFAULT = "task default"


class SeparateWidget(FuseWidget):
    """The "Separate layers" dock widget: FuseWidget's controls plus a task, generated from the task table
    (``napari_nir.core.tasks.TASKS``): each entry appears in the task menu with its description as tooltip."""

    verb = "Separating"
    to_layers = staticmethod(separation_layer_data)
    motion_choices = (TASK_DEFAULT, *MOTIONS)  # static choices: magicgui's reset_choices restores these

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        from .core.tasks import TASKS

        super().__init__(napari_viewer)
        self.task = ComboBox(name="task", label="task", choices=[(t.title, t.name) for t in TASKS.values()],
                             value=next(iter(TASKS)),
                             tooltip="\n".join(f"{t.title}: {t.description}" for t in TASKS.values()))
        self.insert(1, self.task)
        self.motion.tooltip = "the scene's motion model; 'task default' uses the task table's choice"

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        if hasattr(self, "task"):
            self.task.enabled = not running

    def _make_job(self, data):
        from .core.api import SeparationJob

        motion = None if self.motion.value == TASK_DEFAULT else self.motion.value
        return SeparationJob(data, self.task.value, motion=motion, preset=self.preset.value,
                             steps=int(self.steps.value) or None, device=self.device.value,
                             seed=int(self.seed.value), **self.fit_options)
