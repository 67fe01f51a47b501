"""Fits that share a process: two fits in two threads give what each gives alone, and leave torch's process-wide
state (the deterministic flag, the global generator) as it was. Thread count: recorded and re-used."""
from __future__ import annotations

import platform
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import napari_nir as nir
from napari_nir.core.provenance import rerun


def _burst(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((2, 24, 24)).astype(np.float32)


def _fit(burst, seed):
    return nir.fuse(burst, "homography", steps=5, device="cpu", seed=seed, init="identity", preview_every=0)


def _overlapping_pairs(pairs: int) -> list[str]:
    """Run ``pairs`` pairs of fits started at once in two threads; the fits (by name) that differ from solo."""
    bursts = [_burst(0), _burst(1)]
    solo = [_fit(bursts[k], seed=k).frames() for k in range(2)]
    differ = []
    for pair in range(pairs):
        barrier = threading.Barrier(2)
        out: list = [None, None]

        def run(k, barrier=barrier, out=out):
            barrier.wait()
            out[k] = _fit(bursts[k], seed=k).frames()

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        differ += [f"pair {pair} fit {k}" for k in range(2) if not np.array_equal(out[k], solo[k])]
    return differ


def test_overlapping_fits_in_two_threads_match_their_solo_runs():
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    generator = torch.random.get_rng_state()
    assert _overlapping_pairs(4) == []
    assert (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled()) == deterministic
    assert torch.equal(torch.random.get_rng_state(), generator)  # model construction forks the global generator


@pytest.mark.slow
def test_twenty_overlapping_pairs_match_their_solo_runs():  # the target, 20 pairs
    assert _overlapping_pairs(20) == []


def test_a_fit_leaves_the_deterministic_flag_as_the_caller_set_it():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        _fit(_burst(0), seed=0)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_thread_count_is_recorded_and_a_rerun_uses_it():
    burst = _burst(2)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fit = _fit(burst, seed=3)
        assert fit.provenance()["parameters"]["threads"] == 1
        torch.set_num_threads(2)
        again = rerun(burst, fit.provenance())  # runs with the recorded single thread, then restores 2
        assert again.config.runtime.threads == 1
        assert torch.get_num_threads() == 2
        assert np.array_equal(again.frames(), fit.frames())
    finally:
        torch.set_num_threads(previous)


def test_first_fit_settings_import_no_compiler_and_steady_the_heap():
    """The memory check (meta-device networks) and the CPU fit settings must not import torch._dynamo or
    torch._inductor (about a second each on a process's first fit); glibc's heap thresholds are set once."""
    code = (
        "import sys, numpy as np, torch\n"
        "from napari_nir.core.api import FusionJob\n"
        "from napari_nir.core.train import cpu_fit_settings, steady_heap\n"
        "job = FusionJob(np.random.default_rng(0).random((3, 32, 32)), 'homography')\n"
        "with cpu_fit_settings(torch.device('cpu')):\n"
        "    assert torch.are_deterministic_algorithms_enabled()\n"
        "assert not torch.are_deterministic_algorithms_enabled()\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules), steady_heap())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    imported, heap = out.stdout.strip().rsplit(" ", 1)
    assert imported == "[]", out.stdout
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert heap == str(glibc), out.stdout
