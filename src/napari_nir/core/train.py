"""The training loop, and where it runs.

``fit_steps`` is a generator of ``ProgressEvent``: the caller (API, CLI progress bar, napari thread worker)
drives it and can stop at any ``yield`` (cancellation). Everything is seeded; on CPU a run is bit-identical
for the same seed (``cpu_fit_settings``).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import FitConfig
from .stages import stage_at

__all__ = ["ProgressEvent", "fit_steps", "points_per_step", "blank_frame_weights", "resolve_device", "cpu_fit_settings",
           "steady_heap"]

# glibc raises its mmap threshold up to 32 MiB as a program frees large blocks, and its trim threshold to twice
# that; steady_heap() sets both there at once (see its docstring)
GLIBC_MMAP_THRESHOLD = 32 << 20
GLIBC_TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


@dataclass
class ProgressEvent:
    """One progress report. loss: training loss; psnr: reconstruction PSNR (dB, batch estimate);
    seconds: wall time since the start; preview: (h, w[, C]) float32 working-range canonical view or None."""

    step: int
    total: int
    loss: float
    psnr: float
    seconds: float
    preview: np.ndarray | None = None
    stage: str = "fit"  # the model's stage at this step (stages.py)


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA, then MPS, then CPU. Explicit names are checked and explained when unavailable."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {type(device).__name__}")
    name = device.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA GPU is available to torch; "
                             "use device='auto' or 'cpu'")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) present "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return dev
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' requested but Apple MPS is not available; use device='auto' or 'cpu'")
        return torch.device("mps")
    raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def points_per_step(batch: int, height: int, width: int) -> int:
    """Pixels drawn per training step: ``batch`` when > 0, else H * W / -batch (at least 1024)."""
    return batch if batch > 0 else max(1024, (height * width) // -batch)


def blank_frame_weights(count: int, blank, weight: float) -> np.ndarray | None:
    """(count,) ``fit_steps`` frame weights drawing the ``blank`` frames ``weight`` times as often as the others,
    or None (uniform draws, as always) when no frame is blank, ``weight`` is 1 or every frame is blank."""
    if not len(blank) or weight == 1.0 or len(blank) == count:
        return None
    weights = np.ones(count)
    weights[list(blank)] = weight
    return weights


BATCH_RAMP_START = 0.25  # the fraction of ``batch`` a ramped run starts with


def batch_at(batch: int, progress: float, ramp: float) -> int:
    """Points drawn at ``progress`` (in [0, 1]) of a run: ``batch``, or with a ``ramp`` > 0 a linear growth from
    BATCH_RAMP_START x batch at the start to batch at progress ``ramp``: early steps, which fit coarse levels only,
    need fewer points than late ones (benchmarks/DECISIONS.md, "batch ramp")."""
    if ramp <= 0 or progress >= ramp:
        return batch
    return max(1, round(batch * (BATCH_RAMP_START + (1 - BATCH_RAMP_START) * progress / ramp)))


def fit_steps(model: nn.Module, frames: np.ndarray, config: FitConfig, device: torch.device,
              start: float | None = None, preview: Callable[[nn.Module], np.ndarray] | None = None,
              frame_weights: np.ndarray | None = None):
    """Generator: optimise ``model`` on (T, h, w, C) working frames, yielding ``ProgressEvent``s.

    ``model(frame_index (N,), xy (N, 2)) -> (N, C)`` predicts pixels; it also provides ``stages``,
    ``parameter_groups``, ``set_progress`` and ``regulariser`` (see models.py). The loop never asks what the model
    is: what changes during a run is in its stages (stages.py).
    Stop early by closing the generator (or simply not resuming it): the model keeps its current state.
    start: ``time.perf_counter()`` value that event.seconds count from (default: now); a job passes the time
    before it built the model, so that the feature-based start is included in the reported times.
    preview(model) -> (h, w, C) canonical view, called every ``preview_every`` steps (None: no previews).
    frame_weights: (T,) how often each frame's pixels are drawn, relative to one another (None: uniformly over
    all pixels, the same draws as always).
    """
    t, h, w, c = frames.shape
    o = config.optimiser
    lo, hi = o.value_range
    data = torch.as_tensor(frames, device=device).reshape(-1, c)
    if (lo, hi) != (0.0, 1.0):  # in [0, 1] already (the fast preset): the frames themselves, no copy on a CPU
        data = data * (hi - lo) + lo
    norm = model.normaliser
    batch = points_per_step(o.batch, h, w)
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    # fused: the update of each tensor in one pass (the multi-kernel update was a third of a step on large grids;
    # benchmarks/RESULTS.md)
    optimiser = torch.optim.Adam(model.parameter_groups(config), fused=device.type in ("cpu", "cuda"))
    base_lrs = [g["lr"] for g in optimiser.param_groups]
    warmup_steps = int(o.motion_warmup * o.steps)
    start = time.perf_counter() if start is None else start
    loss_fn = torch.nn.functional.l1_loss if o.loss == "l1" else torch.nn.functional.mse_loss
    mse_to_unit = 1.0 / (hi - lo) ** 2
    stages = model.stages(config)
    weights = None if frame_weights is None else torch.as_tensor(np.asarray(frame_weights, dtype=np.float64))
    entered: set[int] = set()
    preview_every = config.runtime.preview_every
    for step in range(1, o.steps + 1):
        progress = (step - 1) / max(o.steps - 1, 1)
        for k, stage in enumerate(stages):
            if k not in entered and progress >= stage.start:
                entered.add(k)
                if stage.enter is not None:
                    stage.enter(model, data, (t, h, w, c), config, gen, progress)
        stage = stage_at(stages, progress)
        decay = o.lr_final_fraction + (1 - o.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        for g, base in zip(optimiser.param_groups, base_lrs):
            frozen = g.get("name") == "motion" and step <= warmup_steps
            g["lr"] = 0.0 if frozen else base * decay
        model.set_progress(progress, config)
        points = batch_at(batch, progress, o.batch_ramp)
        if weights is None:
            flat = torch.randint(t * h * w, (points,), generator=gen).to(device)
        else:
            frame = torch.multinomial(weights, points, replacement=True, generator=gen)
            flat = (frame * (h * w) + torch.randint(h * w, (points,), generator=gen)).to(device)
        frame_index = flat // (h * w)
        xy = norm.flat_pixels(flat % (h * w))
        pred = model(frame_index, xy)
        target = data[flat]
        if stage.cauchy > 0:
            data_term = stage.cauchy * torch.log1p(((pred - target) / stage.cauchy) ** 2).mean()
        else:
            data_term = loss_fn(pred, target)
        loss = data_term + model.regulariser(config, gen)
        if not torch.isfinite(loss):
            raise ValueError(f"the fit diverged at step {step} (the loss is {loss.item()}); lower the learning "
                             "rates (lr_field, lr_motion) or use the preset's defaults")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        # yield every step: a consumer cancels by not resuming, so the latency is one step
        with torch.no_grad():
            mse = torch.mean((pred.detach() - target) ** 2).item() * mse_to_unit
        psnr = -10 * math.log10(max(mse, 1e-12))
        shown = None
        if preview is not None and preview_every and (step % preview_every == 0 or step == o.steps):
            shown = preview(model)
        yield ProgressEvent(step, o.steps, float(loss.item()), psnr, time.perf_counter() - start, shown, stage.name)


_heap_set: bool | None = None  # steady_heap's outcome, once per process


def glibc() -> bool:
    """Whether this process runs on glibc (Linux), where ``steady_heap`` sets the allocator's thresholds."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def steady_heap() -> bool:
    """Set glibc's malloc to where its own adaptive rule settles (mmap threshold 32 MiB, trim threshold 64 MiB),
    once per process; True where set (Linux with glibc), False elsewhere.

    A training step allocates and frees the same few MB-sized activation tensors every step. With glibc's
    starting thresholds (or a fixed low one, as Dask's nannies set through ``MALLOC_TRIM_THRESHOLD_``) the freed
    heap top is handed back to the system at the end of a step and faulted in again, page by page, in the next:
    161 page faults a step and 18-19 % of the step's time on a 9 x 256^2 fit (benchmarks/DECISIONS.md, "steady
    heap"). The values are the ones glibc reaches by itself once a program has freed a 32 MiB block, so memory
    freed above 64 MiB at the heap top still goes back to the system; the estimate in memory.py already assumes
    blocks below 32 MiB stay on the heap.
    """
    global _heap_set
    if _heap_set is not None:
        return _heap_set
    _heap_set = False
    if glibc():
        try:
            libc = ctypes.CDLL("libc.so.6")
            _heap_set = bool(libc.mallopt(_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD)
                             and libc.mallopt(_M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD))
        except (OSError, AttributeError):
            _heap_set = False
    return _heap_set


def _set_deterministic(mode: bool, warn_only: bool) -> None:
    """torch.use_deterministic_algorithms without its import of torch._inductor (about a second on a process's
    first fit; it sets a flag of torch.compile's, which no fit uses); the public call where torch lacks the
    private one."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


_SETTINGS_LOCK = threading.Lock()
_cpu_fits = 0            # CPU fits running in this process (guarded by _SETTINGS_LOCK)
_saved_deterministic = (False, False)


@contextlib.contextmanager
def cpu_fit_settings(device: torch.device):
    """Settings for a CPU fit, set while any CPU fit of this process runs and restored when the last one ends.

    Deterministic algorithms: some multi-threaded CPU kernels (grid_sample's backward among them) accumulate
    in a thread-dependent order otherwise, and a seed must give bit-identical results.
    Flush denormals: the grid features start tiny and, with an L1 loss, their updates fall into the
    denormal range, which made CPU steps about twice as slow (benchmarks/DECISIONS.md, "CPU settings").
    The C allocator's thresholds are set once per process (``steady_heap``) and left so.
    Deterministic algorithms and flushing are process-wide torch flags. Fits in several threads (two widgets, a
    widget and the console) share them through a count under a lock: the first fit to start saves the caller's
    deterministic setting and sets both, the last to end restores it, so overlapping fits never switch the flags
    under one another and the process is left as it was.
    """
    global _cpu_fits, _saved_deterministic
    if device.type != "cpu":
        yield
        return
    with _SETTINGS_LOCK:
        if _cpu_fits == 0:
            steady_heap()
            _saved_deterministic = (torch.are_deterministic_algorithms_enabled(),
                                    torch.is_deterministic_algorithms_warn_only_enabled())
            _set_deterministic(True, warn_only=True)
            torch.set_flush_denormal(True)
        _cpu_fits += 1
    try:
        yield
    finally:
        with _SETTINGS_LOCK:
            _cpu_fits -= 1
            if _cpu_fits == 0:
                torch.set_flush_denormal(False)  # torch's default; it offers no getter to restore a custom value
                was, warn_only = _saved_deterministic
                _set_deterministic(was, warn_only)
