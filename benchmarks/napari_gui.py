"""napari: a fit in the "Fuse burst" widget against the same fit from Python, GUI stalls, cancel latency, the first
click and the console call (src/napari_nir/_runner.py).

Every measurement runs in a fresh process (a viewer on the current display, or under ``xvfb-run`` when there is
none), one at a time, after a 20-step warm-up fit in the same process, so that no process carries another's
torch thread pools or caches. The burst is the homography sample (9 x 256 x 256 RGB), the fast preset, the same
seed and steps on both sides.

- fit time: ``fit.seconds`` (the optimisation loop, start included), the figure the 1.2x target is about;
  wall: from the Run click (``widget.run()``) to the result's layers in place, against ``napari_nir.fuse`` plus
  ``add_result_to_viewer`` (what the guide showed for the console before ``run_in_viewer``).
- stalls: the longest gap between ticks of a 10 ms Qt timer, during the fit and while the result's layers are
  added (the run's end), in a re-run (its layers are updated in place) and at the end of the session's first
  run (the warm-up, whose layers are all new). The timed run is a third run, without the timer (it wakes the
  GUI thread 100 times a second, which a session does not).
- the console call's warm-up is a first ``run_in_viewer``: a plain ``napari_nir.fuse`` in the console first
  (torch's thread pool made in the GUI thread) made later background fits slower in this measurement.
- cancel: seconds from ``cancel()`` to the run's end, pressed during the feature start and during the fit.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

STEPS = 400  # the fast preset's default for a homography
REPEATS = 3

CHILD = r"""
import json, sys, time
import numpy as np
mode, steps = sys.argv[1], int(sys.argv[2])
import napari
from qtpy.QtCore import QEventLoop, QTimer
from qtpy.QtWidgets import QApplication
import torch
from napari_nir._sample_data import homography_burst
import napari_nir as nir
frames = homography_burst(n_frames=9, shape=(256, 256), seed=0).frames
viewer = napari.Viewer(show=True)
app = QApplication.instance()
layer = viewer.add_image(frames, name="burst", rgb=True)
out = {"mode": mode}

def wait_for(signal, timeout_s=600):
    loop = QEventLoop()
    signal.connect(lambda *a: loop.quit())
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    loop.exec()

def idle(seconds):
    loop = QEventLoop(); QTimer.singleShot(int(seconds * 1000), loop.quit); loop.exec()

if mode == "api":
    nir.fuse(frames, steps=20)
    t0 = time.perf_counter()
    fit = nir.fuse(frames, steps=steps)
    nir.add_result_to_viewer(viewer, fit, "burst")
    out.update(fit_s=fit.seconds, wall_s=time.perf_counter() - t0, threads=torch.get_num_threads(),
               psnr=fit.final_psnr)
else:
    dock, widget = viewer.window.add_plugin_dock_widget("napari-nir", "Fuse burst")
    idle(3.0)  # the user picks the settings while the widget's warm-up imports run
    if mode == "first_click":
        widget.steps.value = 20
        t0 = time.perf_counter(); widget.run(); out["first_click_s"] = time.perf_counter() - t0
        wait_for(widget.finished)
    elif mode == "widget":
        def timed(n, watch=True):
            ticks, marks = [], {}
            timer = QTimer(); timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
            if watch:
                timer.start(10)
            widget.steps.value = n
            t0 = time.perf_counter()
            worker = widget.run()
            worker.returned.connect(lambda *a: marks.setdefault("returned", time.perf_counter()))
            wait_for(widget.finished)
            end = time.perf_counter(); timer.stop()
            ticks = np.array(ticks); gaps = np.diff(ticks) if len(ticks) > 1 else np.zeros(0)
            during = gaps[ticks[1:] <= marks["returned"]]
            after = gaps[ticks[1:] > marks["returned"]]
            return end - t0, 1000 * float(during.max(initial=0)), 1000 * float(after.max(initial=0))
        _, _, first_end = timed(20)  # the session's first run: every result layer is new
        _, stall_fit, stall_end = timed(steps)  # a re-run: the layers are updated in place
        wall, _, _ = timed(steps, watch=False)  # the timed run: no timer waking the GUI thread 100 times a second
        fit = widget.last_result
        out.update(fit_s=fit.seconds, wall_s=wall, threads=widget.current_run.threads, psnr=fit.final_psnr,
                   stall_fit_ms=stall_fit, stall_end_ms=stall_end, first_end_ms=first_end)
    elif mode == "cancel":
        widget.steps.value = 20
        widget.run(); wait_for(widget.finished)
        import threading
        from napari_nir.core import motion
        original = motion.feature_homographies
        pressed, reached, clicked = {}, threading.Event(), threading.Event()
        def held_start(*args, **kwargs):  # the worker enters the start and waits for the click
            reached.set(); clicked.wait(60)
            return original(*args, **kwargs)
        def click_when_inside():
            if reached.is_set() and "start" not in pressed:
                pressed["start"] = time.perf_counter(); widget.cancel(); clicked.set()  # in the GUI thread
        poll = QTimer(); poll.timeout.connect(click_when_inside); poll.start(5)
        motion.feature_homographies = held_start
        widget.steps.value = steps
        widget.run(); wait_for(widget.finished); poll.stop()
        out["cancel_start_s"] = time.perf_counter() - pressed["start"]
        motion.feature_homographies = original
        widget.fit_options = {"preview_every": 0}
        worker = widget.run()
        def at_step(event):
            if event.step >= 50 and "fit" not in pressed:
                pressed["fit"] = time.perf_counter(); widget.cancel()
        worker.yielded.connect(at_step)
        wait_for(widget.finished)
        out["cancel_fit_s"] = time.perf_counter() - pressed["fit"]
    elif mode == "console":
        run = nir.run_in_viewer(viewer, "burst", steps=20)  # warm-up as the user's first call
        wait_for(run.finished)
        t0 = time.perf_counter()
        run = nir.run_in_viewer(viewer, "burst", steps=steps)
        out["returns_s"] = time.perf_counter() - t0
        wait_for(run.finished)
        out.update(wall_s=time.perf_counter() - t0, outcome=run.outcome)
print("RESULT " + json.dumps(out), flush=True)
viewer.close()
"""


def run_child(mode: str, steps: int) -> dict:
    command = [sys.executable, "-c", CHILD, mode, str(steps)]
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
        command = ["xvfb-run", "-a", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"napari benchmark child ({mode}) failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run(quick: bool, device: str) -> list[dict]:
    steps, repeats = (100, 1) if quick else (STEPS, REPEATS)
    if device not in ("auto", "cpu"):
        print(f"napari: the GUI benchmark runs on the widget's default device, not {device}", flush=True)
    rows, ratios, walls = [], [], []
    for repeat in range(repeats):
        api = run_child("api", steps)
        widget = run_child("widget", steps)
        ratio = widget["fit_s"] / api["fit_s"]
        ratios.append(ratio)
        walls.append(widget["wall_s"] / api["wall_s"])
        rows.append([repeat + 1, f"{api['fit_s']:.2f}", api["threads"], f"{widget['fit_s']:.2f}", widget["threads"],
                     f"{ratio:.2f}", f"{api['wall_s']:.2f}", f"{widget['wall_s']:.2f}",
                     f"{widget['stall_fit_ms']:.0f}", f"{widget['stall_end_ms']:.0f}", f"{widget['first_end_ms']:.0f}",
                     f"{api['psnr']:.2f} / {widget['psnr']:.2f}"])
        print(f"napari repeat {repeat + 1}: fit {api['fit_s']:.2f} s (API) / {widget['fit_s']:.2f} s (widget)",
              flush=True)
    speed = {"title": f"napari: the Fuse burst widget against the same fit from Python, 9 x 256x256 RGB, "
                      f"{steps} steps, fast preset, CPU",
             "header": ["run", "API fit s", "API threads", "widget fit s", "widget threads", "widget / API",
                        "API wall s (fuse + add layers)", "widget wall s (click -> layers)",
                        "longest GUI stall during the fit, ms", "longest GUI stall at the end, ms",
                        "same, at the end of the session's first run (20 steps, all layers new), ms",
                        "PSNR API / widget, dB"],
             "rows": rows,
             "notes": [f"median widget / API fit time {statistics.median(ratios):.2f} (worst "
                       f"{max(ratios):.2f}); wall {statistics.median(walls):.2f} (the widget's wall includes "
                       "rendering every result layer in the worker and adding them; the API's includes "
                       "add_result_to_viewer, which renders them in the GUI thread)",
                       "each side in a fresh process after a 20-step warm-up fit; stalls from a 10 ms Qt timer in another "
                       "re-run than the timed one"]}
    first = run_child("first_click", 20)
    cancel = run_child("cancel", steps)
    console = run_child("console", steps)
    other = {"title": "napari: first click, cancel and the console call (same burst)",
             "header": ["measure", "seconds"],
             "rows": [["first Run click (GUI thread busy, after 3 s with the widget open)",
                       f"{first['first_click_s']:.3f}"],
                      ["cancel pressed during the feature start -> run ended", f"{cancel['cancel_start_s']:.3f}"],
                      ["cancel pressed at step 50 of the fit -> run ended", f"{cancel['cancel_fit_s']:.3f}"],
                      ["napari_nir.run_in_viewer returns (GUI thread busy)", f"{console['returns_s']:.3f}"],
                      [f"run_in_viewer: start -> layers in place ({steps} steps)", f"{console['wall_s']:.2f}"]],
             "notes": ["before this round: the first click froze napari for about 1 s (torch._dynamo imported by "
                       "the memory check's meta-device networks, now imported by the widget's warm-up), and a "
                       "cancel during the start waited for the whole start"]}
    return [speed, other]
