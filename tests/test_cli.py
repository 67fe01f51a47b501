"""The napari-nir command: plumbing in-process with a fake fit, and end to end in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

import napari_nir
from napari_nir import cli, io

SRC = Path(__file__).resolve().parents[1] / "src"
FUSE_OUTPUTS = {"canonical.tif", "frames.tif", "homographies.json", "side_by_side.png", "provenance.json"}


class FakeFit:
    """Stands in for a FusionResult: the contract of DESIGN.md section 4, nothing more."""

    def __init__(self, burst, motion):
        self.burst = np.asarray(burst)
        self.motion = motion
        self.history = [{"step": 1, "seconds": 0.1, "loss": 0.5, "psnr": 10.0},
                        {"step": 2, "seconds": 0.2, "loss": 0.25, "psnr": 12.0}]
        self.canonical_calls = []

    @property
    def homographies(self):
        if self.motion != "homography":
            return None
        h = np.repeat(np.eye(3)[None], len(self.burst), axis=0)
        h[:, 0, 2] = np.arange(len(self.burst))
        return h

    def frames(self):
        return self.burst.copy()

    def canonical(self, extent="union", scale=1.0):
        self.canonical_calls.append((extent, scale))
        first = self.burst[0]
        return np.repeat(np.repeat(first, int(scale), axis=0), int(scale), axis=1)

    def flow(self):
        return np.zeros(self.burst.shape[:3] + (2,), np.float32)

    def provenance(self):
        return {"software": "napari-nir", "version": napari_nir.__version__, "parameters": {"motion": self.motion},
                "seed": 0, "final_psnr_db": 12.0, "seconds": 0.2}


@pytest.fixture
def fake_fuse(monkeypatch):
    """Replace napari_nir.fuse; records each call's arguments; ``calls[-1]["fit"]`` is the returned FakeFit."""
    calls = []

    def fuse(burst, motion="homography", *, preset="fast", steps=None, device="auto", seed=0, callback=None):
        call = {"burst": burst, "motion": motion, "preset": preset, "steps": steps, "device": device, "seed": seed}
        calls.append(call)
        for step in (1, 2):
            if callback is not None:
                callback(SimpleNamespace(step=step, total=2, loss=0.5 / step, psnr=10.0 + step, seconds=0.1 * step))
        call["fit"] = FakeFit(burst, motion)
        return call["fit"]

    monkeypatch.setattr(napari_nir, "fuse", fuse)
    return calls


@pytest.fixture
def burst_tif(tmp_path):
    burst = np.random.default_rng(0).integers(0, 255, (3, 16, 20, 3), dtype=np.uint8)
    path = tmp_path / "burst.tif"
    tifffile.imwrite(path, burst, photometric="rgb")
    return path, burst


def test_fuse_writes_every_output_with_provenance(tmp_path, burst_tif, fake_fuse, capsys):
    path, burst = burst_tif
    out = tmp_path / "out"
    code = cli.main(["fuse", str(path), "-o", str(out), "--steps", "7", "--seed", "3", "--device", "cpu",
                     "--preset", "paper", "--quiet"])
    assert code == 0
    call = fake_fuse[-1]
    assert (call["motion"], call["preset"], call["steps"], call["device"], call["seed"]) == (
        "homography", "paper", 7, "cpu", 3)
    np.testing.assert_array_equal(call["burst"], burst)
    assert set(os.listdir(out)) == FUSE_OUTPUTS  # nothing else: no staging folder, no temporary files

    canonical, meta = io.read_tiff(out / "canonical.tif")
    np.testing.assert_array_equal(canonical, burst[0])
    assert meta["output"] == "canonical" and meta["software"] == "napari-nir" and meta["extent"] == "union"
    frames, meta = io.read_tiff(out / "frames.tif")
    np.testing.assert_array_equal(frames, burst)
    assert meta["output"] == "frames" and meta["final_psnr_db"] == 12.0

    homs = json.loads((out / "homographies.json").read_text())
    assert "(col, row, 1)" in homs["convention"]
    np.testing.assert_allclose(homs["homographies"], call["fit"].homographies)

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["version"] == napari_nir.__version__ and prov["source"] == str(path)
    assert prov["command"][:2] == ["napari-nir", "fuse"] and prov["history"] == call["fit"].history
    assert set(prov["outputs"]) == FUSE_OUTPUTS

    png = iio.imread(out / "side_by_side.png")
    assert png.shape == (16, 20 + 4 + 20, 3)
    stdout = capsys.readouterr().out
    assert str(out / "canonical.tif") in stdout and "12.00 dB" in stdout


def test_progress_bar_shows_loss_and_psnr(tmp_path, burst_tif, fake_fuse, capsys):
    path, _ = burst_tif
    assert cli.main(["fuse", str(path), "-o", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "loss=" in err and "psnr=12.00 dB" in err
    assert cli.main(["fuse", str(path), "-o", str(tmp_path / "q"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_flow_motion_writes_flow_not_homographies(tmp_path, burst_tif, fake_fuse):
    path, burst = burst_tif
    out = tmp_path / "out"
    assert cli.main(["fuse", str(path), "-o", str(out), "--motion", "flow", "--quiet"]) == 0
    assert set(os.listdir(out)) == FUSE_OUTPUTS - {"homographies.json"} | {"flow.tif", "flow.png"}
    flow, meta = io.read_tiff(out / "flow.tif")
    assert flow.shape == burst.shape[:3] + (2,) and flow.dtype == np.float32 and meta["output"] == "flow"


def test_extent_and_scale_reach_the_canonical_view(tmp_path, burst_tif, fake_fuse):
    path, _ = burst_tif
    out = tmp_path / "out"
    assert cli.main(["fuse", str(path), "-o", str(out), "--extent", "first", "--scale", "2", "--quiet"]) == 0
    assert fake_fuse[-1]["fit"].canonical_calls == [("first", 2.0)]
    canonical, meta = io.read_tiff(out / "canonical.tif")
    assert canonical.shape == (32, 40, 3) and meta["scale"] == 2.0 and meta["extent"] == "first"


def test_errors_are_one_line_exit_2_and_write_nothing(tmp_path, burst_tif, monkeypatch, capsys):
    path, _ = burst_tif

    def bad_fuse(*args, **kwargs):
        raise ValueError("burst is constant\n  there is nothing to fuse")

    monkeypatch.setattr(napari_nir, "fuse", bad_fuse)
    out = tmp_path / "out"
    assert cli.main(["fuse", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "napari-nir: error: burst is constant there is nothing to fuse\n"
    assert not out.exists()

    assert cli.main(["fuse", str(tmp_path / "missing.tif"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.tif" in err and not out.exists()

    assert cli.main(["fuse", str(path), "-o", str(path)]) == 2  # -o is a file
    assert "is a file" in capsys.readouterr().err


def test_keyboard_interrupt_cancels_without_outputs(tmp_path, burst_tif, monkeypatch, fake_fuse, capsys):
    path, _ = burst_tif
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(napari_nir, "fuse", interrupted)
        assert cli.main(["fuse", str(path), "-o", str(out)]) == 130
    assert capsys.readouterr().err.strip() == "napari-nir: cancelled"
    assert not out.exists()

    # Ctrl-C while the outputs are being written: none of them appears
    def png_interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "write_png", png_interrupted)
    assert cli.main(["fuse", str(path), "-o", str(out), "--quiet"]) == 130
    assert os.listdir(out) == []


def test_unexpected_errors_propagate(tmp_path, burst_tif, monkeypatch):
    path, _ = burst_tif

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(napari_nir, "fuse", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["fuse", str(path), "-o", str(tmp_path / "out")])


def test_existing_outputs_refused_before_fitting(tmp_path, burst_tif, fake_fuse, capsys):
    path, _ = burst_tif
    out = tmp_path / "out"
    out.mkdir()
    (out / "canonical.tif").write_bytes(b"precious")
    assert cli.main(["fuse", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "canonical.tif" in err and "--overwrite" in err
    assert fake_fuse == [] and os.listdir(out) == ["canonical.tif"]
    assert (out / "canonical.tif").read_bytes() == b"precious"
    assert cli.main(["fuse", str(path), "-o", str(out), "--overwrite", "--quiet"]) == 0
    assert set(os.listdir(out)) == FUSE_OUTPUTS and io.read_tiff(out / "canonical.tif")[1]["output"] == "canonical"


def test_demo_with_fake_fit(tmp_path, monkeypatch, fake_fuse, capsys):
    from napari_nir import _sample_data

    truth = np.repeat(np.eye(3)[None], 3, axis=0)
    truth[:, 0, 2] = np.arange(3)  # what FakeFit returns: the fit is "perfect"
    sample = SimpleNamespace(frames=np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32),
                             clean=None, homographies=truth)
    monkeypatch.setattr(_sample_data, "homography_burst", lambda *a, **k: sample)
    out = tmp_path / "demo"
    assert cli.main(["demo", "-o", str(out), "--steps", "5", "--quiet"]) == 0
    assert set(os.listdir(out)) == FUSE_OUTPUTS | {"input.tif"}
    assert fake_fuse[-1]["steps"] == 5 and fake_fuse[-1]["motion"] == "homography"
    frames, meta = io.read_tiff(out / "input.tif")
    np.testing.assert_array_equal(frames, sample.frames)
    assert meta["output"] == "input"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["ground_truth"]["mean_corner_error_px"] == 0
    assert set(prov["outputs"]) == FUSE_OUTPUTS | {"input.tif"}
    stdout = capsys.readouterr().out
    assert "0.000 px" in stdout and str(out) in stdout
    assert cli.main(["demo", "-o", str(out)]) == 2  # existing outputs


def test_help_lists_choices(capsys):
    assert cli.main(["fuse", "--help"]) == 0
    text = capsys.readouterr().out
    for name in cli.MOTIONS + cli.PRESETS:
        assert name in text
    assert cli.main(["demo", "--help"]) == 0
    assert "nir-demo" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert napari_nir.__version__ in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["fuse", "x.tif", "-o", "o", "--steps", "0"]) == 2
    assert cli.main(["fuse", "x.tif", "-o", "o", "--motion", "warp"]) == 2


# -- subprocess: the real command -------------------------------------------------------------------

def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "napari_nir", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def test_subprocess_fuse_end_to_end(tmp_path):
    """The real fit (needs napari_nir.fuse): 20 steps on a tiny burst."""
    from napari_nir._sample_data import homography_burst

    sample = homography_burst(3, (32, 32), seed=1, translation=0.04, rotation_deg=2, scale=0.02, perspective=0.01)
    tif = tmp_path / "burst.tif"
    tifffile.imwrite(tif, (sample.frames * 65535).round().astype(np.uint16), photometric="rgb")
    out = tmp_path / "out"
    result = _run("fuse", tif, "-o", out, "--steps", "20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert set(os.listdir(out)) == FUSE_OUTPUTS
    canonical, meta = io.read_tiff(out / "canonical.tif")
    assert canonical.dtype == np.uint16 and canonical.ndim == 3 and canonical.shape[2] == 3
    assert meta["output"] == "canonical" and meta["parameters"]["steps"] == 20
    frames, _ = io.read_tiff(out / "frames.tif")
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint16
    homs = np.array(json.loads((out / "homographies.json").read_text())["homographies"])
    assert homs.shape == (3, 3, 3)
    assert "20/20" in result.stderr  # the progress bar ran to the end


def test_subprocess_bad_inputs_exit_2_with_one_line(tmp_path):
    result = _run("fuse", tmp_path / "missing.tif", "-o", tmp_path / "o1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("napari-nir: error: ") and result.stderr.count("\n") == 1
    assert "missing.tif" in result.stderr

    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((16, 16), np.uint8))
    result = _run("fuse", flat, "-o", tmp_path / "o2", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "single 2-D image" in result.stderr and not (tmp_path / "o2").exists()

    out = tmp_path / "o3"
    out.mkdir()
    (out / "frames.tif").write_bytes(b"keep me")
    result = _run("fuse", flat, "-o", out, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--overwrite" in result.stderr
    assert (out / "frames.tif").read_bytes() == b"keep me"


def test_separate_and_flow_outputs(tmp_path):
    """`separate` writes every layer of the task table's entry; `fuse --motion flow` writes flow.tif and flow.png."""
    from napari_nir import cli, io
    from napari_nir._sample_data import flow_burst, separation_burst

    src = tmp_path / "rain.tif"
    io.write_tiff(src, separation_burst("rain", 2, (24, 24)).frames, {})
    out = tmp_path / "sep"
    assert cli.main(["separate", str(src), "--task", "rain", "-o", str(out), "--steps", "3", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["scene.tif", "interference.tif", "alpha.tif", "canonical.tif", "side_by_side.png", "provenance.json"])
    alpha, meta = io.read_tiff(out / "alpha.tif")
    assert alpha.shape == (2, 24, 24) and meta["output"] == "alpha" and meta["parameters"]["task"] == "rain"
    src2 = tmp_path / "flow.tif"
    io.write_tiff(src2, flow_burst(2, (24, 24)).frames, {})
    out2 = tmp_path / "flow"
    assert cli.main(["fuse", str(src2), "-o", str(out2), "--motion", "flow", "--steps", "3", "--quiet"]) == 0
    flow, meta = io.read_tiff(out2 / "flow.tif")
    assert flow.shape == (2, 24, 24, 2) and (out2 / "flow.png").stat().st_size > 0
    out3 = tmp_path / "occlusion"
    assert cli.main(["fuse", str(src2), "-o", str(out3), "--motion", "occlusion", "--steps", "3", "--quiet"]) == 0
    w, meta = io.read_tiff(out3 / "occlusion_w.tif")
    assert w.shape == (2, 24, 24) and meta["output"] == "occlusion_w" and np.all(np.abs(w) <= 1)
    assert cli.main(["separate", str(src), "--task", "snow", "-o", str(out)]) == 2


def test_separate_reflection_writes_the_rigid_layers_alignment(tmp_path):
    """A reflection that moves rigidly gets its own homographies, written as interference_homographies.json."""
    import json

    from napari_nir import cli, io
    from napari_nir._sample_data import separation_burst

    src = tmp_path / "reflection.tif"
    io.write_tiff(src, separation_burst("reflection", 3, (96, 96), seed=0).frames, {})
    out = tmp_path / "sep"
    assert cli.main(["separate", str(src), "--task", "reflection", "-o", str(out), "--steps", "200", "--quiet"]) == 0
    record = json.loads((out / "interference_homographies.json").read_text())
    assert record["found"] and record["score"] >= 10  # measured 11.6
    assert np.asarray(record["homographies"]).shape == (3, 3, 3)
    assert json.loads((out / "provenance.json").read_text())["rigid_layer"] == {k: record[k] for k in ("found", "score")}
    reflection, meta = io.read_tiff(out / "interference_canonical.tif")
    assert reflection.shape == (96, 96, 3) and meta["output"] == "interference canonical"
