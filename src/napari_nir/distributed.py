"""Many bursts on a Dask cluster: ``fuse_many`` and ``separate_many``, one burst per task (``napari-nir batch``).

Each burst's outputs are what ``napari-nir fuse|separate`` writes (``cli.fit_to_folder``), in ``OUT/<name>/``.
A burst is fitted into a hidden sibling folder ``OUT/.<name>.part-<id>/`` and renamed to ``OUT/<name>/`` when
every file is written, so ``OUT/<name>/`` exists only complete: a batch killed at any moment and started again
skips the bursts already done, removes the leftovers of the killed ones and fits the rest. A burst that fails is
recorded with its error and the others carry on. ``OUT/summary.json`` and ``OUT/summary.csv`` (rewritten
atomically after every burst) say, per burst: its status (done, skipped, failed), seconds, PSNR, verdict, error.

The cluster: an existing ``dask.distributed.Client`` (``client=``), a scheduler address (``scheduler=``: any
cluster, e.g. dask-jobqueue, Kubernetes, SSH), or by default a ``LocalCluster`` of one single-threaded worker
process per core. Every fit runs with one torch thread (``threads=1``, recorded in its provenance), so a result is
bit-identical to ``napari_nir.fuse(burst, ..., threads=1)`` run alone with the same seed; Dask schedules the
bursts, this module writes no scheduler of its own.

Inputs: paths (multi-page TIFFs, .npy files, folders of frames, ``.zarr`` arrays), numpy, dask or zarr arrays,
or a dict {name: input}. Names come from the paths ("burst.tif" -> "burst", a folder's name), "burst_000" ...
for arrays; repeated names get "_2", "_3".
"""
from __future__ import annotations

import csv
import io as text_io
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["fuse_many", "separate_many", "local_cluster", "named_inputs", "SUMMARY_JSON", "SUMMARY_CSV"]

# Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand freed memory back to the system); it
# also stops glibc from adapting its mmap threshold, so every large tensor of every step was mapped and unmapped
# again: fits ran 2.3x slower (benchmarks/DECISIONS.md, "many bursts"). The local cluster starts its workers
# without it; a cluster of your own should too (docs/guide.md, "Many bursts and big images").
NANNY_TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
_SUMMARY_FIELDS = ("name", "input", "status", "seconds", "final_psnr_db", "verdict", "error")
_PART = re.compile(r"^\.(?P<name>.+)\.part-[0-9a-f]{12}$")


def fuse_many(inputs, output_dir, *, motion: str = "homography", client=None, scheduler: str | None = None,
              workers: int | None = None, overwrite: bool = False, progress: bool | Callable[[str], None] = True,
              **options) -> list[dict]:
    """Fuse every burst of ``inputs`` into ``output_dir/<name>/`` on a Dask cluster (module docstring).

    motion: as ``napari_nir.fuse``; options: ``preset``, ``steps``, ``seed``, ``device`` and any fit option
    (``batch=8192``, ...), the same for every burst. client / scheduler / workers: the cluster (default: a
    LocalCluster with ``workers`` single-threaded worker processes, one per core). overwrite: fit again the bursts
    already done (default: skip them). progress: print one line per finished burst (True), nothing (False), or
    call ``progress(line)``. Returns the summary rows (also in summary.json / summary.csv), in input order.
    """
    return _run_many("fuse", inputs, output_dir, ["--motion", motion], options, client=client, scheduler=scheduler,
                     workers=workers, overwrite=overwrite, progress=progress)


def separate_many(inputs, output_dir, *, task: str, motion: str | None = None, client=None,
                  scheduler: str | None = None, workers: int | None = None, overwrite: bool = False,
                  progress: bool | Callable[[str], None] = True, **options) -> list[dict]:
    """Separate every burst of ``inputs`` (``task``: a name of ``napari_nir.TASKS``) into ``output_dir/<name>/``;
    the rest as ``fuse_many``."""
    flags = ["--task", task] + (["--motion", motion] if motion else [])
    return _run_many("separate", inputs, output_dir, flags, options, client=client, scheduler=scheduler,
                     workers=workers, overwrite=overwrite, progress=progress)


# -- inputs -----------------------------------------------------------------------------------------------
def named_inputs(inputs) -> list[tuple[str, Any]]:
    """[(name, input)] in order: a dict's keys, a path's stem (a folder's or a .zarr's name), "burst_NNN" for
    arrays; a name met again gets "_2", "_3", ... Names are made safe as folder names."""
    if isinstance(inputs, Mapping):
        items = [(str(k), v) for k, v in inputs.items()]
    else:
        if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "shape"):
            inputs = [inputs]
        items = []
        for i, item in enumerate(inputs):
            if isinstance(item, (str, os.PathLike)):
                p = Path(item)
                name = p.name[:-5] if p.name.lower().endswith(".zarr") else (p.name if p.is_dir() else p.stem)
            else:
                name = f"burst_{i:03d}"
            items.append((name, item))
    out, seen = [], {}
    for name, item in items:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "burst"
        count = seen.get(safe, 0) + 1
        seen[safe] = count
        out.append((safe if count == 1 else f"{safe}_{count}", item))
    return out


def _read_input(item):
    """A burst for ``cli.fit_to_folder``: a path as it is (a .zarr path opened lazily), an array read in this
    worker (dask computed here, with the synchronous scheduler: no nested cluster work)."""
    if isinstance(item, (str, os.PathLike)):
        if os.fspath(item).lower().rstrip("/").endswith(".zarr"):
            import zarr

            return np.asarray(zarr.open(os.fspath(item), mode="r")[...])
        return item
    if hasattr(item, "compute") and hasattr(item, "dask"):
        return np.asarray(item.compute(scheduler="synchronous"))
    return np.asarray(item)


# -- one burst (runs on a worker) ---------------------------------------------------------------------------
def _one_burst(kind: str, name: str, item, output_dir: str, flags: list[str], overwrite: bool) -> dict:
    """Fit one burst into ``output_dir/name`` through a hidden part folder; never raises: a failure is a row."""
    from .cli import fit_to_folder
    from .core.result import fsync_folder
    from .io import replace_folder

    started = time.perf_counter()
    final = Path(output_dir) / name
    part = Path(output_dir) / f".{name}.part-{uuid.uuid4().hex[:12]}"
    row = _row(name, item, "failed")
    captured = text_io.StringIO()
    try:
        burst = _read_input(item)
        source = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"{name} ({type(item).__name__})"
        stderr, sys.stderr = sys.stderr, captured  # the command's warnings: kept with the row, not on the worker
        try:
            found = fit_to_folder(kind, burst, part, [*flags, "--quiet"], source=source)
        finally:
            sys.stderr = stderr
        replace_folder(part, final, overwrite=True)  # an old set leaves only once the new one is in place
        fsync_folder(output_dir)  # the rename survives a crash
        row.update(status="done", final_psnr_db=found["final_psnr_db"], verdict=found["verdict"])
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - one burst's failure is recorded; the batch goes on
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]
        warnings = captured.getvalue().strip()
        if warnings:
            row["error"] += f" [{' '.join(warnings.split())[:500]}]"
    finally:
        shutil.rmtree(part, ignore_errors=True)
    row["seconds"] = round(time.perf_counter() - started, 3)
    return row


def _row(name: str, item, status: str, **values) -> dict:
    """One burst's summary row (``_SUMMARY_FIELDS``): what is not given is None."""
    return {**dict.fromkeys(_SUMMARY_FIELDS), "name": name, "input": _describe(item), "status": status, **values}


def _describe(item) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    shape = "x".join(str(int(n)) for n in getattr(item, "shape", ()))
    return f"{type(item).__module__.split('.')[0]}.{type(item).__name__} {shape} {getattr(item, 'dtype', '')}".strip()


# -- the batch ----------------------------------------------------------------------------------------------
def _option_flags(options: dict) -> list[str]:
    """``napari-nir`` flags for fit options: preset/steps/seed/device as flags, the rest as --set, threads=1."""
    from .cli import format_value

    options = dict(options)
    flags = []
    for name in ("preset", "steps", "seed", "device"):
        if options.get(name) is not None:
            flags += [f"--{name}", str(options.pop(name))]
    options.setdefault("threads", 1)
    for key, value in options.items():
        flags += ["--set", f"{key}={format_value(value)}"]
    return flags


def _run_many(kind, inputs, output_dir, task_flags, options, *, client, scheduler, workers, overwrite,
              progress) -> list[dict]:
    from .cli import _plan, build_parser

    items = named_inputs(inputs)
    if not items:
        raise ValueError("no inputs: give paths of bursts (TIFF, .npy, folders of frames, .zarr) or arrays")
    flags = [*task_flags, *_option_flags(options)]
    _plan(build_parser().parse_args([kind, "BURST", "-o", "OUT", *flags]), kind)  # bad options: refused now
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    say = progress if callable(progress) else (print if progress else (lambda line: None))
    rows: dict[str, dict] = {}
    todo = []
    for name, item in items:
        if (out / name).is_dir() and not overwrite:
            rows[name] = _row(name, item, "skipped", seconds=0.0, error="done before (its folder exists)")
        else:
            todo.append((name, item))
    order = [name for name, _ in items]
    _write_summary(out, rows, order)
    if todo:
        say(f"{len(todo)} burst(s) to {kind}, {len(items) - len(todo)} done before; outputs in {out}")
        with _cluster(client, scheduler, workers) as active:
            from distributed import as_completed

            submitted = {active.submit(_one_burst, kind, name, item, os.fspath(out), flags, overwrite, pure=False,
                                       key=f"napari-nir-{kind}-{name}-{uuid.uuid4().hex[:8]}"): (name, item)
                         for name, item in todo}
            for done_count, future in enumerate(as_completed(list(submitted)), start=1):
                try:
                    row = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker lost (killed, out of memory): that burst failed
                    row = _row(*submitted[future], "failed", error=f"{type(exc).__name__}: {exc}")
                rows[row["name"]] = row
                _write_summary(out, rows, order)
                what = (f"PSNR {row['final_psnr_db']} dB, verdict {row['verdict']}" if row["status"] == "done"
                        else row["error"])
                say(f"[{done_count}/{len(todo)}] {row['name']}: {row['status']} in {row['seconds']} s ({what})")
    return [rows[name] for name in order]


class _cluster:
    """The client to use, as a context manager that closes only what it made."""

    def __init__(self, client, scheduler, workers):
        self.client, self.scheduler, self.workers = client, scheduler, workers
        self._made = []

    def __enter__(self):
        if self.client is not None:
            return self.client
        from distributed import Client

        if self.scheduler:
            client = Client(self.scheduler)
        else:
            cluster = local_cluster(self.workers)
            self._made.append(cluster)
            client = Client(cluster)
        self._made.insert(0, client)
        return client

    def __exit__(self, *exc):
        for thing in self._made:
            thing.close()
        return False


def local_cluster(workers: int | None = None):
    """The default cluster: a ``dask.distributed.LocalCluster`` of ``workers`` (default: one per core) worker
    processes with one thread each, started without Dask's MALLOC_TRIM_THRESHOLD_ (``NANNY_TRIM``). Close it when
    done (``with local_cluster() as cluster, Client(cluster) as client: ...``)."""
    import dask
    from distributed import LocalCluster

    from .core.memory import usable_cores

    with dask.config.set({NANNY_TRIM: None}):  # None unsets the variable for the workers
        return LocalCluster(n_workers=workers or usable_cores(), threads_per_worker=1, processes=True,
                            dashboard_address=None)


def _remove_leftovers(out: Path) -> None:
    """Part folders of a killed batch (the old sets of an interrupted overwrite, half-written summaries): never
    results."""
    for entry in out.iterdir():
        if entry.is_dir() and (_PART.match(entry.name) or re.match(r"^\..+-[0-9a-f]{12}\.old$", entry.name)):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and re.match(r"^\.summary-[0-9a-f]{12}\.part\.(json|csv)$", entry.name):
            entry.unlink(missing_ok=True)  # a summary being replaced when the batch was killed


def _write_summary(out: Path, rows: dict, order: list[str]) -> None:
    """summary.json and summary.csv, each replaced atomically: the rows so far, in input order."""
    listed = [rows[name] for name in order if name in rows]
    pending = [name for name in order if name not in rows]
    _atomic_text(out / SUMMARY_JSON, json.dumps({"bursts": listed, "pending": pending}, indent=1) + "\n")
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_SUMMARY_FIELDS)
    writer.writeheader()
    for row in listed:
        writer.writerow({key: row.get(key) for key in _SUMMARY_FIELDS})
    _atomic_text(out / SUMMARY_CSV, buffer.getvalue())


def _atomic_text(path: Path, text: str) -> None:
    from .io import _atomic

    with _atomic(path, overwrite=True) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
