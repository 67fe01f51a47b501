"""The benchmark scripts still run and print their tables (tiny sizes; speed is not checked here)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    from benchmarks import fusion
    from napari_nir import _sample_data

    monkeypatch.setattr(fusion, "homography_burst",
                        lambda n, size, **kw: _sample_data.homography_burst(3, (32, 32), **kw))
    monkeypatch.setattr(fusion, "GRAF", tmp_path / "absent")
    real_fuse = fusion.nir.fuse
    monkeypatch.setattr(fusion.nir, "fuse",
                        lambda *a, **k: real_fuse(*a, **{**k, "steps": min(k.get("steps") or 30, 30)}))
    return fusion


def test_fusion_tables_are_produced(tiny, tmp_path):
    from benchmarks.__main__ import markdown

    tables = [tiny.synthetic(True, "cpu"), tiny.noisy(True, "cpu")]
    assert tiny.graf(True, "cpu") is None  # real data absent: skipped, not failed
    for table in tables:
        text = markdown(table)
        assert text.startswith("### ") and "|---|" in text
        assert all(len(row) == len(table["header"]) for row in table["rows"])


def test_scaling_floor_and_child():
    from benchmarks import scaling

    info = scaling.run_child(32, 2, 8, "cpu")
    assert info["per_step"] > 0 and info["rss_mb"] > 0 and info["params"] > 0
    flops, moved = scaling.floor(info)
    assert flops > info["batch"] and moved > info["batch"]


def test_separation_tables_are_produced(monkeypatch):
    """The separation benchmark's synthetic table on tiny bursts; real data switched off."""
    from benchmarks import separation
    from benchmarks.__main__ import markdown
    from napari_nir import _sample_data

    monkeypatch.setattr(separation, "separation_burst",
                        lambda task, n, size, **kw: _sample_data.separation_burst(task, 3, (32, 32), **kw))
    real_separate = separation.nir.separate
    monkeypatch.setattr(separation.nir, "separate", lambda *a, **k: real_separate(*a, **{**k, "steps": 5}))
    monkeypatch.setattr(separation, "DATA", Path("/nonexistent"))
    monkeypatch.setitem(separation.PAPER_BUDGET_S, True, 0.5)  # the table's shape, not its figures
    tables = separation.run(True, "cpu", None)
    assert len(tables) == 3  # quality, seeds and speed; real data absent: those tables are skipped, not failed
    quality, over_seeds, speed = tables
    for table in (quality, speed):
        assert [row[0] for row in table["rows"]] == list(separation.nir.TASKS)
    assert [row[:2] for row in over_seeds["rows"][:4]] == [["reflection", s] for s in ("0", "1", "2", "mean")]
    mean_row = over_seeds["rows"][3]
    gains = [float(row[5]) for row in over_seeds["rows"][:3]]
    assert abs(float(mean_row[5]) - np.mean(gains)) < 0.011
    for table in tables:
        assert all(len(row) == len(table["header"]) for row in table["rows"])
        assert "|---|" in markdown(table)


def test_aligned_baselines_recover_a_static_scene_under_sparse_outliers():
    """The classical baseline itself: a static scene with a bright outlier in one frame per pixel."""
    from benchmarks.separation import aligned_baselines, psnr

    rng = np.random.default_rng(0)
    scene = rng.random((1, 24, 24)).astype(np.float32).repeat(5, 0)
    frames = scene.copy()
    frames[np.arange(5), rng.integers(0, 24, 5), rng.integers(0, 24, 5)] = 1.0  # one outlier per frame
    estimates = aligned_baselines(frames)
    assert psnr(estimates["median"], scene) > 60
    assert psnr(estimates["mean"], scene) < psnr(estimates["median"], scene)


def test_registration_tables_and_error_measure(monkeypatch):
    """The drift-correction benchmark's tables on tiny stacks (speed and figures are not checked here), and its
    error measure: zero for the truth, the shift itself for a uniformly shifted estimate."""
    from benchmarks import registration
    from benchmarks.__main__ import markdown
    from napari_nir import _sample_data

    truth = np.repeat(np.eye(3)[None], 4, 0)
    truth[:, 0, 2] = np.arange(4) * 3.0
    assert registration.pair_error(truth, truth, (32, 32)) == 0
    shifted = truth.copy()
    shifted[1, 1, 2] += 0.5  # frame 1 off by half a pixel: half of the 12 ordered pairs see it
    assert abs(registration.pair_error(shifted, truth, (32, 32)) - 0.5 * np.sqrt(6 / 12)) < 1e-9

    monkeypatch.setitem(registration.SIZES, True, [(4, 48)])
    monkeypatch.setattr(registration, "IMAGES", ("cell",))
    monkeypatch.setattr(registration, "_have_pystackreg", lambda: False)  # pystackreg: tests/core/test_registration
    monkeypatch.setitem(registration.LONG_SIZES, True, ((3,), 32))
    monkeypatch.setattr(registration, "microscopy_drift_stack",
                        lambda n, shape, **kw: _sample_data.microscopy_drift_stack(n, shape, max_shift_px=2.0,
                                                                                   **kw))
    real_fuse = registration.nir.fuse
    monkeypatch.setattr(registration.nir, "fuse", lambda *a, **k: real_fuse(*a, **{**k, "steps": 10}))
    tables = registration.run(True, "cpu")
    assert len(tables) == 2
    for table in tables:
        assert markdown(table).startswith("### ")
        assert all(len(row) == len(table["header"]) for row in table["rows"])
    assert [row[0] for row in tables[0]["rows"]][:3] == ["napari-nir translation", "napari-nir rigid",
                                                         "napari-nir affine"]
    assert tables[0]["rows"][3][2] == "not installed"


def test_partial_benchmark_run_keeps_the_other_sections():
    from benchmarks.__main__ import merge_section, section_block

    text = "# results\n\n" + section_block("fusion", "F1\n") + section_block("scaling", "S1\n")
    updated = merge_section(text, "scaling", section_block("scaling", "S2\n"))
    assert "F1" in updated and "S2" in updated and "S1" not in updated
    appended = merge_section(updated, "registration", section_block("registration", "R\n"))
    assert appended.startswith(updated.rstrip("\n")) and appended.endswith(section_block("registration", "R\n"))
