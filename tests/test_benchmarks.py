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
    assert separation.run(True, "cpu", None) == []  # real data absent: those tables are skipped, not failed
    quality = separation.synthetic(True, "cpu")  # the footnote's first table (its seeds and speed tables: same code)
    assert [row[0] for row in quality["rows"]] == list(separation.nir.TASKS)
    assert all(len(row) == len(quality["header"]) for row in quality["rows"])
    assert "|---|" in markdown(quality)


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


def test_the_corpus_is_split_once_and_reproducible():
    """benchmarks/corpus.py: disjoint halves with disjoint photographs, the same mix of sizes and content in each,
    and a burst is the same every time it is made."""
    from benchmarks import corpus

    assert set(corpus.TUNING) | set(corpus.HELD_OUT) == set(range(corpus.N_PER_TASK))
    assert not set(corpus.TUNING) & set(corpus.HELD_OUT)
    assert not set(corpus.PHOTOS_TUNING) & set(corpus.PHOTOS_HELD_OUT)
    assert len(corpus.PHOTOS_TUNING + corpus.PHOTOS_HELD_OUT) >= 10
    for half in (corpus.TUNING, corpus.HELD_OUT):
        assert {corpus.KINDS[(i // 2) % len(corpus.KINDS)] for i in half} == set(corpus.KINDS)
        assert {corpus.SIZES[(i // 2) % len(corpus.SIZES)] for i in half} == set(corpus.SIZES)
    first, again = corpus.make_burst("rain", 3), corpus.make_burst("rain", 3)
    assert np.array_equal(first.frames, again.frames) and first.info == again.info
    assert first.info["half"] == "held-out" and first.info["photo"] in corpus.available_photos(corpus.PHOTOS_HELD_OUT)
    assert first.frames.shape[1:3] == corpus.SIZES[1] and first.clean.shape == first.frames.shape
    assert first.interference_mask.any() and not first.interference_mask.all()  # rain touches some pixels
    bare = corpus.make_burst("rain", 3, with_interference=False)
    assert not bare.interference_mask.any() and bare.info["noise"] >= 0.01
    assert np.allclose(bare.clean, first.clean)


def test_corpus_tables_are_produced(monkeypatch):
    """The held-out corpus tables' shape, on 24 x 24 crops of one burst per task and 5 steps per fit."""
    from benchmarks import corpus, separation_corpus
    from benchmarks.__main__ import markdown

    def cropped(task, index, **kw):
        b = corpus.make_burst(task, index, **kw)
        crop = (slice(None), slice(0, 24), slice(0, 24))
        return corpus.CorpusBurst(b.frames[crop], b.clean[crop], b.interference_mask[crop],
                                  None if b.object_mask is None else b.object_mask[crop], b.homographies, b.info)

    monkeypatch.setattr(separation_corpus, "make_burst", cropped)
    monkeypatch.setattr(separation_corpus, "QUICK_COUNT", 1)
    real_separate = separation_corpus.nir.separate
    monkeypatch.setattr(separation_corpus.nir, "separate", lambda *a, **k: real_separate(*a, **{**k, "steps": 5}))
    summary, per_burst, clean, camera = separation_corpus.run(True, "cpu")
    assert [row[0] for row in summary["rows"]] == list(corpus.TASK_NAMES)
    assert len(per_burst["rows"]) == len(corpus.TASK_NAMES) and len(clean["rows"]) == len(corpus.TASK_NAMES)
    assert len(camera["rows"]) == 1
    for table in (summary, per_burst, clean, camera):
        assert all(len(row) == len(table["header"]) for row in table["rows"])
        assert "|---|" in markdown(table)
