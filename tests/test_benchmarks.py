"""The benchmark scripts still run and print their tables (tiny sizes; speed is not checked here)."""
from __future__ import annotations

import sys
from pathlib import Path

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
    monkeypatch.setattr(fusion.nir, "fuse", lambda *a, **k: real_fuse(*a, **{**k, "steps": min(k.get("steps") or 30, 30)}))
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
