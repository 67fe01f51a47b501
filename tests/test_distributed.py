"""napari_nir.distributed and ``napari-nir batch``: many bursts on a Dask LocalCluster of 2 single-threaded
worker processes (one cluster for the module: starting one takes seconds)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import napari_nir as nir  # noqa: E402
from napari_nir import cli, io  # noqa: E402
from napari_nir import distributed as batch  # noqa: E402
from napari_nir._sample_data import homography_burst  # noqa: E402

STEPS = 25


@pytest.fixture(scope="module")
def client():
    cluster = batch.local_cluster(2)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def bursts():
    return {f"b{seed}": homography_burst(4, (48, 48), seed=seed).frames for seed in (1, 2)}


def test_batch_equals_serial_runs_resumes_and_records_failures(client, bursts, tmp_path):
    tiff = tmp_path / "b3.tif"
    io.write_tiff(tiff, homography_burst(4, (48, 48), seed=3).frames, {})
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff at all")
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / ".b1.part-0123456789ab"  # a killed batch's half-written burst
    leftover.mkdir()
    (leftover / "canonical.tif").write_bytes(b"half")
    inputs = {**bursts, "b3": tiff, "broken": broken}
    lines = []
    rows = batch.fuse_many(inputs, out, client=client, steps=STEPS, progress=lines.append)

    assert [(r["name"], r["status"]) for r in rows] == [("b1", "done"), ("b2", "done"), ("b3", "done"),
                                                        ("broken", "failed")]
    assert "not a TIFF" in rows[3]["error"] and len(lines) == 5  # the plan, then one line per burst
    assert not leftover.exists() and sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    for name, burst in bursts.items():  # bit-identical to the fit run alone with the same seed and one thread
        serial = nir.fuse(burst, steps=STEPS, threads=1)
        canonical, record = io.read_tiff(out / name / "canonical.tif")
        np.testing.assert_array_equal(canonical, serial.canonical())
        assert json.loads((out / name / "provenance.json").read_text())["parameters"]["threads"] == 1
    files = sorted(p.name for p in (out / "b3").iterdir())  # what `napari-nir fuse` writes, from a path input too
    assert files == sorted(p.name for p in (out / "b1").iterdir())
    assert {"canonical.tif", "provenance.json"} <= set(files)
    summary = json.loads((out / batch.SUMMARY_JSON).read_text())
    assert [r["status"] for r in summary["bursts"]] == ["done", "done", "done", "failed"] and not summary["pending"]
    with open(out / batch.SUMMARY_CSV, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["name"] for r in table] == ["b1", "b2", "b3", "broken"] and "not a TIFF" in table[3]["error"]

    before = (out / "b1" / "canonical.tif").stat().st_mtime_ns
    again = batch.fuse_many(inputs, out, client=client, steps=STEPS, progress=False)
    assert [r["status"] for r in again] == ["skipped", "skipped", "skipped", "failed"]  # resumed: only the failure
    assert (out / "b1" / "canonical.tif").stat().st_mtime_ns == before


def test_bad_options_are_refused_before_any_burst_runs(client, bursts, tmp_path):
    with pytest.raises(cli.CLIError, match="unknown option"):
        batch.fuse_many(bursts, tmp_path / "out", client=client, not_an_option=3)
    with pytest.raises(ValueError, match="no inputs"):
        batch.fuse_many([], tmp_path / "out", client=client)
    assert not (tmp_path / "out").exists()


def test_names_come_from_paths_and_stay_unique(tmp_path):
    folder = tmp_path / "well A1"
    folder.mkdir()
    names = [name for name, _ in batch.named_inputs([tmp_path / "x.tif", folder, tmp_path / "x.tiff",
                                                     np.zeros((2, 4, 4)), tmp_path / "plate.zarr"])]
    assert names == ["x", "well_A1", "x_2", "burst_003", "plate"]


def test_cli_batch_on_a_running_scheduler(client, bursts, tmp_path, capsys):
    paths = []
    for name, burst in bursts.items():
        np.save(tmp_path / f"{name}.npy", burst)
        paths.append(str(tmp_path / f"{name}.npy"))
    out = tmp_path / "out"
    code = cli.main(["batch", *paths, "-o", str(out), "--scheduler", client.scheduler.address, "--steps", "10",
                     "--task", "rain", "--set", "batch=2048"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "2 done, 0 skipped" in printed and (out / "b1" / "scene.tif").is_file()
    assert json.loads((out / "b2" / "provenance.json").read_text())["parameters"]["task"] == "rain"
    code = cli.main(["batch", str(tmp_path / "missing.tif"), "-o", str(out), "--scheduler",
                     client.scheduler.address])
    assert code == 1 and "1 failed" in capsys.readouterr().out
    assert cli.main(["batch", paths[0], "-o", str(out), "--workers", "2", "--scheduler", "tcp://x:1"]) == 2


@pytest.mark.slow
def test_a_killed_batch_finishes_on_the_next_start(tmp_path):
    """SIGKILL the command while it runs (no chance to clean up), start it again: every burst done, nothing
    half-written."""
    paths = []
    for seed in range(6):
        path = tmp_path / f"s{seed}.npy"
        np.save(path, homography_burst(4, (64, 64), seed=seed).frames)
        paths.append(str(path))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "napari_nir", "batch", *paths, "-o", str(out), "--workers", "2", "--steps", "150"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.is_dir() and any(p.is_dir() and not p.name.startswith(".")
                                                                for p in out.iterdir())):
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert 0 < len(finished_before) < 6
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / batch.SUMMARY_JSON).read_text())["bursts"]
    assert {r["name"] for r in rows if r["status"] == "skipped"} == finished_before
    assert all(r["status"] in ("done", "skipped") for r in rows) and len(rows) == 6
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    for row in rows:
        assert (out / row["name"] / "provenance.json").is_file()
