"""The command's output sets and signals: under --overwrite a folder ends with the complete old set or the complete
new one, never a mix and never a staging folder, whatever error or signal comes and when; the output folder is
checked before the input is read; Ctrl-C and SIGTERM exit 130 and 143 with one line, without a traceback.

The in-process tests reuse two tiny fits and their rendered outputs (``cli._fit`` and ``cli._render_outputs`` are
replaced), so that each run only writes."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

import napari_nir
from napari_nir import cli, io

SRC = Path(__file__).resolve().parents[1] / "src"
OLD_SEED, NEW_SEED = 1, 2
CODE = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the documented exit codes: cancelled, terminated


def _hashes(folder: Path) -> dict:
    """{name: sha256} of every entry of ``folder``, hidden ones included (a folder: 'folder')."""
    return {p.name: "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.iterdir()}


def _state(out: Path, sets) -> str:
    """'old' or 'new' when ``out`` holds exactly the old or the new set (and nothing hidden); fails otherwise."""
    now = _hashes(out)
    if now == sets.old:
        return "old"
    if now == sets.new:
        return "new"
    mixed = {n: "old" if sets.old.get(n) == h else "new" if sets.new.get(n) == h else "other" for n, h in now.items()}
    missing = sorted(set(sets.old) - set(now))
    pytest.fail(f"{out} holds neither the old nor the new set: {mixed}, missing {missing}")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A tiny burst, two tiny fits (seeds 1 and 2) and the output sets they make (written with ``-o out`` from
    ref_old/ and ref_new/): ``old`` and ``new`` their hashes, ``old_dir`` a folder to copy the old set from."""
    from napari_nir._sample_data import homography_burst

    root = tmp_path_factory.mktemp("sets")
    sample = homography_burst(3, (32, 32), seed=1, translation=0.04, rotation_deg=2, scale=0.02, perspective=0.01)
    burst = (sample.frames * 255).round().astype(np.uint8)
    tifffile.imwrite(root / "burst.tif", burst, photometric="rgb")
    fits = {seed: napari_nir.fuse(burst, "homography", steps=2, device="cpu", seed=seed, batch=512, init="identity")
            for seed in (OLD_SEED, NEW_SEED)}
    rendered = {}
    render = cli._render_outputs

    def cached(fit, *args, **kwargs):  # the same fit, command and folder name render the same files
        if id(fit) not in rendered:
            rendered[id(fit)] = render(fit, *args, **kwargs)
        return rendered[id(fit)]

    out = {}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cli, "_fit", lambda burst, args, plan: fits[plan.call["seed"]])
        m.setattr(cli, "_render_outputs", cached)
        for name, seed in (("ref_old", OLD_SEED), ("ref_new", NEW_SEED)):
            (root / name).mkdir()
            m.chdir(root / name)
            assert cli.main(["fuse", str(root / "burst.tif"), "-o", "out", "--seed", str(seed), "--quiet"]) == 0
            out[name] = _hashes(root / name / "out")
    assert set(out["ref_old"]) == set(out["ref_new"]) and len(out["ref_old"]) >= 5
    assert not set(out["ref_old"].values()) & set(out["ref_new"].values())  # every file tells old from new
    return SimpleNamespace(burst=root / "burst.tif", fits=fits, render=cached, old=out["ref_old"],
                           new=out["ref_new"], old_dir=root / "ref_old" / "out")


@pytest.fixture
def overwrite_run(sets, tmp_path, monkeypatch):
    """``run(patch)``: copy the old set into a fresh folder, ``cli.main`` an --overwrite run with seed 2 into it
    (fit and rendering cached) with ``patch(monkeypatch)`` applied; returns (the exit code, or the exception's type
    when one escapes, and the output folder)."""
    monkeypatch.setattr(cli, "_fit", lambda burst, args, plan: sets.fits[plan.call["seed"]])
    monkeypatch.setattr(cli, "_render_outputs", sets.render)
    runs = []

    def run(patch=lambda m: None):
        work = tmp_path / f"run{len(runs)}"
        runs.append(work)
        work.mkdir()
        shutil.copytree(sets.old_dir, work / "out")
        monkeypatch.chdir(work)
        with pytest.MonkeyPatch.context() as m:
            patch(m)
            try:
                code = cli.main(["fuse", str(sets.burst), "-o", "out", "--seed", str(NEW_SEED), "--overwrite",
                                 "--quiet"])
            except Exception as exc:  # noqa: BLE001 - the injected OSError is an unexpected error: it propagates
                code = type(exc)
        assert os.listdir(work) == ["out"]
        return code, work / "out"

    return run


class Inject:
    """Count the calls that write or move output files (os.replace, io.write_tiff/png/json, np.save) and, at the
    ``k``-th (k >= 1), call ``action()`` first: it may raise (an injected failure) or send a signal."""

    TARGETS = ((os, "replace"), (io, "write_tiff"), (io, "write_png"), (io, "write_json"), (np, "save"))

    def __init__(self, k: int = 0, action=None):
        self.k, self.action, self.calls = k, action, 0

    def __call__(self, m: pytest.MonkeyPatch) -> None:
        for owner, name in self.TARGETS:
            m.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, real):
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.k:
                self.action()
            return real(*args, **kwargs)
        return call


class _TestSigterm(Exception):
    pass


@pytest.fixture
def sigterm_raises():
    """SIGTERM raises _TestSigterm while the test runs (on code without a handler, SIGTERM would end pytest)."""
    def handler(signum, frame):
        raise _TestSigterm

    previous = signal.signal(signal.SIGTERM, handler)
    yield
    signal.signal(signal.SIGTERM, previous)


# -- all or nothing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.EIO, "injected I/O error")],
                         ids=["ctrl-c", "oserror"])
def test_overwrite_keeps_the_old_set_whichever_write_or_move_fails(sets, overwrite_run, error):
    """A failure at any of the run's writes and moves (the commit's included) leaves exactly the old set."""
    count = Inject()
    code, out = overwrite_run(count)
    assert code == 0 and _state(out, sets) == "new"
    assert count.calls >= 2 * len(sets.new)  # staged writes, then the commit's moves

    def fail():
        raise error

    for k in range(1, count.calls + 1):
        code, out = overwrite_run(Inject(k, fail))
        assert code == (CODE[signal.SIGINT] if isinstance(error, KeyboardInterrupt) else OSError), k
        assert _state(out, sets) == "old", k


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_at_any_write_or_move_gives_one_whole_set(sets, overwrite_run, sig, sigterm_raises, capsys):
    """A real signal before any of the run's writes and moves: while staging, the run stops with the old set;
    during the commit, it finishes the new set and then exits 130 (SIGINT) or 143 (SIGTERM). Either way one line
    on stderr and no staging folder."""
    count = Inject()
    overwrite_run(count)
    capsys.readouterr()
    states = []
    for k in range(1, count.calls + 1):
        code, out = overwrite_run(Inject(k, lambda: signal.raise_signal(sig)))
        assert code == CODE[sig], k
        states.append(_state(out, sets))
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (k, err)
    assert states[0] == "old" and states[-1] == "new"  # the first write, the commit's last move


def test_stale_files_leave_with_the_old_set(tmp_path, monkeypatch):
    """``stale`` files (this run has none of them) are taken out in the same transaction: a failure anywhere
    leaves the old files, stale one included; success leaves the new files and no stale one."""
    old = {"a.json": {"v": "old a"}, "b.json": {"v": "old b"}, "gone.json": {"v": "old, stale"}}
    new = {"a.json": ("json", {"v": "new a"}, None, None), "b.json": ("json", {"v": "new b"}, None, None)}

    def run(k=0, action=None):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        for name, doc in old.items():
            (out / name).write_text(json.dumps(doc))
        before = _hashes(out)
        inject = Inject(k, action)
        with monkeypatch.context() as m:
            inject(m)
            try:
                cli._write_all(out, dict(new), True, stale=["gone.json", "a.json"])
            except (KeyboardInterrupt, OSError):
                pass
        contents = {p.name: json.loads(p.read_text())["v"] for p in out.iterdir()}
        return inject.calls, contents, _hashes(out) == before

    calls, contents, _ = run()
    assert contents == {"a.json": "new a", "b.json": "new b"}

    def no_space():
        raise OSError(errno.ENOSPC, "injected: no space left")

    def ctrl_c():
        raise KeyboardInterrupt

    for k in range(1, calls + 1):
        for action in (no_space, ctrl_c):
            _, contents, unchanged = run(k, action)
            assert unchanged and set(contents) == set(old), k


# -- the output folder, checked before the input is read ---------------------------------------------

def _no_read(*args, **kwargs):
    pytest.fail("the input was read although the output folder is unusable")


def _unusable_folder(case: str, tmp_path: Path, monkeypatch) -> str:
    if case == "empty":
        monkeypatch.chdir(tmp_path)
        return ""
    if case == "under a file":
        (tmp_path / "some_file").write_text("x")
        return str(tmp_path / "some_file" / "sub")
    if case == "symlink loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        return str(tmp_path / "loop" / "out")
    if case == "dangling symlink":
        (tmp_path / "link").symlink_to(tmp_path / "missing")
        return str(tmp_path / "link")
    if case == "no permission":
        if os.geteuid() == 0:  # root writes anyway: the probe is told so instead
            monkeypatch.setattr(cli.tempfile, "TemporaryFile", _probe_fails(errno.EACCES))
        else:
            (tmp_path / "locked").mkdir(mode=0o555)
        return str(tmp_path / "locked" / "out")
    if case == "read-only file system":
        monkeypatch.setattr(cli.tempfile, "TemporaryFile", _probe_fails(errno.EROFS))
        return str(tmp_path / "out")
    raise AssertionError(case)


def _probe_fails(code):
    def probe(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return probe


@pytest.mark.parametrize("case", ["empty", "under a file", "symlink loop", "dangling symlink", "no permission",
                                  "read-only file system"])
def test_unusable_output_folder_is_refused_before_reading(case, tmp_path, monkeypatch, capsys):
    """Exit 2 with one line saying what is wrong, before the input is read (or a fit started); nothing created."""
    monkeypatch.setattr(io, "read_burst", _no_read)
    monkeypatch.setattr(cli, "_fit", _no_read)
    monkeypatch.setattr(napari_nir, "fuse", _no_read)
    output = _unusable_folder(case, tmp_path, monkeypatch)
    before = sorted(os.listdir(tmp_path))
    start = time.perf_counter()
    assert cli.main(["fuse", str(tmp_path / "burst.tif"), "-o", output, "--quiet"]) == cli.EXIT_USAGE
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert err.startswith("napari-nir: error: ") and err.count("\n") == 1 and "-o" in err, err
    assert sorted(os.listdir(tmp_path)) == before
    if case == "empty":
        assert cli.main(["demo", "-o", "", "--quiet"]) == cli.EXIT_USAGE and os.listdir(tmp_path) == before


def test_usable_output_folders_pass_and_the_probe_leaves_nothing(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for output in (tmp_path / "new" / "deeper", tmp_path / "real", tmp_path / "link" / "sub"):
        cli._check_outputs(output, ["canonical.tif"], False)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"] and os.listdir(tmp_path / "real") == []


# -- Ctrl-C and SIGTERM outside the writing ----------------------------------------------------------------

@pytest.mark.parametrize("where", ["build_parser", "_plan", "read_burst"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signal_during_start_up_is_one_line(where, sig, tmp_path, monkeypatch, sigterm_raises, capsys):
    """A signal while the command starts (building the parser, planning, reading the input): 130 or 143, one line
    on stderr, no traceback, no output folder."""
    owner = io if where == "read_burst" else cli
    real = getattr(owner, where)

    def interrupted(*args, **kwargs):
        signal.raise_signal(sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, where, interrupted)
    burst = tmp_path / "burst.npy"
    np.save(burst, np.zeros((2, 8, 8), np.float32))
    try:
        code = cli.main(["fuse", str(burst), "-o", str(tmp_path / "out")])
    except (KeyboardInterrupt, _TestSigterm) as exc:
        pytest.fail(f"{type(exc).__name__} escaped main")
    assert code == CODE[sig]
    err = capsys.readouterr().err
    assert err == ("napari-nir: cancelled\n" if sig == signal.SIGINT else "napari-nir: terminated (SIGTERM)\n")
    assert not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGTERM) is not getattr(cli, "_raise_terminated", None)  # put back


INTERRUPT_AT_TORCH = """
import runpy, sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv[0] = "napari-nir"
runpy.run_module("napari_nir", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    """Ctrl-C while torch is imported (the longest part of the start, 1-4 s), made deterministic by an import
    hook: exit 130 with one line, as at any other time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", INTERRUPT_AT_TORCH, "options"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (CODE[signal.SIGINT], "napari-nir: cancelled\n")


# -- real signals to the real command ------------------------------------------------------------------

@pytest.mark.slow
def test_real_signals_at_random_times_leave_one_whole_set(sets, tmp_path):
    """SIGINT or SIGTERM to `python -m napari_nir fuse ... --overwrite` at 20 seeded random times spread over a
    whole run (start-up, fit, writing): every time the folder holds the old set untouched or the complete new one
    (seed 2 in every file, no file as it was) and nothing hidden; the exit code is 0 (done before the signal),
    130 or 143 without a traceback, or the signal's own (-2, -15) when it came before the command's main (while
    the package loads; see test_ctrl_c_while_torch_loads_is_one_line) or after it returned. Prints the runs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}

    def start(work: Path) -> subprocess.Popen:
        work.mkdir()
        shutil.copytree(sets.old_dir, work / "out")
        return subprocess.Popen([sys.executable, "-m", "napari_nir", "fuse", str(sets.burst), "-o", "out",
                                 "--steps", "50", "--set", "batch=512", "--seed", str(NEW_SEED), "--device",
                                 "cpu", "--overwrite", "--quiet"],
                                cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def state(out: Path) -> str:
        now = _hashes(out)
        if now == sets.old:
            return "old"
        assert set(now) == set(sets.old), f"not the same files: {sorted(now)}"
        assert not any(now[n] == sets.old[n] for n in now), "some files are old"
        assert json.loads((out / "provenance.json").read_text())["seed"] == NEW_SEED
        assert all(io.read_tiff(out / n)[1]["seed"] == NEW_SEED for n in now if n.endswith(".tif"))
        return "new"

    began = time.perf_counter()
    reference = start(tmp_path / "reference")
    _, err = reference.communicate(timeout=240)
    whole = time.perf_counter() - began
    assert reference.returncode == 0 and state(tmp_path / "reference" / "out") == "new", err

    rng = random.Random(20)
    rows = []
    for i in range(20):
        delay = whole * (i + rng.random()) / 20  # one time in each twentieth of the run
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        proc = start(tmp_path / f"run{i}")
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
        assert os.listdir(tmp_path / f"run{i}") == ["out"]  # no staging folder beside it either
        rows.append((round(delay, 2), sig, proc.returncode, state(tmp_path / f"run{i}" / "out"), err))
    print(f"\nwhole run {whole:.2f} s; delay s, signal, exit code, set, stderr:")
    for delay, sig, code, which, err in rows:
        print(f"  {delay:6.2f} {sig.name:7} {code:4} {which} {err.strip().splitlines()[-1:] if err else ''}")
    for delay, sig, code, which, err in rows:
        if code < 0:  # the signal's own: it came before main installed its handlers, or after main returned
            assert code == -sig
        else:
            assert code in (0, CODE[sig]) and "Traceback" not in err, (delay, err)
            assert code != 0 or which == "new"
