"""napari_nir.load checks a result file before it allocates for it; FusionResult.save writes like the CLI.

One small saved fit per module; the hostile variants are that file rewritten with zipfile.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import napari_nir as nir

MiB = 1 << 20


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small_fit):
    path = tmp_path_factory.mktemp("result") / "fit.npz"
    small_fit.save(path)
    return path


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def _write(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:  # stored, as np.savez writes
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _npy_header(shape, descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _with_meta(path, members: dict[str, bytes], text: bytes):
    return _write(path, {**members, "meta.npy": _npy(np.frombuffer(text, dtype=np.uint8))})


def _edited(path, saved, edit):
    members = _members(saved)
    meta = json.loads(np.load(io.BytesIO(members["meta.npy"])).tobytes())
    edit(meta)
    return _with_meta(path, members, json.dumps(meta).encode())


def _refused(path):
    return pytest.raises(ValueError, match=re.escape(str(path)))


def _set(section: str, key: str, value):
    def edit(meta):
        meta[section][key] = value(meta[section][key]) if callable(value) else value
    return edit


def test_plain_npy_file_is_refused(tmp_path):
    path = tmp_path / "fit.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.zeros(3))
    with _refused(path):
        nir.load(path)


@pytest.mark.parametrize("text", [b"[]", b"null", b'"a result"', b"[" * 100_000], ids=["list", "null", "string",
                                                                                         "deep"])
def test_metadata_that_is_not_a_record_is_refused(tmp_path, saved, text):
    path = _with_meta(tmp_path / "fit.npz", _members(saved), text)
    with _refused(path):
        nir.load(path)


@pytest.mark.parametrize("edit", [
    pytest.param(_set("burst", "lo", lambda lo: lo + [0.0]), id="lo-length"),
    pytest.param(_set("burst", "scale", lambda s: s[:-1]), id="scale-length"),
    pytest.param(_set("burst", "C", 2), id="C-vs-lo"),
    pytest.param(_set("burst", "layout", "TCHW"), id="layout"),
    pytest.param(_set("burst", "layout", "THW"), id="THW-with-3-channels"),
    pytest.param(_set("burst", "dtype", "|O"), id="object-dtype"),
    pytest.param(_set("burst", "H", 2**40), id="huge-H"),
    pytest.param(lambda meta: meta.update(working_shape=meta["working_shape"][:3]), id="working-shape-length"),
    pytest.param(lambda meta: meta.update(domain=meta["domain"][:3]), id="domain-length"),
    pytest.param(lambda meta: meta.update(domain=[0, float("nan"), 0, 1]), id="domain-nan"),
    pytest.param(lambda meta: meta.update(config=[]), id="config-list"),
    pytest.param(lambda meta: meta.update(history=[{}]), id="history-without-steps"),
])
def test_edited_metadata_is_refused(tmp_path, saved, edit):
    path = _edited(tmp_path / "fit.npz", saved, edit)
    with _refused(path):
        nir.load(path)


def test_members_that_are_not_the_networks_are_refused(tmp_path, saved):
    members = _members(saved)
    extra = _write(tmp_path / "extra.npz", {**members, "param:field.spare.npy": _npy(np.zeros(2, np.float32))})
    with pytest.raises(ValueError, match=re.escape(str(extra)) + ".*param:field.spare.npy"):
        nir.load(extra)
    name = "param:field.grids.0.npy"
    wrong = _write(tmp_path / "wrong.npz", {**members, name: _npy(np.zeros((1, 4, 13, 14), np.float32))})
    with pytest.raises(ValueError, match=re.escape(str(wrong)) + ".*" + re.escape(name)):
        nir.load(wrong)
    path = _write(tmp_path / "sneaky.npz", {**members, "../param:x.npy": members[name]})
    with _refused(path):
        nir.load(path)


def test_save_mode_follows_the_umask_and_syncs(tmp_path, small_fit, monkeypatch):
    if os.name != "posix":
        pytest.skip("file modes are POSIX")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    previous = os.umask(0o022)
    try:
        small_fit.save(tmp_path / "a.npz")
        os.umask(0o027)
        small_fit.save(tmp_path / "b.npz")
    finally:
        os.umask(previous)
    assert (os.stat(tmp_path / "a.npz").st_mode & 0o777, os.stat(tmp_path / "b.npz").st_mode & 0o777) == \
        (0o644, 0o640)
    assert len(synced) == 4  # each save: the file, then its folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]
    loaded = nir.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(loaded.frames(), small_fit.frames())
    np.testing.assert_allclose(loaded.homographies, small_fit.homographies)


# -- memory: crafted files are refused before anything is allocated for them -------------------------------
MEASURE = textwrap.dedent("""
    import json, resource, sys
    import napari_nir as nir

    def status(key):  # bytes
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))

    legitimate, *crafted = sys.argv[1:]
    nir.load(legitimate)  # a first load's one-time costs (torch's lazy initialisation) belong to no file
    # a regression raises MemoryError here instead of filling the machine
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (status("VmData") + (2 << 30), hard))
    out = {}
    for path in [*crafted, legitimate]:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # the peak resident size (VmHWM) starts again from the current one
        before = status("VmRSS")
        try:
            nir.load(path)
            error = None
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        out[path] = {"growth": status("VmHWM") - before, "error": error}
    print(json.dumps(out))
""")
# what one refused load may cost besides the file: the zip directory, the JSON, the networks built on the meta
# device (measured: under 0.1 MiB each), with room for the allocator's granularity
ALLOWANCE = 16 * MiB


def _zeros_member(path, members: dict[str, bytes], name: str, size: int):
    """``members`` with ``name`` replaced by a valid .npy of ``size`` bytes of zeros, deflated (a few MiB)."""
    chunk = bytes(16 * MiB)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for other, data in members.items():
            if other != name:
                z.writestr(other, data)
        with z.open(name, "w", force_zip64=True) as fh:
            fh.write(_npy_header((size // 4,)))
            for _ in range(size // len(chunk)):
                fh.write(chunk)
    return path


def test_crafted_files_are_refused_within_twice_the_decoded_size(tmp_path, saved):
    """Each crafted file: ValueError naming it, and a peak resident size (Linux VmHWM, reset before each load)
    under twice the legitimate file's decoded size plus ALLOWANCE, in a process that loaded the legitimate file
    once first (a first load's one-time costs, ~75 MiB of torch's lazy initialisation, belong to no file)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("measures the peak resident size through Linux's /proc/self/clear_refs")
    members = _members(saved)
    with zipfile.ZipFile(saved) as z:
        decoded = sum(info.file_size for info in z.infolist())
    grid = "param:field.grids.7.npy"
    crafted = {
        # 512 MiB of deflated zeros in a 2.5 MiB file: enough to show it is never decompressed
        "zeros": _zeros_member(tmp_path / "zeros.npz", members, grid, 512 * MiB),
        # networks of several GB from a small edit of the metadata
        "finest": _edited(tmp_path / "finest.npz", saved, _set("config", "field_options", {"finest": 5000})),
        # a header declaring 4 TiB over a few bytes
        "huge-shape": _write(tmp_path / "huge.npz", {**members, grid: _npy_header((2**40,)) + bytes(16)}),
    }
    assert os.path.getsize(crafted["zeros"]) < 4 * MiB
    files = [str(saved)] + [str(p) for p in crafted.values()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", MEASURE, *files], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    print({name: report[str(p)] for name, p in crafted.items()}, "legitimate:", report[str(saved)])
    for name, path in crafted.items():
        error, growth = report[str(path)]["error"], report[str(path)]["growth"]
        assert error is not None and error.startswith("ValueError") and str(path) in error, (name, error)
        assert growth < 2 * decoded + ALLOWANCE, (name, growth / MiB)
    assert report[str(saved)]["error"] is None
