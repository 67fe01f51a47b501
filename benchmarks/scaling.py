"""Scaling: seconds per step and peak memory against image size and frame count, and the floor.

Each configuration runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own. The floor is an
analytic count of the FLOPs and bytes a step of the fast homography model must move, compared with the
machine's measured matmul rate and memory bandwidth.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
import napari_nir as nir
size, frames, steps, device, motion = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
rng = np.random.default_rng(0)
from napari_nir._sample_data import homography_burst
burst = homography_burst(frames, (size, size), seed=0).frames
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
fit = nir.fuse(burst, motion, steps=steps, device=device, init="identity", preview_every=0)
times = [h["seconds"] for h in fit.history]
per_step = (times[-1] - times[4]) / (len(times) - 5)
model = fit._model
params = sum(p.numel() for p in model.parameters())
gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
# VmHWM: this process's own peak (ru_maxrss is inherited from the parent across fork + exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
rss = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"per_step": per_step, "rss_mb": rss,
                  "gpu_mb": gpu, "params": params, "batch": fit.config.get("batch"),
                  "levels": len(model.field.grids), "features": model.field.grids[0].shape[1],
                  "hidden": model.field.mlp[0].out_features, "channels": burst.shape[-1]}))
"""


def run_child(size: int, frames: int, steps: int, device: str, motion: str = "homography") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(size), str(frames), str(steps), device, motion],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_rates(device: str) -> tuple[float, float]:
    """Measured float32 matmul rate (GFLOP/s) and memory bandwidth (GB/s, a large tensor copy)."""
    import torch

    dev = torch.device("cuda" if device.startswith("cuda") else "cpu")
    n = 2048
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    sync()
    gflops = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    x = torch.empty(64 * 2**20, device=dev)  # 256 MB
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync()
    gbs = 2 * x.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9  # read + write
    return gflops, gbs


def floor(info: dict) -> tuple[float, float]:
    """(FLOPs, bytes) one training step of the fast homography model needs at minimum.

    Per batch point: bilinear grid samples (4 taps x features x levels, ~3 flops each, forward and the
    scatter of the backward), the MLP (2 flops per weight forward, 4 backward), the homography (~30 flops).
    Per parameter: Adam reads param, grad, two moments and writes three (~28 bytes) and ~12 flops.
    Gathered data: the sampled pixels and features (~4 bytes per touched value).
    """
    n, levels, feats, hidden, c = info["batch"], info["levels"], info["features"], info["hidden"], info["channels"]
    width = levels * feats
    mlp_weights = width * hidden + hidden * c
    flops_point = 3 * (4 * feats * levels * 3) + 6 * mlp_weights + 30
    flops = n * flops_point + 12 * info["params"]
    bytes_ = n * (4 * 4 * feats * levels * 2 + 4 * (width + hidden) * 3 + 4 * c) + 28 * info["params"]
    return float(flops), float(bytes_)


def run(quick: bool, device: str) -> list[dict]:
    import torch

    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = (128, 256) if quick else (128, 256, 512, 1024)
    frame_counts = (3, 9) if quick else (3, 9, 17)
    steps = 20 if quick else 40
    gflops, gbs = machine_rates(dev)
    rows = []
    for size in sizes:
        for frames in frame_counts:
            info = run_child(size, frames, steps, dev)
            fl, by = floor(info)
            achieved_flops = fl / info["per_step"] / 1e9
            achieved_bw = by / info["per_step"] / 1e9
            mem = f"{info['gpu_mb']:.0f} (GPU)" if info["gpu_mb"] is not None else f"{info['rss_mb']:.0f}"
            rows.append([f"{size}x{size}", frames, f"{info['per_step'] * 1000:.1f}", mem, f"{info['params'] / 1e6:.2f}",
                         f"{fl / 1e9:.2f}", f"{by / 1e6:.0f}", f"{100 * achieved_flops / gflops:.1f}",
                         f"{100 * achieved_bw / gbs:.1f}"])
    return [{
        "title": f"Scaling: fast preset, homography, RGB, batch {info['batch']} pixels/step, device {dev}",
        "header": ["image", "frames", "ms / step", "peak MB", "params (M)", "GFLOP / step (floor)",
                   "MB moved / step (floor)", "% of matmul rate", "% of memory bandwidth"],
        "rows": rows,
        "notes": [f"machine: float32 matmul {gflops:.0f} GFLOP/s, copy bandwidth {gbs:.1f} GB/s (measured now)",
                  "per-step cost is set by the batch (fixed) and the grid parameters Adam updates (grow with image "
                  "size); frame count changes only the data held in memory",
                  _bound_note(rows)],
    }]


def _bound_note(rows) -> str:
    best_flops = max(float(r[7]) for r in rows)
    best_bw = max(float(r[8]) for r in rows)
    if max(best_flops, best_bw) < 25:
        return (f"distance from the floor: at best {best_flops:.0f} % of the matmul rate and {best_bw:.0f} % of the "
                "bandwidth, so a step is bound by neither: the rest is per-kernel overhead (grid_sample forward and "
                "backward for each level, small scatter/gather ops)")
    return f"at best {best_flops:.0f} % of the matmul rate and {best_bw:.0f} % of the memory bandwidth"
