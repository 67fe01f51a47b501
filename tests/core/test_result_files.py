"""FusionResult.save / napari_nir.load: round trip, and refusal of crafted or damaged files."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

import napari_nir as nir


def test_save_load_round_trip(tmp_path, small_fit):
    path = tmp_path / "fit.npz"
    small_fit.save(path)
    loaded = nir.load(path)
    assert np.array_equal(loaded.frames(), small_fit.frames())
    assert np.array_equal(loaded.canonical(), small_fit.canonical())
    np.testing.assert_allclose(loaded.homographies, small_fit.homographies)
    assert loaded.history == small_fit.history and loaded.config == small_fit.config
    assert [p.name for p in tmp_path.iterdir()] == ["fit.npz"]  # no temporary files left behind


def test_pickle_payload_is_refused_without_running(tmp_path, small_fit):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.npz"
    small_fit.save(path)
    # add an object array (a pickle) next to the genuine entries
    buf = io.BytesIO()
    np.save(buf, np.array([Exploit()], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("param:field.evil.npy", buf.getvalue())
    with pytest.raises(ValueError):
        nir.load(path)
    assert not marker.exists()


def test_truncated_and_edited_files_are_refused(tmp_path, small_fit):
    path = tmp_path / "fit.npz"
    small_fit.save(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|not a readable"):
        nir.load(cut)
    # edit the metadata: a different working shape no longer matches the stored networks
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta["domain"] = [-5, 5, -5, 5]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    edited = tmp_path / "edited.npz"
    np.savez(edited, **arrays)
    with pytest.raises(ValueError, match="inconsistent or edited"):
        nir.load(edited)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError):
        nir.load(text)
    with pytest.raises(FileNotFoundError):
        nir.load(tmp_path / "missing.npz")
