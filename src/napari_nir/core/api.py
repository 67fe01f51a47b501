"""The public entry points, pure numpy/torch: ``fuse`` (and, later, ``separate``)."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import numpy as np
import torch

from . import render
from .burst import prepare_burst
from .fit import MOTIONS, PRESETS, ProgressEvent, build_model, fit_steps, preset_config, resolve_device, working_frames
from .result import FusionResult


def _check_int(name: str, value, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
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
    **options,
) -> FusionResult:
    """Fuse a burst into one canonical view through a learned motion model.

    burst: (T, H, W) or (T, H, W, C) array-like (numpy, dask, zarr), any integer or float dtype, T >= 2.
    motion: "homography" (flow models follow). preset: "fast" (grid field, seconds on a CPU) or "paper"
    (the official SIREN configuration). steps: optimisation steps (default: the preset's).
    device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda[:N]", "mps". seed: makes the run reproducible.
    callback(event): called with every ``ProgressEvent`` (step, total, loss, psnr, seconds, preview);
    returning False stops the fit early (the result is returned with ``completed=False``).
    options: any other ``FitConfig`` field (e.g. batch, init="identity", working_size, preview_every).
    Never modifies ``burst``.
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    steps = _check_int("steps", steps, 1)
    seed = _check_int("seed", seed, 0)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (called with each progress event) or None, got {callback!r}")
    from .fit import FitConfig

    unknown = set(options) - set(FitConfig.__dataclass_fields__) - {"preset", "motion"}
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; valid: "
                        f"{', '.join(sorted(FitConfig.__dataclass_fields__))}")
    dev = resolve_device(device)
    data = prepare_burst(burst)
    config = preset_config(motion, preset, steps=steps, seed=seed, device=str(dev), **options)
    if callback is None or config.preview_every <= 0:
        pass
    frames, _ = working_frames(data, config.working_size)
    start = time.perf_counter()
    history: list[dict] = []
    completed = True
    with cpu_fit_settings(dev):
        model = build_model(frames, config, dev)
        for event in fit_steps(model, frames, config, dev):
            history.append({"step": event.step, "seconds": round(event.seconds, 4), "loss": event.loss,
                            "psnr": event.psnr})
            if callback is not None and callback(event) is False:
                completed = False
                break
    seconds = time.perf_counter() - start
    result = FusionResult(model, data, config, history, dev, seconds=seconds, completed=completed)
    result.final_psnr = reconstruction_psnr(result)
    return result


@contextlib.contextmanager
def cpu_fit_settings(device: torch.device):
    """Settings for a CPU fit, restored afterwards.

    Deterministic algorithms: some multi-threaded CPU kernels (grid_sample's backward among them) accumulate
    in a thread-dependent order otherwise, and a seed must give bit-identical results.
    Flush denormals: the grid features start tiny and, with an L1 loss, their updates fall into the
    denormal range, which made CPU steps 2x slower (measured 16.9 s -> 8.1 s for the 9 x 256^2 benchmark).
    """
    if device.type != "cpu":
        yield
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # torch's default; it offers no getter to restore a custom value
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def reconstruction_psnr(result: FusionResult) -> float:
    """PSNR (dB, working range) of every re-rendered frame against the normalised input burst."""
    b = result._burst
    total = 0.0
    for t in range(b.T):
        frame = render.render_frame(result._model, t, b.H, b.W, result.config.value_range, result._device)
        total += float(np.mean((frame - b.data[t]) ** 2, dtype=np.float64))
    mse = total / b.T
    return -10 * math.log10(max(mse, 1e-12))
