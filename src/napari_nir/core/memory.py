"""Memory: what a fit will need, what the device has, and a refusal that says what would fit.

Pure numpy/torch; ``psutil`` is used when installed, otherwise ``/proc/meminfo`` or ``os.sysconf``. On Linux
the container's cgroup limit (v1 or v2) is honoured too, so a fit is refused before the kernel kills it.

The estimate (:func:`estimate_fit_bytes`, parts in :func:`fit_memory_breakdown`) is the peak resident memory a
fit adds to the process, from the moment the job reads the input to the end-of-fit reconstruction (the caller's
own array is not counted), for an input of shape (T, H, W, C) fitted on working frames of shape (T, h, w, C)::

    peak = input + max(load, data + parameters + retained + max(scaling, activations, render, resize, frames,
                                                                 polish)) + overhead

It is checked from the input's shape and dtype before anything is read or copied (``api.FusionJob``).

``input``        the float32 copy of the whole input (``Burst.data``), kept for the whole fit and in the result.
``load``         what reading the input makes first, while the copy is made: a dask or zarr input computed into
                 one array, a strided view made contiguous, a projection over Z (input dtype).
``data``         the working frames when the input is larger than ``working_size``, and their copy in the value
                 range when that is not [0, 1] (the paper preset's [-1, 1]).
``parameters``   every parameter x 4: values, gradients and Adam's two moments. The
                 count comes from the real networks built on the ``meta`` device (no memory, no data), over
                 the domain an identity start gets (the frame plus 0.4 normalised units on each side; a
                 feature start adds only 0.15, but a panorama with large motion has a larger domain).
``activations``  one training step: ``batch`` points x the bytes one point needs forward and backward
                 (grid: 6 floats per feature, 3 per MLP unit; SIREN: 3 floats per unit; homography warps:
                 float64 per-point matrices; indices, coordinates and the loss), calibrated on CPU.
``retained``     what the C allocator keeps of the activations (CPU/MPS, see ``_heap_factor``).
``scaling``      the temporary of the value-range copy.
``render``       one rendering chunk (``render.CHUNK`` points, no autograd): previews and reconstructions.
``resize``       (input larger than ``working_size``) the temporaries of resizing one input frame.
``frames``       the end-of-fit reconstruction of one frame at input resolution, which builds the frame's
                 full coordinate grid (40 + 8 C bytes per input pixel).
``polish``       (drift motions) the frames in the value range and one chunk of the Gauss-Newton refinement.
``heap``         (CPU, glibc) freed memory the C allocator keeps: up to its trim threshold, 64 MiB, which the
                 first CPU fit of a process sets (``train.steady_heap``).
``overhead``     OVERHEAD_BYTES (a process's first fit loads kernels and modules) + OVERHEAD_FRACTION.

On a CUDA device only what lives on the GPU is counted (not the host copy, resize or frame grid).
The measurements these parts and constants were calibrated on are in benchmarks/DECISIONS.md, "memory
estimate"; benchmarks/scaling.py measures the peak memory of fits by size.

Setting the environment variable ``NAPARI_NIR_SKIP_MEMORY_CHECK=1`` turns the refusal off (for the rare
case where the estimate is wrong for a machine: e.g. swap that should be used).
"""
from __future__ import annotations

import contextlib
import numbers
import os

import torch

from .build import make_model
from .burst import working_shape
from .geometry import Normaliser
from .motions import polishes
from .polish import CHUNK_POINTS as POLISH_CHUNK
from .render import CHUNK
from .train import GLIBC_TRIM_THRESHOLD, glibc, points_per_step

__all__ = ["available_bytes", "estimate_fit_bytes", "fit_memory_breakdown", "check_fit_memory", "working_shape",
           "format_bytes"]

MiB = 1 << 20
GiB = 1 << 30
# calibrated on the tuning sizes of benchmarks/memory.py (1, 10.5 and 47 MPx), reported on the others
PARAMETER_COPIES = 4      # values, gradients, Adam exp_avg and exp_avg_sq (the fused Adam keeps no temporaries)
OVERHEAD_BYTES = 64 * MiB   # the first fit's one-time cost in a process (kernels, modules)
OVERHEAD_FRACTION = 0.0
IDENTITY_MARGIN = 0.4     # fit.build_model: 0.15 + 0.25 when the motion starts at the identity
SKIP_ENV = "NAPARI_NIR_SKIP_MEMORY_CHECK"
HEAP_BLOCK_MIN = 1 * MiB
HEAP_BLOCK_LIMIT = 32 * MiB  # glibc's largest dynamic mmap threshold on 64-bit systems
HEAP_FRAGMENTATION = 3.0


# -- what is available --------------------------------------------------------------------------------
def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
    except OSError:
        return None
    for key in ("MemAvailable", "MemFree"):
        if key in fields:
            return int(fields[key].split()[0]) * 1024
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: str, keys: tuple[str, ...]) -> int:
    try:
        with open(path) as fh:
            stats = dict(line.split() for line in fh if len(line.split()) == 2)
    except (OSError, ValueError):
        return 0
    for key in keys:
        if key in stats:
            with contextlib.suppress(ValueError):
                return int(stats[key])
    return 0


def _cgroup_available() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1), or None when there is no limit.

    Usage minus inactive file cache (reclaimable), like the "working set" container runtimes report."""
    root = "/sys/fs/cgroup"
    limit = _read_int(f"{root}/memory.max")
    if limit is not None:
        used = _read_int(f"{root}/memory.current") or 0
        used -= _stat_value(f"{root}/memory.stat", ("inactive_file",))
        return max(0, limit - max(used, 0))
    limit = _read_int(f"{root}/memory/memory.limit_in_bytes")
    if limit is not None and limit < (1 << 60):
        used = _read_int(f"{root}/memory/memory.usage_in_bytes") or 0
        used -= _stat_value(f"{root}/memory/memory.stat", ("total_inactive_file", "inactive_file"))
        return max(0, limit - max(used, 0))
    return None


def _host_available() -> int:
    """Available RAM in bytes: psutil, else /proc/meminfo, else os.sysconf; capped by a cgroup limit."""
    value = None
    try:
        import psutil

        value = int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unsupported platform
        value = _meminfo_available()
    if value is None:
        try:
            value = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            value = 1 << 62  # unknown: do not refuse
    limit = _cgroup_available()
    return int(value if limit is None else min(value, limit))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the platform tells it, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_bytes(device: torch.device | str) -> int:
    """Bytes a fit can still allocate on ``device``.

    CPU: available RAM (capped by a cgroup limit). CUDA: free device memory plus what torch's caching
    allocator holds unused. MPS (unified memory): the smaller of torch's recommended limit left and
    three quarters of available RAM.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    host = _host_available()
    if device.type == "mps":
        share = int(host * 0.75)
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "recommended_max_memory"):
            with contextlib.suppress(Exception):
                share = min(share, int(mps.recommended_max_memory()) - int(mps.driver_allocated_memory()))
        return max(0, share)
    return host


# -- what a fit needs ---------------------------------------------------------------------------------
def _batch(config, h: int, w: int) -> int:
    """Points per step (``train.points_per_step``), the option checked first: the estimate can run before
    validation."""
    batch = config.optimiser.batch
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral):
        raise TypeError(f"batch must be an integer number of pixels per step (or -k for H*W/k), got {batch!r}")
    batch = int(batch)
    if batch == 0:
        raise ValueError("batch must not be 0: use a number of pixels per step (e.g. 16384) or -k for H*W/k "
                         "pixels per step (e.g. -4)")
    return points_per_step(batch, h, w)


def _meta_model(config, shape):
    """The fit's networks built on the meta device (shapes only), over an identity start's domain."""
    t, h, w, c = shape
    hx, hy = Normaliser(h, w).half_extent()
    m = IDENTITY_MARGIN
    domain = (-hx - m, hx + m, -hy - m, hy + m)
    with torch.device("meta"):
        return make_model(config, (t, h, w, c), domain)


def fit_memory_breakdown(shape, config, *, input_shape=None, load_bytes: int = 0) -> dict[str, int]:
    """The parts of :func:`estimate_fit_bytes` (see the module docstring) in bytes, for working frames of
    ``shape`` (T, h, w, C), a ``FitConfig``, the burst's ``input_shape`` (T, H, W[, C]; default: ``shape``) and
    ``load_bytes``, what reading the input makes first (a lazy or strided input computed into one array).

    "scaling", "activations", "render", "resize", "frames" and "polish" are transients that never coexist: the
    estimate takes the largest of them."""
    t, h, w, c = (int(v) for v in shape)
    input_shape = (t, h, w, c) if input_shape is None else tuple(int(v) for v in input_shape)
    big_h, big_w = input_shape[1], input_shape[2]
    resized = (big_h, big_w) != (h, w)
    frame_bytes = t * h * w * c * 4
    scaled = tuple(config.value_range) != (0.0, 1.0)  # train.fit_steps copies the frames into the value range
    model = _meta_model(config, (t, h, w, c))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # every network evaluated per point (point_floats(): calibrated on CPU, benchmarks/DECISIONS.md)
    per_point = [net.point_floats() for net in model.point_networks()]
    point_train = 4 * sum(p[0] for p in per_point) + 100 + 24 * c  # + indices, coordinates, the loss
    point_fwd = 4 * sum(p[1] for p in per_point) + 60 + 8 * c
    batch = _batch(config, h, w)
    widest = max([lin.out_features for lin in model.modules() if isinstance(lin, torch.nn.Linear)]
                 + [int(g.shape[1]) for g in model.parameters() if g.dim() >= 4], default=1)
    render_points = min(CHUNK, max(big_h * big_w, 192 * 192))
    parts = {
        "input": t * big_h * big_w * c * 4,  # Burst.data: the float32 copy of the whole input, kept with the result
        "load": int(load_bytes),
        "data": frame_bytes * (int(resized) + int(scaled)),  # the working frames, and their value-range copy
        "parameters": PARAMETER_COPIES * params + buffers,
        "scaling": frame_bytes if scaled else 0,
        "activations": int(batch * point_train),
        "render": int(render_points * point_fwd),
        "resize": (3 * big_h * big_w * c * 4) if resized else 0,
        "frames": big_h * big_w * (40 + 8 * c),
        "polish": _polish_bytes(config, model, frame_bytes, t * h * w, c),
    }
    parts["retained"] = int(parts["activations"] * (_heap_factor(config, batch * widest * 4) - 1))
    on_cpu = not config.runtime.device.startswith(("cuda", "mps"))
    parts["heap"] = GLIBC_TRIM_THRESHOLD if on_cpu and glibc() else 0
    parts["overhead"] = int(OVERHEAD_BYTES + OVERHEAD_FRACTION * _peak(parts, _TRANSIENT))
    return parts


def _peak(parts: dict, transient: tuple) -> int:
    """Reading the input (its float32 copy made while the loaded array exists), or the fit (the copy, the working
    data, the networks and the largest transient), whichever is larger."""
    fit = parts["data"] + parts["parameters"] + parts["retained"] + parts["heap"] + max(parts[k] for k in transient)
    return parts["input"] + max(parts["load"], fit)


def _heap_factor(config, tensor_bytes: int) -> float:
    """Resident bytes per live byte of a training step's activations on CPU/MPS, for activation tensors of
    ``tensor_bytes`` (batch x the widest layer).

    glibc serves blocks below its mmap threshold (which adapts up to 32 MiB) from its heap and keeps what is
    freed, so resident memory grows over the first steps well beyond the live activations and stays there
    for the rest of the run (what is rendered afterwards comes on top): HEAP_FRAGMENTATION for tensors between
    the mmap threshold's bounds, 1 outside them (benchmarks/DECISIONS.md, "memory estimate")."""
    if config.runtime.device.startswith("cuda"):
        return 1.0
    return HEAP_FRAGMENTATION if HEAP_BLOCK_MIN <= tensor_bytes < HEAP_BLOCK_LIMIT else 1.0


def _polish_bytes(config, model, frame_bytes: int, pixels: int, c: int) -> int:
    """The drift motions' polish (polish.py): the frames in the value range (built through one temporary) and one
    chunk of points: float64 warps, samples, residuals and per-generator Jacobian columns."""
    if not polishes(config):
        return 0
    k = len(getattr(model.motion, "generators", ())) or 8
    per_point = 100 + 24 * c + k * (12 + 8 * c)
    return 2 * frame_bytes + min(POLISH_CHUNK, pixels) * per_point


_TRANSIENT = ("scaling", "activations", "render", "resize", "frames", "polish")
_HOST_ONLY = ("resize", "frames")  # built on the host even when the fit runs on a GPU


def estimate_fit_bytes(shape, config, *, input_shape=None, load_bytes: int = 0) -> int:
    """Conservative peak bytes of a fit on working frames of ``shape`` (T, h, w, C) with ``config`` (FitConfig),
    from the moment the input is read: the input's float32 copy + the larger of reading (``load_bytes``) and the
    fit (working data + parameters + the largest transient) + overhead (see :func:`fit_memory_breakdown`).

    ``input_shape`` (T, H, W[, C]): the burst's shape, for the copy, the resize and the full-resolution
    reconstruction. On a CUDA device (``config.device``) only what lives on the GPU is counted."""
    parts = fit_memory_breakdown(shape, config, input_shape=input_shape, load_bytes=load_bytes)
    transient = _TRANSIENT
    if config.runtime.device.startswith("cuda"):
        t, h, w, c = (int(v) for v in shape)
        parts["data"] = t * h * w * c * 4  # the frames on the GPU; the host copies are not counted
        parts["input"] = parts["load"] = 0
        transient = tuple(k for k in _TRANSIENT if k not in _HOST_ONLY)
    peak = _peak(parts, transient)
    return int(peak + OVERHEAD_BYTES + OVERHEAD_FRACTION * peak)


def format_bytes(n: float) -> str:
    """1.2 GiB / 340 MiB / 12 KiB."""
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{max(n, 0) / 1024:.0f} KiB"


def _largest_fitting(lo: int, hi: int, fits) -> int | None:
    """The largest integer in [lo, hi] with fits(n) (assumed monotone: fits(n) implies fits(n - 1))."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_fit_memory(shape, config, device, *, input_shape=None, load_bytes: int = 0,
                     available: int | None = None) -> int:
    """Refuse a fit that will not fit in memory: raise ValueError saying what it needs, what is available on
    ``device``, and the ``working_size`` (or number of frames) that would fit. Returns the estimate in bytes.

    shape: (T, h, w, C) working frames; input_shape: (T, H, W[, C]) of the burst (default: ``shape``);
    available: bytes free (default: :func:`available_bytes` of ``device``).
    """
    input_shape = tuple(shape) if input_shape is None else tuple(input_shape)
    need = estimate_fit_bytes(shape, config, input_shape=input_shape, load_bytes=load_bytes)
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return need
    device = torch.device(device)
    have = available_bytes(device) if available is None else int(available)
    if need <= have:
        return need
    t, h, w, c = (int(v) for v in shape)

    def need_at(size: int) -> int:
        cfg = config.replace(working_size=size)
        return estimate_fit_bytes(working_shape(input_shape, size), cfg, input_shape=input_shape,
                                  load_bytes=load_bytes)

    longest = max(h, w)
    size = _largest_fitting(16, longest - 1, lambda s: need_at(s) <= have)
    if size is not None and size >= 64:
        size = size // 16 * 16
    where = f"{device.type}" if device.index is None else str(device)
    options = []
    if size is not None:
        options.append(f"use working_size={size} (needs about {format_bytes(need_at(size))})")
    frames = _largest_fitting(2, t - 1, lambda n: estimate_fit_bytes(
        (n, h, w, c), config, input_shape=(n,) + tuple(input_shape[1:]), load_bytes=load_bytes * n // t) <= have)
    if frames is not None:
        options.append(f"fewer frames (at most {frames} fit at the current size)")
    if device.type != "cpu":
        options.append("device='cpu'")
    if not options:
        options.append("crop or downscale the burst (rendering one frame at its full resolution alone does not "
                       "fit)")
    raise ValueError(f"this fit needs about {format_bytes(need)} but only {format_bytes(have)} is available on "
                     f"{where} (frames {t}x{h}x{w}x{c}, preset {config.preset!r}); {' or '.join(options)}")
