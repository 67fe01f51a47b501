"""Memory estimate: core.memory's estimate against the measured peak of a fit, over bursts of 1 to 315 MPx.

Each size runs in a fresh process. The burst is generated first (a smooth random texture, shifted crops); the
process's peak RSS (VmHWM) is then reset through /proc/self/clear_refs and the fit's peak is VmHWM minus the RSS at
that moment (the caller's array is not the fit's). The estimate is ``FusionJob.memory_estimate``, what the job
checked, from the input's shape and dtype, before it read the input.

Tuning and held-out sizes (benchmarks/DECISIONS.md, "memory estimate"): the constants of core/memory.py were set
on TUNING; HELD_OUT reports them.
"""
from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
import napari_nir.core.api as api
import skimage.feature, skimage.measure, skimage.registration, skimage.transform  # imports are not the fit
from scipy.ndimage import gaussian_filter
T, H, W, C, dtype, steps, lazy = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
                                  int(sys.argv[6]), sys.argv[7] == "dask")
rng = np.random.default_rng(0)
m = 8
base = gaussian_filter(rng.standard_normal((H + 2 * m, W + 2 * m)).astype(np.float32), 2)
base = (base - base.min()) / (base.max() - base.min())
top = np.iinfo(dtype).max if np.dtype(dtype).kind in "iu" else 1.0
shape = (T, H, W) if C == 1 else (T, H, W, C)
burst = np.empty(shape, dtype=dtype)
for t in range(T):
    dy, dx = rng.integers(0, 2 * m, 2)
    crop = base[dy:dy + H, dx:dx + W]
    for c in range(C):
        v = crop * (0.6 + 0.4 * c / max(C - 1, 1)) * top
        if C == 1:
            burst[t] = v
        else:
            burst[t, ..., c] = v
del base
source = burst
if lazy:
    import dask.array as da
    source = da.from_array(burst, chunks=(1,) + shape[1:])
    source = source.map_blocks(lambda b: b.copy())  # computing makes a new array, as reading a file would
def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status("VmRSS")
start = time.perf_counter()
job = api.FusionJob(source, "homography", steps=steps, preview_every=0)
for _ in job.run():
    pass
fit = job.result()
print(json.dumps({"peak": status("VmHWM") - before, "estimate": job.memory_estimate,
                  "seconds": time.perf_counter() - start}))
"""

MiB = 1 << 20
# (frames, height, width, channels, dtype, input): 1 to 315 MPx (frames x height x width)
TUNING = ((4, 512, 512, 1, "uint8", "numpy"), (10, 1024, 1024, 3, "uint8", "numpy"),
          (20, 1536, 1536, 1, "uint16", "numpy"))
HELD_OUT = ((9, 512, 512, 3, "uint8", "numpy"), (20, 1536, 1536, 1, "uint16", "dask"),
            (40, 2048, 2048, 3, "uint8", "numpy"), (75, 2048, 2048, 1, "uint16", "numpy"))
QUICK = ((3, 256, 256, 1, "uint8", "numpy"), (3, 256, 256, 3, "uint8", "dask"))
STEPS = 60  # the allocator's retained heap settles within the first tens of steps (DECISIONS.md)


def run_child(size: tuple, steps: int = STEPS) -> dict:
    t, h, w, c, dtype, kind = size
    out = subprocess.run([sys.executable, "-c", CHILD, str(t), str(h), str(w), str(c), dtype, str(steps), kind],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool, device: str) -> list[dict]:
    rows = []
    sets = (("quick", QUICK),) if quick else (("tuning", TUNING), ("held-out", HELD_OUT))
    for role, sizes in sets:
        for size in sizes:
            t, h, w, c, dtype, kind = size
            found = run_child(size)
            rows.append([role, f"{t} x {h} x {w} x {c} {dtype} ({kind})", f"{t * h * w / 1e6:.1f}",
                         f"{found['peak'] / MiB:.0f}", f"{found['estimate'] / MiB:.0f}",
                         f"{found['peak'] / found['estimate']:.2f}", f"{found['seconds']:.0f}"])
    return [{"title": "Memory estimate against the measured peak of a fit (fast preset, homography, CPU)",
             "header": ["set", "burst", "MPx", "fit peak RSS MiB", "estimate MiB", "measured / estimate", "fit s"],
             "rows": rows,
             "notes": ["each size in a fresh process; the peak is VmHWM above the RSS once the burst existed "
                       "(/proc/self/clear_refs), imports excluded; the estimate is FusionJob.memory_estimate, "
                       f"checked before the input is read; {STEPS} steps; target 0.8-1.2",
                       "dask: a dask array whose computation makes a new array (as reading a file does)"]}]
