"""The public entry points, pure numpy/torch: ``fuse`` (and, later, ``separate``)."""
from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from . import render
from .build import build_model
from .burst import check_channels_last, check_dtype, check_shape, prepare_burst, working_frames, working_shape
from .config import PRESETS
from .config import options as config_options
from .diagnostics import reduce_frames, unusable_frames
from .geometry import Normaliser, pixel_grid
from .memory import check_fit_memory
from .motions import MOTIONS, polishes
from .polish import polish_matrices
from .presets import preset_config, separation_config
from .registration import check_transforms, select_for_fit
from .result import FusionResult, SeparationResult
from .stages import Stopped, stop_check
from .tasks import get_task
from .train import ProgressEvent, blank_frame_weights, cpu_fit_settings, fit_steps, resolve_device


def _check_common(preset, steps, seed, options) -> tuple[int | None, int]:
    """Validate the arguments every job takes; returns (steps, seed)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    valid = config_options()
    unknown = set(options) - set(valid) - {"preset", "motion", "task"}
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}")
    return _check_int("steps", steps, 1, 100_000), _check_int("seed", seed, 0, 2**32 - 1)


def _check_int(name: str, value, minimum: int, maximum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum:_}, got {value:_}" + (
            " (the presets need 200 to 5000)" if name == "steps" else ""))
    return int(value)


def fuse(
    burst,
    motion: str = "homography",
    *,
    preset: str = "fast",
    steps: int | None = None,
    device: str = "auto",
    seed: int = 0,
    callback: Callable[[ProgressEvent], bool | None] | None = None,
    axes: str | None = None,
    register_on=None,
    **options,
) -> FusionResult:
    """Fuse a burst into one canonical view through a learned motion model.

    burst: (T, H, W) or (T, H, W, C) array-like (numpy, dask, zarr), any integer or float dtype, T >= 2.
    motion: "homography" (flow models follow). preset: "fast" (grid field, seconds on a CPU) or "paper"
    (the official SIREN configuration). steps: optimisation steps (default: the preset's).
    device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda[:N]", "mps". seed: makes the run reproducible.
    callback(event): called with every ``ProgressEvent`` (step, total, loss, psnr, seconds, preview);
    returning False stops the fit early (the result is returned with ``completed=False``).
    axes: the array's axes when it is not (T, H, W[, C]), e.g. "TCYX" or "TZYX" (letters T, Y, X and optionally
    C, Z); register_on: what the fit reads of a C or Z axis (``core.registration.select_for_fit``: a channel
    index or None for all channels jointly; a plane index or "max" for Z). ``registered()`` and ``apply()`` then
    return every channel and plane in these axes.
    options: any other ``FitConfig`` field (e.g. batch, init="identity", working_size, preview_every).
    ``init`` may also be (T, 3, 3) transforms (frame-t pixel -> reference pixel, the "napari-nir" convention of
    ``fit.transforms()``; ``convert_transforms`` reads pystackreg's): the fit starts from them.
    Never modifies ``burst``.
    """
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (called with each progress event) or None, got {callback!r}")
    job = FusionJob(burst, motion, preset=preset, steps=steps, device=device, seed=seed, axes=axes,
                    register_on=register_on, **options)
    for event in job.run():
        if callback is not None and callback(event) is False:
            job.stop()
    return job.result()


def _checked_shape(stack) -> tuple[int, int, int, int] | None:
    """(T, H, W, C) of an array with a numpy dtype (numpy, dask, zarr), its dtype and shape checked as
    ``prepare_burst`` would, without reading it; None for other array-likes (lists, torch tensors)."""
    dtype = getattr(stack, "dtype", None)
    if not isinstance(dtype, np.dtype) or not hasattr(stack, "shape"):
        return None
    check_dtype(dtype)
    shape = tuple(int(n) for n in stack.shape)
    check_shape(shape)
    return shape if len(shape) == 4 else shape + (1,)


def _load_bytes(stack, shape) -> int:
    """Bytes that reading ``stack`` makes before its float32 copy: none for a C-contiguous numpy array (read in
    place), the whole array in its dtype otherwise (dask and zarr computed, a strided view made contiguous)."""
    if isinstance(stack, np.ndarray) and stack.flags.c_contiguous:
        return 0
    return math.prod(shape) * np.dtype(stack.dtype).itemsize


class FusionJob:
    """A fusion run split into validation (here, eagerly), a generator of progress events, and the result.

    For callers that drive the loop themselves (napari thread workers, progress bars)::

        job = FusionJob(burst, "homography")     # raises ValueError/TypeError on bad input, at once
        for event in job.run(): ...              # ProgressEvent per step; job.stop() ends it after this step
        fit = job.result()                       # FusionResult (completed=False when stopped early)
    """

    result_type = FusionResult

    def __init__(self, burst, motion: str = "homography", *, preset: str = "fast", steps: int | None = None,
                 device: str = "auto", seed: int = 0, axes: str | None = None, register_on=None, **options):
        if motion not in MOTIONS:
            raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")
        if "task" in options:  # a SeparationJob passes its task through _configure, never as an option
            raise TypeError(f"option task={options['task']!r} is not for fusion: use "
                            "napari_nir.separate(burst, task) for layer separation")
        initial = None  # init as (T, 3, 3) transforms rather than one of the option's names
        if options.get("init") is not None and not isinstance(options["init"], str):
            initial = options.pop("init")
        steps, seed = _check_common(preset, steps, seed, options)
        self.device = resolve_device(device)
        if axes is None and hasattr(burst, "shape"):  # lists: prepare_burst reads and checks them
            check_channels_last(tuple(burst.shape))
        stack, self.registered_on = select_for_fit(burst, axes, register_on)
        self.source, self.source_axes = burst, (axes.upper() if axes else None)
        self.config = self._configure(motion, preset, steps=steps, seed=seed, device=str(self.device), **options)
        self.config.validate()
        # the memory check, from the shape and dtype alone: before the input is read or copied
        shape = _checked_shape(stack)
        prepared = None
        if shape is None:  # a list or other array-like: its shape is known once read
            prepared = prepare_burst(stack)
            shape = prepared.data.shape
        # memory_estimate: bytes the fit adds at its peak (core/memory.py)
        self.memory_estimate = check_fit_memory(
            working_shape(shape, self.config.runtime.working_size), self.config, self.device, input_shape=shape,
            load_bytes=0 if prepared is not None else _load_bytes(stack, shape))
        self.burst = prepared if prepared is not None else prepare_burst(stack)
        self.initial_transforms = None
        if initial is not None:
            if not MOTIONS[motion].feature_start(self.config):
                raise ValueError(f"init transforms need a motion with a homography start; {motion!r} has none")
            self.initial_transforms = check_transforms(initial, self.burst.T, "init transforms")
        self.history: list[dict] = []
        self.unusable: dict[int, str] = {}  # frames found blank or saturated before the fit
        self.down_weighted: dict[int, str] = {}  # of those, the frames drawn less often
        self.polish_report: dict | None = None
        self.model = None
        self._stop = False
        self._seconds = 0.0

    @staticmethod
    def _configure(motion, preset, **overrides):
        return preset_config(motion, preset, **overrides)

    def stop(self) -> None:
        """Ask the run to end after the current step, or during the start (feature matching, model build) at the
        next frame or pair; thread-safe: a flag read between steps. Stopped before the first step, ``run`` ends
        without events and ``result()`` raises (no model)."""
        self._stop = True

    def run(self):
        """Generator of ``ProgressEvent``: builds the model (feature start included) and optimises it."""
        frames, _ = working_frames(self.burst, self.config.runtime.working_size)
        start = time.perf_counter()
        out_of_memory = None
        previous_threads = torch.get_num_threads()
        if self.config.runtime.threads:
            torch.set_num_threads(self.config.runtime.threads)  # process-wide: fits running at once share it
        else:
            self.config = self.config.replace(threads=previous_threads)  # recorded: results depend on it
        try:
            self.unusable = unusable_frames(reduce_frames(frames)[0])
            blank = [t for t, kind in self.unusable.items() if kind == "blank"]
            with cpu_fit_settings(self.device):
                try:  # the start (feature matching) yields no events: it checks the stop flag itself
                    with stop_check(lambda: self._stop):
                        self.model = build_model(frames, self.config, self.device, start=self._normalised_start(),
                                                 skip=blank)
                except Stopped:
                    return  # stopped before the first step: no model, no result
                for event in fit_steps(self.model, frames, self.config, self.device, start=start,
                                       preview=self._preview, frame_weights=self._frame_weights(len(frames), blank)):
                    self.history.append({"step": event.step, "seconds": round(event.seconds, 4), "loss": event.loss,
                                         "psnr": event.psnr})
                    self._seconds = time.perf_counter() - start
                    yield event
                    if self._stop:
                        break
                if polishes(self.config) and not self._stop:
                    self.polish_report = polish_matrices(self.model, frames, self.config.value_range, self.device,
                                                         iterations=self.config.motion.polish)
                    self._seconds = time.perf_counter() - start
        except torch.cuda.OutOfMemoryError as exc:
            out_of_memory = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
            # keep only the text: the exception's traceback holds the fit's GPU tensors
        finally:
            if torch.get_num_threads() != previous_threads:
                torch.set_num_threads(previous_threads)
        if out_of_memory is not None:
            self.model = None
            frames = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise RuntimeError(f"the GPU ran out of memory during the fit ({out_of_memory}); GPU memory has been "
                               f"released. Use a smaller working_size (now "
                               f"{self.config.runtime.working_size or 'no limit'}), "
                               f"fewer frames, or device='cpu'") from None

    def _frame_weights(self, count: int, blank: list[int]) -> np.ndarray | None:
        """(count,) sampling weights: ``blank_weight`` for the ``blank`` frames (no contrast: nothing to align, and
        a blank frame drew other frames off by pixels, benchmarks/DECISIONS.md "blank and saturated frames"), 1 for
        the others; None when no frame is blank (uniform draws, as always). Saturated frames are only named: drawn
        less often they aligned worse themselves and the others no better."""
        weights = blank_frame_weights(count, blank, self.config.optimiser.blank_weight)
        if weights is not None:
            self.down_weighted = {t: "blank" for t in blank}
        return weights

    def _normalised_start(self) -> np.ndarray | None:
        """The given init transforms (frame pixel -> reference pixel) as normalised frame -> canonical matrices."""
        if self.initial_transforms is None:
            return None
        n = Normaliser(self.burst.H, self.burst.W).matrix
        return np.einsum("ij,tjk,kl->til", n, self.initial_transforms, np.linalg.inv(n))

    def _preview(self, model) -> np.ndarray:
        return render.preview_canonical(model, self.config, self.device)

    def result(self) -> FusionResult:
        """The fitted result (call after ``run`` finished or was stopped)."""
        if self.model is None:
            raise RuntimeError("the fit has not started: iterate over job.run() first"
                               + (" (it was stopped during its start)" if self._stop else ""))
        completed = bool(self.history) and self.history[-1]["step"] == self.config.steps
        result = self.result_type(self.model, self.burst, self.config, list(self.history), self.device,
                                  seconds=self._seconds, completed=completed, source=self.source,
                                  source_axes=self.source_axes, registered_on=self.registered_on,
                                  initial_transforms=self.initial_transforms)
        result.polish_report = self.polish_report
        result.down_weighted = dict(self.down_weighted)
        result.final_psnr = reconstruction_psnr(result)
        return result


class SeparationJob(FusionJob):
    """A layer-separation run (see FusionJob for the protocol); ``result()`` is a SeparationResult."""

    result_type = SeparationResult

    def __init__(self, burst, task: str = "reflection", *, motion: str | None = None, preset: str = "fast",
                 steps: int | None = None, device: str = "auto", seed: int = 0, axes: str | None = None,
                 register_on=None, **options):
        get_task(task)
        if motion is not None and motion not in MOTIONS:
            raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)} (or None for the "
                             f"task's default)")
        self._task = task
        super().__init__(burst, motion or get_task(task).default_motion(preset), preset=preset, steps=steps,
                         device=device, seed=seed, axes=axes, register_on=register_on, **options)

    def _configure(self, motion, preset, **overrides):
        return separation_config(self._task, preset, motion, **overrides)


def separate(
    burst,
    task: str = "reflection",
    *,
    motion: str | None = None,
    preset: str = "fast",
    steps: int | None = None,
    device: str = "auto",
    seed: int = 0,
    callback: Callable[[ProgressEvent], bool | None] | None = None,
    axes: str | None = None,
    register_on=None,
    **options,
) -> SeparationResult:
    """Separate a burst into a scene and an interference layer (reflection, fence, rain, moire).

    burst: (T, H, W[, C]) array-like, any integer or float dtype, T >= 2. task: a name from
    ``napari_nir.TASKS``. motion: the scene's motion model (default: the task's). Other arguments as
    ``fuse``. Returns a SeparationResult: ``layers()`` -> {"scene", "interference"[, "alpha"]} per frame,
    ``canonical()`` the scene fused in canonical coordinates. Never modifies ``burst``.
    """
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (called with each progress event) or None, got {callback!r}")
    job = SeparationJob(burst, task, motion=motion, preset=preset, steps=steps, device=device, seed=seed,
                        axes=axes, register_on=register_on, **options)
    for event in job.run():
        if callback is not None and callback(event) is False:
            job.stop()
    return job.result()


def reconstruction_psnr(result: FusionResult, max_points: int = 1 << 20) -> float:
    """PSNR (dB, working range) of the re-rendered frames against the normalised input burst.

    Every pixel up to ``max_points`` pixels in all; a larger burst is measured on a regular grid of every s-th row
    and column (s the smallest stride that fits), the same estimate at a fraction of the rendering (9 x 512^2:
    0.13 s against 0.77 s for every pixel, 0.01 dB apart; benchmarks/DECISIONS.md, "fixed costs")."""
    b = result._burst
    stride = max(1, math.ceil(math.sqrt(b.T * b.H * b.W / max_points)))
    norm = Normaliser(b.H, b.W)
    xy = torch.as_tensor(pixel_grid(b.H, b.W, norm)).reshape(b.H, b.W, 2)[::stride, ::stride].reshape(-1, 2)
    total = 0.0
    for t in range(b.T):
        target = b.data[t, ::stride, ::stride]
        frame = render.render_points(result._model, t, xy, result.config.value_range, result._device)
        total += float(np.mean((frame.reshape(target.shape) - target) ** 2, dtype=np.float64))
    mse = total / b.T
    return -10 * math.log10(max(mse, 1e-12))
