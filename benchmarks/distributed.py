"""Many bursts on Dask (src/napari_nir/distributed.py): throughput with 1 and 2 single-threaded workers on 8 small
bursts, against the same bursts fitted one after another in one process, and what the results are worth: each
batch result compared bit for bit with ``napari_nir.fuse(burst, threads=1)`` run alone.

Bursts: ``homography_burst`` seeds 100-107, 5 x 128 x 128 RGB, fast preset defaults (held out: no default was
chosen on them). Each configuration runs in a fresh process; the cluster's start is timed apart from the batch.
"""
from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, tempfile
import numpy as np
from napari_nir._sample_data import homography_burst

def main():
    mode, workers, count, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    bursts = {f"s{seed}": homography_burst(5, (side, side), seed=seed).frames for seed in range(100, 100 + count)}
    out = {"mode": mode, "workers": workers}
    if mode == "serial":  # one process, one burst after another, every core for each fit (what users do now)
        import napari_nir as nir, torch
        t0 = time.perf_counter()
        for burst in bursts.values():
            nir.fuse(burst)
        out.update(seconds=time.perf_counter() - t0, threads=torch.get_num_threads())
    else:
        import distributed
        from napari_nir import distributed as batch, io
        t0 = time.perf_counter()
        cluster = batch.local_cluster(workers)  # what fuse_many starts by default
        client = distributed.Client(cluster)
        out["start_s"] = time.perf_counter() - t0
        folder = tempfile.mkdtemp()
        t0 = time.perf_counter()
        rows = batch.fuse_many(bursts, folder, client=client, progress=False)
        out["seconds"] = time.perf_counter() - t0
        out["burst_s"] = [r["seconds"] for r in rows]
        out["failed"] = sum(r["status"] != "done" for r in rows)
        client.close(); cluster.close()
        if mode == "check":  # every result against the fit run alone, same seed, one thread
            import napari_nir as nir
            same = 0
            for name, burst in bursts.items():
                canonical, _ = io.read_tiff(f"{folder}/{name}/canonical.tif")
                same += bool(np.array_equal(canonical, nir.fuse(burst, threads=1).canonical()))
            out["identical"] = same
    print("RESULT " + json.dumps(out), flush=True)

if __name__ == "__main__":
    main()
"""


def run_child(mode: str, workers: int, count: int, side: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(workers), str(count), str(side)],
                          capture_output=True, text=True, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"distributed benchmark child ({mode}, {workers}) failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run(quick: bool, device: str) -> list[dict]:
    count, side = (4, 64) if quick else (8, 128)
    serial = run_child("serial", 0, count, side)
    one = run_child("batch", 1, count, side)
    two = run_child("check", 2, count, side)
    rows = []
    for label, result in (("one process, one burst after another (nir.fuse)", serial),
                          ("fuse_many, LocalCluster 1 worker x 1 thread", one),
                          ("fuse_many, LocalCluster 2 workers x 1 thread", two)):
        burst_s = result.get("burst_s")
        mean_burst = sum(burst_s) / len(burst_s) if burst_s else None
        threads = result.get("threads", 1)
        rows.append([label, threads, f"{result['seconds']:.1f}", f"{count / result['seconds'] * 60:.1f}",
                     "-" if "start_s" not in result else f"{result['start_s']:.1f}",
                     "-" if mean_burst is None else f"{mean_burst:.2f}"])
    speedup = one["seconds"] / two["seconds"]
    overhead = two["seconds"] - sum(two["burst_s"]) / 2
    table = {"title": f"Many bursts on Dask: {count} bursts of 5 x {side}x{side} RGB, homography, fast preset, CPU",
             "header": ["how", "torch threads per fit", "seconds (cluster started)", "bursts per minute",
                        "cluster start s", "mean seconds per burst on its worker"],
             "rows": rows,
             "notes": [f"2 workers / 1 worker throughput: {speedup:.2f}x (target >= 1.7x)",
                       f"2 workers: {two['seconds']:.1f} s against {sum(two['burst_s']) / 2:.1f} s of fitting per "
                       f"worker: {overhead:.1f} s of scheduling, transfer and writing outside the fits "
                       f"({overhead / count:.2f} s per burst)",
                       f"results bit-identical to napari_nir.fuse(burst, threads=1) run alone: "
                       f"{two['identical']} of {count}; failed bursts: {one['failed'] + two['failed']}",
                       "seeds 100-107 of homography_burst (held out); each row in a fresh process"]}
    return [table]
