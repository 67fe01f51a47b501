"""One fit run for a napari viewer, shared by the dock widgets and the console call (``run_in_viewer``).

A ``ViewerRun`` takes a core job (``napari_nir.FusionJob`` / ``SeparationJob``, already validated) and the layer
it reads, and runs it in a napari thread worker: the status text and napari's progress bar follow it, a
"<layer> preview" layer shows the canonical view every ``PREVIEW_INTERVAL_S`` (a re-run shows it in the last
run's "<layer> canonical", given back as it was if the run does not finish), and when it ends the result's
layers are added (``_layers``) and the view is fitted to them. It stops within a step, or within one frame or
pair of the start (feature matching), when ``cancel()`` is called, when its source layer is removed (closing the
viewer removes every layer) or when napari's activity dock cancels it; a stopped run adds no layers and leaves no
preview. Every message names the run's title ("Fuse burst", "Separate layers").

What keeps napari at the API's speed (benchmarks/RESULTS.md "napari"): the worker hands the GUI thread at most
one progress event per ``STATUS_INTERVAL_S`` (a signal per step kept the GUI thread busy, and with it a core),
the worker uses as many torch threads as a fit from Python, the result's layers are added one per turn of the
event loop so that no single turn holds the GUI for all of them, and layers are updated in place rather than
removed and added wherever possible (napari runs a full garbage collection on every layer removal).
"""
from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal
from qtpy.QtCore import QTimer

from ._layers import OWNER_KEY, add_layer_data, owned_layers, preview_image, remove_stale_layers

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

__all__ = ["ViewerRun", "PREVIEW_INTERVAL_S", "STATUS_INTERVAL_S", "FITTED", "FITTED_KEPT"]

# the results fitted in this session by the widgets and the console call, newest last: what "Apply alignment"
# offers. Each holds its model and a float32 copy of its burst, so only the last FITTED_KEPT are kept
FITTED: dict[str, Any] = {}
FITTED_KEPT = 5

PREVIEW_INTERVAL_S = 2.0  # the preview layer is refreshed at most this often (the first preview at once)
STATUS_INTERVAL_S = 0.25  # progress events handed to the GUI thread at most this often
ADD_PAUSE_MS = 15  # between two result layers: the event loop paints and takes input (a 0 ms timer starves it)
PREVIEW_MAX_SIDE = 192  # render.preview_canonical's default: longer side of a preview, in working pixels


def fit_threads() -> int:
    """torch threads for a fit in a worker: every core this process may use, as a fit from Python gets.

    (Leaving one core to the GUI made fits 1.3x slower on 2 cores and the GUI no more responsive once the worker
    hands it a few events per second: benchmarks/RESULTS.md "napari".)"""
    from .core.memory import usable_cores

    return usable_cores()


def _work(job, should_stop, to_layers, source_name: str, scale, translate, rgb: bool, threads: int):
    """Runs in the worker thread: yields ProgressEvents (at most one per STATUS_INTERVAL_S, plus every event with
    a preview, every change of stage and the last step); returns (fit, layer data), or None when stopped.

    The result's layers are rendered here too (not in the GUI thread); only layer creation happens in the GUI.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        last_sent, stage = -math.inf, None
        for event in job.run():
            now = time.monotonic()
            if (event.preview is not None or event.stage != stage or event.step == event.total
                    or now - last_sent >= STATUS_INTERVAL_S):
                last_sent, stage = now, event.stage
                yield event
        if should_stop() or job.model is None:
            return None
        fit = job.result()
        if should_stop():
            return None
        layer_data = to_layers(fit, source_name, scale=scale, translate=translate, rgb=rgb, should_stop=should_stop)
        return None if layer_data is None else (fit, layer_data)  # None: stopped while rendering them
    except RuntimeError as exc:
        # superqt's GeneratorWorker takes a RuntimeError from the generator for "the worker was deleted" and
        # ends silently (no errored, no finished: the run would never end in the GUI). torch reports CUDA
        # failures (and FusionJob its out-of-memory advice) as RuntimeError, so hand it over as another type.
        raise FitFailed(str(exc) or type(exc).__name__) from exc
    finally:
        torch.set_num_threads(previous)


class FitFailed(Exception):
    """A RuntimeError raised inside a fit, re-raised as a type the thread worker reports (see ``_work``)."""


class ViewerRun:
    """A validated core job run for ``viewer`` in a thread worker (module docstring).

    spec: the widget's ``JobSpec`` (title, verb, past, to_layers). layer: the image layer the job reads (its name
    names the outputs; the scale and translate of its T, Y, X axes place them). axes: the layer's axes as the job
    read them (None: a plain burst, T, Y, X last, then an RGB axis when the layer is RGB).
    status(text): called with the status line's text (the widget's label; None: nothing).

    ``start()`` starts it (returns self); ``cancel()`` stops it; ``worker``: its thread worker (kept after it ends);
    ``progress_bar``: napari's progress bar while it runs (the activity dock); ``finished`` is emitted once with "done",
    "cancelled" or "error" when the run is over and its layers are in place; then ``outcome``, ``result`` (the
    fit, or None) and ``message`` (the full text of its last notification) are set. ``running``: not yet
    finished. ``threads``: torch threads of the worker.
    """

    finished = Signal(str)

    def __init__(self, viewer: napari.viewer.Viewer, spec, layer: Layer, job, *, axes: str | None = None,
                 status=None, threads: int | None = None):
        self.viewer, self.spec, self.job = viewer, spec, job
        self.source_layer, self.source = layer, layer.name
        self.threads = threads or fit_threads()
        self.outcome: str | None = None
        self.result = None
        self.message = ""
        self.worker = None
        self._status = status or (lambda text: None)
        picks = [-3, -2, -1] if axes is None else [axes.index(a) for a in "TYX"]  # the layer's T, Y, X
        self._frame_scale = [layer.scale[i] for i in picks]
        self._frame_shift = [layer.translate[i] for i in picks]
        self._rgb = bool(getattr(layer, "rgb", False))
        self._cancelled = False
        self._error = False
        self._cancel_reason = ""
        self._pending: list | None = None  # the result's layer changes still to make, one per event-loop turn
        self._preview_layer = None
        self._borrowed = None  # (layer, data, scale, translate, contrast limits, name) of a borrowed canonical
        self._last_preview = -math.inf
        self.progress_bar = None
        longest = max(job.burst.H, job.burst.W)
        working = job.config.get("working_size") or longest
        factor = longest / min(longest, working, PREVIEW_MAX_SIDE)
        self._preview_place = ([s * factor for s in self._frame_scale[1:]], self._frame_shift[1:])

    @property
    def running(self) -> bool:
        return self.outcome is None

    # -- start / cancel ---------------------------------------------------------------------------------
    def start(self) -> ViewerRun:
        spec = self.spec
        self.progress_bar = progress(total=self.job.config.steps, desc=f"{spec.verb} {self.source}")
        worker = create_worker(_work, self.job, lambda: self._cancelled, spec.to_layers, self.source,
                               self._frame_scale, self._frame_shift, self._rgb, self.threads,
                               _ignore_errors=True)  # errors are shown by _on_errored, not re-raised
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_worker_finished)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.worker = worker
        self._set_status(f"starting: {self.job.config.steps} steps on {self.job.device}, {self.threads} threads")
        worker.start()
        return self

    def cancel(self, reason: str = "") -> None:
        """Stop the run: within a step, or within a frame or pair of the start; no layers are added. ``reason``
        goes into the message ("cancelled" when empty). No-op once the run is over."""
        if self.outcome is not None or self._cancelled:
            return
        self._cancelled = True
        self._cancel_reason = reason
        self.job.stop()
        if self.worker is not None:
            self.worker.quit()
        if self._pending is not None:  # the worker is done and its layers are being added: stop adding
            self._pending = None
            self._finish()
            return
        self._set_status("cancelling...")

    # -- worker signals (GUI thread) ----------------------------------------------------------------------
    def _on_yielded(self, event) -> None:
        if self._cancelled or self.outcome is not None:  # events queued before a cancel or the end
            return
        prefix = "" if event.stage == "fit" else f"{event.stage}: "
        self._set_status(f"{prefix}step {event.step}/{event.total}  loss {event.loss:.4g}  "
                         f"PSNR {event.psnr:.2f} dB  {event.seconds:.0f} s")
        bar = self.progress_bar
        if bar is not None:
            bar.set_description(f"{self.spec.verb} {self.source}: {prefix}PSNR {event.psnr:.1f} dB")
            bar.update(event.step - bar.n)
        now = time.monotonic()
        if event.preview is not None and event.step < event.total and now - self._last_preview >= PREVIEW_INTERVAL_S:
            self._last_preview = now
            self._show_preview(event.preview)

    def _show_preview(self, preview: np.ndarray) -> None:
        image, rgb = preview_image(preview)
        layer = self._preview_layer
        if layer is not None and layer in self.viewer.layers and layer.rgb == rgb:
            layer.data = image
            return
        if layer is not None and layer in self.viewer.layers and layer is not self._borrowed_layer():
            self.viewer.layers.remove(layer)
        scale, translate = self._preview_place
        if self._borrow_canonical(image, rgb, scale, translate):
            return
        self._preview_layer = self.viewer.add_image(
            image, name=f"{self.source} preview", rgb=rgb, contrast_limits=(0.0, 1.0), scale=scale,
            translate=translate, metadata={OWNER_KEY: {"source": self.source, "role": "preview"}})

    def _borrow_canonical(self, image, rgb: bool, scale, translate) -> bool:
        """A re-run shows its preview in the canonical layer of the last run of this source (restored if the run
        does not finish), rather than adding a preview layer and removing it at the end: napari runs a full
        garbage collection on every layer removal. False when there is no such layer to borrow."""
        if self._borrowed is not None:
            return False
        own = [layer for layer in owned_layers(self.viewer, self.source, "canonical")
               if getattr(layer, "rgb", None) == rgb and not getattr(layer, "multiscale", False)
               and np.ndim(layer.data) == np.ndim(image)]
        if not own:
            return False
        layer = own[0]
        self._borrowed = (layer, layer.data, list(layer.scale), list(layer.translate),
                          tuple(layer.contrast_limits), layer.name)
        layer.data = image
        layer.scale, layer.translate = scale, translate
        layer.contrast_limits = (0.0, 1.0)
        layer.name = f"{self.source} canonical (preview)"
        self._preview_layer = layer
        return True

    def _borrowed_layer(self):
        return None if self._borrowed is None else self._borrowed[0]

    def _give_back_canonical(self) -> None:
        """Put the borrowed canonical layer back as it was (the run ended without a result)."""
        borrowed, self._borrowed = self._borrowed, None
        if borrowed is None:
            return
        layer, data, scale, translate, limits, name = borrowed
        if self._preview_layer is layer:
            self._preview_layer = None
        if layer in self.viewer.layers:
            layer.data = data
            layer.scale, layer.translate = scale, translate
            layer.contrast_limits = limits
            layer.name = name

    def _on_returned(self, value) -> None:
        if self._cancelled or value is None:
            return
        fit, layer_data = value
        self.result = fit
        self._adopt_preview(layer_data)
        # stale roles first (outlines after a flow fit), then one layer per event-loop turn
        self._pending = [functools.partial(remove_stale_layers, self.viewer, self.source, layer_data),
                         *(functools.partial(add_layer_data, self.viewer, [item]) for item in layer_data)]
        QTimer.singleShot(ADD_PAUSE_MS, self._add_next)

    def _adopt_preview(self, layer_data) -> None:
        """Turn the preview layer into the canonical layer when there is none yet: it is then updated in place,
        which spares napari's removal of a layer (a full garbage collection, 0.3 s and more in a large session).
        A borrowed canonical layer gets its name back and is updated in place the same way."""
        if self._borrowed is not None:
            layer, *_, name = self._borrowed
            self._borrowed = None
            if layer in self.viewer.layers:
                layer.name = name
            self._preview_layer = None
            return
        layer = self._preview_layer
        if layer is None or layer not in self.viewer.layers:
            return
        for _, kwargs, layer_type in layer_data:
            marker = kwargs.get("metadata", {}).get(OWNER_KEY, {})
            if marker.get("role") != "canonical" or layer_type != "image":
                continue
            if (owned_layers(self.viewer, self.source, "canonical") or kwargs["name"] in self.viewer.layers
                    or bool(kwargs.get("rgb")) != bool(layer.rgb)):
                return
            layer.metadata = kwargs["metadata"]
            layer.name = kwargs["name"]
            self._preview_layer = None
            return

    def _add_next(self) -> None:
        if self._pending is None:
            return
        if not self._pending:
            self._pending = None
            self._finish_success()
            return
        change = self._pending.pop(0)
        try:
            change()
        except Exception as exc:  # noqa: BLE001 - shown to the user, never only in the terminal
            self._pending = None
            self._notify(show_error, f"the fit finished but its layers could not be added "
                                     f"({type(exc).__name__}: {exc})")
            self._finish("error")
            return
        QTimer.singleShot(ADD_PAUSE_MS, self._add_next)

    def _finish_success(self) -> None:
        fit = self.result
        self._remove_preview()
        try:
            self.viewer.reset_view()  # the results may reach past the burst (the canonical view's extent)
        except Exception:  # noqa: BLE001 - a view that cannot be reset is no reason to lose the result
            pass
        FITTED[f"{self.source} ({fit.motion}, {time.strftime('%H:%M:%S')})"] = fit
        while len(FITTED) > FITTED_KEPT:
            FITTED.pop(next(iter(FITTED)))
        psnr = "?" if fit.final_psnr is None else f"{fit.final_psnr:.2f} dB"
        seconds = 0.0 if fit.seconds is None else fit.seconds
        task = fit.config.get("task") or ""
        what = f"{task}, {fit.motion}" if task else f"{fit.motion}"
        done = (f"{self.spec.past} {self.source!r}: PSNR {psnr} in {seconds:.1f} s "
                f"({fit.history[-1]['step'] if fit.history else 0} steps, {what}, {fit.config.get('device')}, "
                f"{self.threads} threads).")
        found = fit.diagnostics()  # computed in the worker with the residual layer
        if found.verdict == "ok":
            self._notify(show_info, done + " Verdict: ok.")
        else:  # never a quietly damaged result: say what does not hold, and where to look
            self._notify(show_warning, done + f" Verdict: {found.verdict}: " + " ".join(found.reasons[:3])
                         + (f" (+{len(found.reasons) - 3} more)" if len(found.reasons) > 3 else "")
                         + f" See the layer {self.source + ' residual'!r}.")
        self._finish("done")

    def _on_errored(self, exc: BaseException) -> None:
        if isinstance(exc, (ValueError, TypeError, RuntimeError, FitFailed)):
            message = str(exc)
        else:
            message = f"{type(exc).__name__}: {exc}"
        self._notify(show_error, f"failed: {message}", prefix=f"{self.spec.title} ")
        self._error = True  # the worker's finished signal follows

    def _on_aborted(self) -> None:
        self._cancelled = True  # also when quit came from napari's activity dock

    def _on_layer_removed(self, event) -> None:
        if event.value is self.source_layer and self.running:
            self.cancel(f"its layer {self.source!r} was removed")

    def _on_worker_finished(self) -> None:
        if self._pending is not None:  # the layers are being added; _finish_success ends the run
            return
        if self._error:
            self._finish("error")
        elif self._cancelled or self.result is None:
            self._finish("cancelled")

    def _finish(self, outcome: str | None = None) -> None:
        if self.outcome is not None:
            return
        outcome = outcome or ("cancelled" if self._cancelled else "done")
        self.outcome = outcome  # first: a notification below may run queued events, which must see the end
        try:
            self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        except (TypeError, ValueError, RuntimeError):
            pass
        if self.progress_bar is not None:
            self.progress_bar.close()
            self.progress_bar = None
        if outcome != "done":
            self._remove_preview()
        if outcome == "cancelled":
            self.result = None
            why = f" ({self._cancel_reason})" if self._cancel_reason else ""
            self._notify(show_info, f"cancelled{why}; no layers were added for {self.source!r}.",
                         prefix=f"{self.spec.title}: ")
        self._set_status({"done": self.message or "done", "cancelled": self.message,
                          "error": self.message}[outcome])
        self.finished.emit(outcome)

    # -- helpers --------------------------------------------------------------------------------------------
    def _notify(self, show, text: str, prefix: str | None = None) -> None:
        self.message = (f"{self.spec.title}: " if prefix is None else prefix) + text
        show(self.message)

    def _set_status(self, text: str) -> None:
        try:
            self._status(text)
        except RuntimeError:  # the widget showing it was deleted (dock closed)
            self._status = lambda text: None

    def _remove_preview(self) -> None:
        self._give_back_canonical()
        layer, self._preview_layer = self._preview_layer, None
        try:
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        except RuntimeError:  # the viewer is closing
            pass
