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
from napari_nir.core.config import FitConfig, options, parse_value
from napari_nir.core.presets import preset_config, separation_config
from napari_nir.core.result import ARTEFACTS, Artefact, artefact_files

SRC = Path(__file__).resolve().parents[1] / "src"
TRANSFORM_FILES = {"homographies.json", "transforms.json", "transforms.npy", "transforms_pystackreg.npy"}
FUSE_OUTPUTS = {"canonical.tif", "frames.tif", "registered.tif", "side_by_side.png", "provenance.json",
                "diagnostics.json", "residual.tif", *TRANSFORM_FILES}
CLI_FILES = {"side_by_side.png", "provenance.json"}


class FakeFit:
    """Stands in for a FusionResult / SeparationResult: its public contract (config, history, provenance,
    homographies and the artefact list built from the real ``ARTEFACTS`` specs), with made-up data."""

    def __init__(self, burst, config, *, rigid=False):
        self.burst = np.asarray(burst)
        self.config = config
        self.motion = config.motion.model
        self.rigid = rigid  # a separation's interference has a rigid layer
        self.source_axes = "TYX" if self.burst.ndim == 3 else "TYXC"
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

    def canonical(self, extent="union", scale=1.0):
        self.canonical_calls.append((extent, scale))
        first = self.burst[0]
        return np.repeat(np.repeat(first, int(scale), axis=0), int(scale), axis=1)

    def _data(self, role, extent, scale):
        """(data, extra metadata) of one artefact, or None (this result has none)."""
        t, h, w = self.burst.shape[:3]
        if role == "canonical":
            view = self.canonical(extent, scale)
            return view, {"extent": extent, "scale": scale, "shape": list(view.shape)}
        if role in ("frames", "scene"):
            return self.burst.copy(), {}
        if role == "interference":
            return np.zeros_like(self.burst), {}
        if role in ("alpha", "flow magnitude", "occlusion w"):
            return np.zeros((t, h, w), np.float32), {}
        if role == "homographies":
            return {"convention": "(col, row, 1) fake", "canonical": {"file": "canonical.tif", "extent": extent,
                                                                       "scale": scale},
                    "homographies": self.homographies.tolist()}, {}
        if role == "interference homographies":
            return {"convention": "fake", "found": self.rigid, "score": 12.0 if self.rigid else 1.0,
                    "homographies": self.homographies.tolist() if self.rigid else None}, {}
        if role == "interference canonical":
            return (self.burst[0].copy(), {}) if self.rigid else None
        if role == "outlines":
            return np.zeros((t, 4, 2)), {}
        if role == "registered":
            return self.burst.copy(), {"axes": "TYX" if self.burst.ndim == 3 else "TYXC"}
        if role == "transforms":
            return {"convention": "fake", "napari-nir": self.homographies.tolist()}, {}
        if role in ("transforms array", "pystackreg transforms"):
            return self.homographies, {}
        if role == "flow":
            return np.zeros((t, h, w, 2), np.float32), {}
        if role == "flow colour":
            return np.zeros((t, h, w, 3), np.uint8), {}
        if role == "flow vectors":
            return np.zeros((4, 2, 3), np.float32), {"step": 4}
        if role == "diagnostics":
            return {"verdict": "ok", "reasons": [], "frames": []}, {}
        if role == "residual":
            return np.zeros((t, h, w), np.float32), {"verdict": "ok", "input_pixels_per_pixel": 1.0}
        raise KeyError(f"FakeFit has no data for the artefact {role!r}")

    def diagnostics(self):
        return SimpleNamespace(verdict="ok", reasons=[])

    def artefacts(self, extent="union", scale=1.0, roles=None):
        out = []
        for spec in ARTEFACTS.values():
            if (roles is not None and spec.role not in roles) or not spec.applies(self.config):
                continue
            made = self._data(spec.role, extent, scale)
            if made is None:
                continue
            data, extra = made
            channels = (spec.axes.endswith("[C]") and self.burst.ndim == 4) or spec.axes.endswith("2")
            out.append(Artefact(spec, data, channels, {"convention": spec.description, **extra}, spec.visible))
        return out

    def provenance(self):
        prov = {"software": "napari-nir", "version": napari_nir.__version__, "task": "fuse",
                "parameters": self.config.to_dict(), "seed": self.config.seed, "final_psnr_db": 12.0,
                "seconds": 0.2}
        if self.config.task:
            prov["task"] = f"separate:{self.config.task}"
        return prov


def _progress(callback):
    for step in (1, 2):
        if callback is not None:
            callback(SimpleNamespace(step=step, total=2, loss=0.5 / step, psnr=10.0 + step, seconds=0.1 * step,
                                     stage="fit"))


@pytest.fixture
def fake_fuse(monkeypatch):
    """Replace napari_nir.fuse; records each call's arguments; ``calls[-1]["fit"]`` is the returned FakeFit."""
    calls = []

    def fuse(burst, motion="homography", *, preset="fast", steps=None, device="auto", seed=0, callback=None,
             **options):
        call = {"burst": burst, "motion": motion, "preset": preset, "steps": steps, "device": device, "seed": seed,
                "options": options}
        calls.append(call)
        _progress(callback)
        config = preset_config(motion, preset, steps=steps, seed=seed, device=device, **options)
        call["fit"] = FakeFit(burst, config)
        return call["fit"]

    monkeypatch.setattr(napari_nir, "fuse", fuse)
    return calls


@pytest.fixture
def fake_separate(monkeypatch):
    """Replace napari_nir.separate like ``fake_fuse``; ``calls.rigid = True`` makes results with a rigid layer."""
    calls = SimpleNamespace(list=[], rigid=False)

    def separate(burst, task="reflection", *, motion=None, preset="fast", steps=None, device="auto", seed=0,
                 callback=None, **options):
        call = {"burst": burst, "task": task, "motion": motion, "preset": preset, "steps": steps, "device": device,
                "seed": seed, "options": options}
        calls.list.append(call)
        _progress(callback)
        config = separation_config(task, preset, motion, steps=steps, seed=seed, device=device, **options)
        call["fit"] = FakeFit(burst, config, rigid=calls.rigid)
        return call["fit"]

    monkeypatch.setattr(napari_nir, "separate", separate)
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
    assert meta["convention"] == ARTEFACTS["canonical"].description
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
    assert FUSE_OUTPUTS == set(artefact_files(preset_config("homography", "paper"))) | CLI_FILES

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
    assert set(os.listdir(out)) == FUSE_OUTPUTS - TRANSFORM_FILES | {"flow.tif", "flow.png"}
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


def _config_of(out: Path) -> FitConfig:
    return FitConfig.from_dict(json.loads((out / "provenance.json").read_text())["parameters"])


def test_separate_and_flow_outputs(tmp_path):
    """The files written are the artefact list's (``artefact_files`` of the run's config) plus the CLI's own:
    `separate` writes every layer of the task table's entry and the scene's fusion and alignment; `fuse --motion
    flow` writes flow.tif and flow.png, occlusion also occlusion_w.tif."""
    from napari_nir._sample_data import flow_burst, separation_burst

    src = tmp_path / "rain.tif"
    io.write_tiff(src, separation_burst("rain", 2, (24, 24)).frames, {})
    out = tmp_path / "sep"
    assert cli.main(["separate", str(src), "--task", "rain", "-o", str(out), "--steps", "3", "--quiet"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == set(artefact_files(separation_config("rain", "fast", steps=3))) | CLI_FILES
    assert names == set(artefact_files(_config_of(out))) | CLI_FILES
    assert {"scene.tif", "interference.tif", "alpha.tif", "canonical.tif", "frames.tif", "homographies.json"} <= names
    alpha, meta = io.read_tiff(out / "alpha.tif")
    assert alpha.shape == (2, 24, 24) and meta["output"] == "alpha" and meta["parameters"]["task"] == "rain"
    assert meta["convention"] == ARTEFACTS["alpha"].description
    found = json.loads((out / "diagnostics.json").read_text())  # the separation's own verdict and checks
    assert found["verdict"] in ("ok", "doubtful") and "interference_share" in found["checks"]
    residual, _ = io.read_tiff(out / "residual.tif")
    assert residual.shape == (2, 24, 24)  # (T, H, W) at full size
    src2 = tmp_path / "flow.tif"
    io.write_tiff(src2, flow_burst(2, (24, 24)).frames, {})
    out2 = tmp_path / "flow"
    assert cli.main(["fuse", str(src2), "-o", str(out2), "--motion", "flow", "--steps", "3", "--quiet"]) == 0
    assert {p.name for p in out2.iterdir()} == set(artefact_files(preset_config("flow", "fast"))) | CLI_FILES
    flow, meta = io.read_tiff(out2 / "flow.tif")
    assert flow.shape == (2, 24, 24, 2) and (out2 / "flow.png").stat().st_size > 0
    assert meta["output"] == "flow" and meta["convention"] == ARTEFACTS["flow"].description
    out3 = tmp_path / "occlusion"
    assert cli.main(["fuse", str(src2), "-o", str(out3), "--motion", "occlusion", "--steps", "3", "--quiet"]) == 0
    assert {p.name for p in out3.iterdir()} == set(artefact_files(preset_config("occlusion", "fast"))) | CLI_FILES
    w, meta = io.read_tiff(out3 / "occlusion_w.tif")
    assert w.shape == (2, 24, 24) and meta["output"] == "occlusion w" and np.all(np.abs(w) <= 1)
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
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["rigid_layer"] == {k: record[k] for k in ("found", "score")}
    reflection, meta = io.read_tiff(out / "interference_canonical.tif")
    assert reflection.shape == (96, 96, 3) and meta["output"] == "interference canonical"


# -- --set, options, --from-provenance ----------------------------------------------------------------------

def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("napari-nir: error: "), err
    return err


def test_set_reaches_the_fit_provenance_and_command(tmp_path, burst_tif, fake_fuse):
    path, _ = burst_tif
    out = tmp_path / "out"
    assert cli.main(["fuse", str(path), "-o", str(out), "--quiet", "--set", "batch=4096", "--set",
                     "optimiser.loss=mse", "--set", "value_range=-1,1", "--set", "exposure=false"]) == 0
    call = fake_fuse[-1]
    assert call["options"] == {"batch": 4096, "loss": "mse", "value_range": (-1.0, 1.0), "exposure": False}
    prov = json.loads((out / "provenance.json").read_text())
    params = prov["parameters"]
    assert (params["batch"], params["loss"], params["value_range"], params["exposure"]) == (4096, "mse", [-1, 1],
                                                                                             False)
    assert io.read_tiff(out / "canonical.tif")[1]["parameters"]["batch"] == 4096
    command = prov["command"]
    for text in ("batch=4096", "loss=mse", "value_range=-1.0,1.0", "exposure=false"):
        assert command[command.index(text) - 1] == "--set"
    # the recorded command repeats the run: the same configuration
    again = command[1:]
    again[again.index("-o") + 1] = str(tmp_path / "again")
    assert cli.main([*again, "--quiet"]) == 0
    assert fake_fuse[-1]["fit"].config == call["fit"].config


def test_set_errors_are_one_line_and_fit_nothing(tmp_path, burst_tif, fake_fuse, capsys):
    path, _ = burst_tif
    out = tmp_path / "out"
    base = ["fuse", str(path), "-o", str(out)]
    assert cli.main([*base, "--set", "batchsize=3"]) == 2
    err = _err_line(capsys)
    assert "batchsize" in err and "napari-nir options" in err and "batch" in err.split("did you mean")[1]
    assert cli.main([*base, "--set", "batch"]) == 2
    assert "KEY=VALUE" in _err_line(capsys)
    assert cli.main([*base, "--set", "batch=lots"]) == 2
    assert "batch" in _err_line(capsys)
    assert cli.main([*base, "--set", "steps=0"]) == 2  # parsed, then refused by the config's bounds
    assert "steps" in _err_line(capsys)
    assert cli.main([*base, "--set", "loss=l3"]) == 2
    assert "'l1' or 'mse'" in _err_line(capsys)
    assert cli.main([*base, "--set", "task=rain"]) == 2
    assert "separate" in _err_line(capsys)
    assert cli.main([*base, "--steps", "5", "--set", "steps=6"]) == 2
    assert "disagree" in _err_line(capsys)
    assert fake_fuse == [] and not out.exists()
    assert cli.main([*base, "--steps", "5", "--set", "steps=5", "--quiet"]) == 0  # the same value twice is fine


def test_options_lists_every_option(capsys):
    assert cli.main(["options"]) == 0
    text = capsys.readouterr().out
    for flat, opt in options().items():
        assert f"  {flat} ({opt.path}): " in text and opt.doc in text
    assert "l1 | mse" in text and "default 400" in text


def _configs():
    from napari_nir.core.motions import MOTIONS
    from napari_nir.core.tasks import TASKS

    for preset in ("fast", "paper"):
        for motion in MOTIONS:
            yield preset_config(motion, preset)
        for task in TASKS:
            yield separation_config(task, preset)


def test_recorded_values_read_back_through_set():
    """Every option value of every preset, motion and task, written as --set text, parses back to itself."""
    for config in _configs():
        for flat in options():
            value = config.get(flat)
            back = parse_value(flat, cli.format_value(value))
            assert back == value or (isinstance(value, tuple) and tuple(back) == value), (flat, value, back)


def test_from_provenance_repeats_the_recorded_run(tmp_path, burst_tif, fake_fuse, capsys):
    path, _ = burst_tif
    out = tmp_path / "out"
    assert cli.main(["fuse", str(path), "-o", str(out), "--quiet", "--steps", "7", "--seed", "3", "--motion", "flow",
                     "--extent", "first", "--scale", "2", "--device", "cpu", "--set", "batch=4096"]) == 0
    first = fake_fuse[-1]
    for record in ("provenance.json", "flow.tif"):  # the JSON record, or the one in any of its TIFFs
        again = tmp_path / f"again-{record}"
        assert cli.main(["fuse", str(path), "-o", str(again), "--quiet", "--from-provenance",
                         str(out / record)]) == 0
        call = fake_fuse[-1]
        assert call["fit"].config == first["fit"].config
        assert (call["motion"], call["steps"], call["seed"], call["device"]) == ("flow", 7, 3, "cpu")
        assert set(os.listdir(again)) == set(os.listdir(out))
        prov = json.loads((again / "provenance.json").read_text())
        assert prov["from_provenance"] == str(out / record)
        if record == "provenance.json":
            assert call["fit"].canonical_calls == [("first", 2.0)]  # the recorded view
    # flags and --set replace single values
    assert cli.main(["fuse", str(path), "-o", str(tmp_path / "o3"), "--quiet", "--from-provenance",
                     str(out / "provenance.json"), "--steps", "9", "--set", "loss=mse", "--scale", "1"]) == 0
    call = fake_fuse[-1]
    changed = {k for k, v in call["fit"].config.to_dict().items() if v != first["fit"].config.to_dict()[k]}
    assert changed == {"steps", "loss"} and call["fit"].canonical_calls == [("first", 1.0)]

    n = len(fake_fuse)
    assert cli.main(["fuse", str(path), "-o", str(tmp_path / "o4"), "--from-provenance",
                     str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in _err_line(capsys)
    (tmp_path / "other.json").write_text('{"hello": 1}')
    assert cli.main(["fuse", str(path), "-o", str(tmp_path / "o4"), "--from-provenance",
                     str(tmp_path / "other.json")]) == 2
    assert "provenance record" in _err_line(capsys)
    assert cli.main(["separate", str(path), "-o", str(tmp_path / "o4"), "--from-provenance",
                     str(out / "provenance.json")]) == 2
    assert "records a fusion" in _err_line(capsys)
    assert len(fake_fuse) == n and not (tmp_path / "o4").exists()


def test_separate_files_are_the_artefact_list(tmp_path, burst_tif, fake_separate, capsys):
    """Reflection: interference_canonical.tif where the result has a rigid layer; a later run without one
    removes a stale one (with --overwrite); --from-provenance repeats a separation, task included."""
    path, _ = burst_tif
    out = tmp_path / "sep"
    fake_separate.rigid = True
    assert cli.main(["separate", str(path), "--task", "reflection", "-o", str(out), "--quiet"]) == 0
    config = fake_separate.list[-1]["fit"].config
    assert config.get("interference_motion") == "auto" and config.task == "reflection"
    expected = set(artefact_files(config)) | CLI_FILES
    assert set(os.listdir(out)) == expected and "interference_canonical.tif" in expected
    assert io.read_tiff(out / "interference_canonical.tif")[1]["output"] == "interference canonical"
    png = iio.imread(out / "side_by_side.png")
    assert png.shape[1] == 3 * 20 + 2 * 4  # input, scene, interference
    command = json.loads((out / "provenance.json").read_text())["command"][1:]
    command[command.index("-o") + 1] = str(tmp_path / "repeat")
    assert cli.main([*command, "--quiet"]) == 0 and fake_separate.list[-1]["fit"].config == config

    fake_separate.rigid = False
    assert cli.main(["separate", str(path), "--task", "reflection", "-o", str(out), "--quiet"]) == 2
    assert "--overwrite" in _err_line(capsys)
    assert cli.main(["separate", str(path), "--task", "reflection", "-o", str(out), "--quiet", "--overwrite"]) == 0
    assert set(os.listdir(out)) == expected - {"interference_canonical.tif"}  # the stale one is gone
    assert json.loads((out / "interference_homographies.json").read_text())["found"] is False

    again = tmp_path / "again"
    assert cli.main(["separate", str(path), "-o", str(again), "--quiet", "--from-provenance",
                     str(out / "provenance.json"), "--set", "sparsity=0.5"]) == 0
    call = fake_separate.list[-1]
    assert call["task"] == "reflection" and call["fit"].config == config.replace(sparsity=0.5)
    assert cli.main(["fuse", str(path), "-o", str(tmp_path / "x"), "--from-provenance",
                     str(out / "provenance.json")]) == 2
    assert "records a separation" in _err_line(capsys)
    assert cli.main(["separate", str(path), "-o", str(tmp_path / "x")]) == 2
    assert "--task" in _err_line(capsys)


def test_from_provenance_reproduces_a_real_fit_bit_identically(tmp_path):
    """A real (tiny) CPU fit, then --from-provenance on the same burst: the same parameters, the same pixels."""
    from napari_nir._sample_data import homography_burst

    sample = homography_burst(3, (24, 24), seed=1)
    tif = tmp_path / "burst.tif"
    io.write_tiff(tif, sample.frames, {})
    out, again = tmp_path / "out", tmp_path / "again"
    assert cli.main(["fuse", str(tif), "-o", str(out), "--steps", "15", "--seed", "5", "--device", "cpu",
                     "--set", "batch=2048", "--quiet"]) == 0
    assert cli.main(["fuse", str(tif), "-o", str(again), "--from-provenance", str(out / "provenance.json"),
                     "--quiet"]) == 0
    first, second = (json.loads((d / "provenance.json").read_text()) for d in (out, again))
    assert first["parameters"] == second["parameters"] and second["parameters"]["batch"] == 2048
    assert second["parameters"]["steps"] == 15 and second["seed"] == 5
    assert (out / "canonical.tif").read_bytes() != b""
    a, b = io.read_tiff(out / "canonical.tif")[0], io.read_tiff(again / "canonical.tif")[0]
    assert a.dtype == b.dtype and np.array_equal(a, b)
    assert json.loads((out / "homographies.json").read_text())["homographies"] == \
        json.loads((again / "homographies.json").read_text())["homographies"]


def test_channels_first_stack_is_registered_on_one_channel_and_written_whole(tmp_path, capsys):
    """--axes TCYX --register-on 0: the fit reads channel 0, registered.tif holds every channel in the input's
    axes and dtype; the transforms it writes start a second run (pystackreg's convention, as pystackreg reads)."""
    from napari_nir._sample_data import microscopy_drift_stack

    stack = microscopy_drift_stack(5, (48, 48), max_shift_px=3.0, seed=1).frames  # (5, 2, 48, 48) uint16
    np.save(tmp_path / "stack.npy", stack)
    out = tmp_path / "out"
    code = cli.main(["fuse", str(tmp_path / "stack.npy"), "-o", str(out), "--motion", "rigid", "--axes", "TCYX",
                     "--register-on", "0", "--steps", "20", "--device", "cpu", "--quiet"])
    assert code == 0
    registered = tifffile.imread(out / "registered.tif")
    assert registered.shape == stack.shape and registered.dtype == np.uint16
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["axes"] == {"input": "TCYX", "registered_on": "channel 0"}
    assert prov["command"][prov["command"].index("--axes") + 1] == "TCYX"
    record = json.loads((out / "transforms.json").read_text())
    ours, theirs = np.load(out / "transforms.npy"), np.load(out / "transforms_pystackreg.npy")
    np.testing.assert_allclose(ours, record["napari-nir"])
    np.testing.assert_allclose(theirs @ ours, np.repeat(np.eye(3)[None], 5, 0), atol=1e-9)
    again = tmp_path / "again"
    assert cli.main(["fuse", str(tmp_path / "stack.npy"), "-o", str(again), "--motion", "rigid", "--axes", "TCYX",
                     "--steps", "1", "--device", "cpu", "--quiet", "--init-transforms",
                     str(out / "transforms_pystackreg.npy"), "--init-convention", "pystackreg"]) == 0
    started = json.loads((again / "provenance.json").read_text())["initial_transforms"]
    np.testing.assert_allclose(started, ours, atol=1e-9)
    capsys.readouterr()
    assert cli.main(["fuse", str(tmp_path / "stack.npy"), "-o", str(tmp_path / "x"), "--axes", "TCYX",
                     "--register-on", "two"]) == 2
    assert "--register-on" in capsys.readouterr().err


def test_memory_refusal_comes_from_the_file_header_before_reading(tmp_path, monkeypatch, capsys):
    """A fit that will not fit is refused from the input's header: the file is never read (before: the whole file
    was read, then the fit refused)."""
    from napari_nir import io
    from napari_nir.core import memory

    path = tmp_path / "burst.npy"
    np.save(path, np.zeros((3, 64, 64), np.uint8))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 4 * memory.MiB)
    monkeypatch.setattr(io, "read_burst", lambda p: pytest.fail("the input was read before the memory check"))
    assert cli.main(["fuse", str(path), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "refused before reading it" in err and "3 x 64 x 64 uint8" in err and len(err.strip().splitlines()) == 1


def test_a_doubtful_separation_says_so_in_its_json_and_on_the_terminal(tmp_path, capsys):
    """Frames of independent noise hold no scene: the separation cannot explain them as one, and says so."""
    src = tmp_path / "noise.tif"
    io.write_tiff(src, np.random.default_rng(0).uniform(0, 1, (3, 24, 24)).astype(np.float32), {})
    out = tmp_path / "sep"
    assert cli.main(["separate", str(src), "--task", "reflection", "-o", str(out), "--steps", "60"]) == 0
    found = json.loads((out / "diagnostics.json").read_text())
    assert found["verdict"] == "doubtful" and found["reasons"]
    assert "verdict: DOUBTFUL" in capsys.readouterr().out
