"""The ``napari-nir`` command (also ``python -m napari_nir``).

    napari-nir fuse BURST -o OUTDIR [--motion ...] [--preset ...] [--steps N] [--device ...] [--seed S]
                                    [--extent union|first] [--scale F] [--set KEY=VALUE ...]
                                    [--from-provenance FILE] [--overwrite] [--quiet]
    napari-nir separate BURST --task TASK -o OUTDIR [the same options]
    napari-nir demo [-o OUTDIR] [--steps N] [--device ...] [--set KEY=VALUE ...] [--overwrite]
    napari-nir batch INPUT... -o OUT [--task TASK | --motion ...] [--workers N] [--scheduler ADDRESS] [the same]
    napari-nir options

The files written are the result's artefact list (``FusionResult.artefacts``, ``core.result.ARTEFACTS``: e.g.
canonical.tif, frames.tif, homographies.json or flow.tif and flow.png, scene.tif, ...) plus side_by_side.png and
provenance.json (the demo adds input.tif); all at once after the fit succeeded, never half: whatever error,
Ctrl-C or SIGTERM comes and when, OUTDIR then holds either the complete previous set of these files or the
complete new one, and no staging files (``_write_all``). OUTDIR is checked before the input is read: it (or its
nearest existing parent) must be a folder a file can be created in. ``--set`` takes any option of ``napari-nir
options``; ``--from-provenance`` repeats a recorded fit. Exit codes: 0 done; 2 bad input or arguments (one line on
stderr); 130 cancelled (Ctrl-C, SIGINT) and 143 terminated (SIGTERM), one line and no traceback; 1 an unexpected
error (with a traceback), or for ``batch`` one or more bursts failed (OUT/summary.csv says which and why).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The choices offered on the command line come from the core's tables (motions, presets, tasks, options). The
# motion and task tables import torch, so they are imported where used: importing this module takes no torch and
# a Ctrl-C while torch loads reaches main (which exits 130 without a traceback).
from .core.config import PRESETS, find_option, parse_value
from .core.config import options as config_options

PROG = "napari-nir"
EXTENTS = ("union", "first")
DEVICES_HELP = "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps"
EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_CANCELLED, EXIT_TERMINATED = 0, 1, 2, 130, 143
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError)
CLI_FILES = ("side_by_side.png", "provenance.json")  # written by the command itself, besides the artefacts
NAMED = ("motion", "preset", "steps", "seed", "device")  # options with a flag of their own (and task: --task)
FLAGS = {"fuse": set(NAMED), "separate": set(NAMED), "demo": {"steps", "device"}}


class CLIError(Exception):
    """A user error found by the command itself (message printed as one line, exit 2)."""


class Terminated(BaseException):
    """SIGTERM arrived during ``main`` (exit 143). A BaseException, like KeyboardInterrupt, so that no ``except
    Exception`` swallows it and every ``finally`` on the way out runs (staging folders are removed)."""


def _raise_terminated(signum, frame):
    raise Terminated


# -- arguments --------------------------------------------------------------------------------------

def __getattr__(name: str):
    if name == "MOTIONS":  # the motion models' names, imported on first use
        from .core.motions import MOTIONS as table

        return tuple(table)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 such as 1 or 2, got {text!r}") from None
    if not math.isfinite(value) or value <= 0 or value > 16:
        raise argparse.ArgumentTypeError(f"expected a number > 0 and <= 16 such as 1 or 2, got {text!r}")
    return value


def _help_text(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help strings with %


def _entries(table, escape: bool = True) -> str:
    """'name (description), ...' of a motion or task table, for help texts (``escape``: for an argument's help,
    which argparse %-formats; descriptions and epilogs are not)."""
    text = ", ".join(f"{name} ({entry.description.rstrip('.')})" for name, entry in table.items())
    return _help_text(text) if escape else text


def _add_fit_options(p: argparse.ArgumentParser, *, full: bool) -> None:
    recorded = " or the recorded one" if full else ""
    p.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help=f"optimisation steps (default: the preset's{recorded}; fewer is faster and blurrier)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help=f"where to fit: {DEVICES_HELP} (default: auto{recorded})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set",
                   help=f"any fit option (repeatable), by its name or section.attribute, e.g. --set batch=8192 "
                        f"--set loss=mse; '{PROG} options' lists them with their types and defaults")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in OUTDIR (refused otherwise)")
    if full:
        p.add_argument("--seed", type=_nonnegative_int, default=None, metavar="S",
                       help="random seed; the same seed, input and device give the same result (default: 0 or the "
                            "recorded one)")
        p.add_argument("--extent", choices=EXTENTS, default=None,
                       help="canonical.tif covers every frame (union, default) or frame 0's field of view (first)")
        p.add_argument("--scale", type=_positive_float, default=None, metavar="F",
                       help="canonical.tif pixels per input pixel; 2 renders it at twice the resolution (default: 1)")
        p.add_argument("--from-provenance", default=None, metavar="FILE", dest="from_provenance",
                       help="repeat the fit recorded in FILE (the provenance.json of an earlier run, one of its TIFFs "
                            "or a saved result .npz) on BURST: its motion, preset, steps, seed, device and every "
                            "option; flags and --set given here replace single values")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--axes", default=None, metavar="AXES",
                       help="the input's axes when it is not T,H,W[,C]: e.g. TCYX (channels) or TZYX (planes); "
                            "registered.tif keeps them")
        p.add_argument("--register-on", default=None, metavar="WHICH", dest="register_on",
                       help="what the fit reads of a C or Z axis: a channel or plane index, or max (the maximum "
                            "projection over Z; the default for Z); default for C: all channels jointly")
        p.add_argument("--init-transforms", default=None, metavar="FILE", dest="init_transforms",
                       help="start from these (T, 3, 3) transforms: a .npy or the transforms.json of an earlier "
                            "run (napari-nir convention), or pystackreg's tmats with --init-convention pystackreg")
        p.add_argument("--init-convention", default="napari-nir", choices=("napari-nir", "pystackreg"),
                       dest="init_convention", help="the convention of --init-transforms (default: napari-nir)")


def _input_options(args) -> dict:
    """axes, register_on and init transforms for napari_nir.fuse/separate (they describe the input, not the fit's
    configuration)."""
    from .core.registration import convert_transforms, parse_register_on

    out = {}
    if getattr(args, "axes", None):
        out["axes"] = args.axes
    text = getattr(args, "register_on", None)
    if text is not None:
        try:
            value = parse_register_on(text)
        except ValueError:
            value = None
        if value is None:  # an empty flag is an error here: leave it out for the default
            raise CLIError(f"--register-on {text!r}: give a channel or plane index (0, 1, ...) or max")
        out["register_on"] = value
    path = getattr(args, "init_transforms", None)
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no such transforms file: {p}")
        if p.suffix.lower() == ".json":
            try:
                record = json.loads(p.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CLIError(f"{p} is not a JSON transforms record ({exc})") from None
            key = args.init_convention
            if not isinstance(record, dict) or key not in record:
                raise CLIError(f"{p} holds no {key!r} transforms (a transforms.json written by '{PROG} fuse')")
            matrices = record[key]
        else:
            try:
                matrices = np.load(p, allow_pickle=False)
            except Exception as exc:  # noqa: BLE001 - any failure of a foreign file is a bad input
                raise CLIError(f"cannot read transforms from {p}: {exc}") from None
        out["init"] = convert_transforms(matrices, args.init_convention, "napari-nir")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``napari-nir`` command (subcommands fuse, separate, demo, options)."""
    from ._version import __version__
    from .core.motions import MOTIONS as MOTION_TABLE
    from .core.tasks import TASKS

    motions = tuple(MOTION_TABLE)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fuse a burst of images of one scene into one canonical view with neural image "
                    "representations (Nam et al., ECCV 2022). Outputs are TIFF files with provenance.",
        epilog=f"'{PROG} COMMAND --help' describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fuse = sub.add_parser(
        "fuse", help="fuse a burst (multi-page TIFF or folder of frames) into OUTDIR",
        description="Fuse a burst into one canonical view aligned by a learned motion model, and write the "
                    "result's artefacts into OUTDIR: canonical.tif, frames.tif, homographies.json (homography) or "
                    "flow.tif and flow.png (flow, occlusion; occlusion also occlusion_w.tif, each pixel's depth "
                    "slice), plus side_by_side.png and provenance.json.",
        epilog=f"motion models: {_entries(MOTION_TABLE, escape=False)}; presets: {', '.join(PRESETS)}. Examples: "
               f"{PROG} fuse burst.tif -o out/ --motion homography --steps 400 --set batch=8192; "
               f"{PROG} fuse other.tif -o out2/ --from-provenance out/provenance.json",
    )
    fuse.add_argument("burst", metavar="BURST",
                      help="a multi-page TIFF (T, H, W[, C]), a .npy array, or a folder of frames "
                           "(.png, .jpg, .tif; sorted naturally: frame2 before frame10)")
    fuse.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the outputs (created)")
    fuse.add_argument("--motion", choices=motions, default=None,
                      help=f"motion model: {_entries(MOTION_TABLE)} (default: homography)")
    fuse.add_argument("--preset", choices=PRESETS, default=None,
                      help="fast (multiresolution grid field, seconds to minutes on a CPU) or paper (the official "
                           "SIREN configuration, slow; a GPU is advised) (default: fast)")
    _add_fit_options(fuse, full=True)
    fuse.set_defaults(handler=_cmd_fuse)

    demo = sub.add_parser(
        "demo", help="fuse the built-in sample burst (no download) and write the results",
        description="Generate the built-in sample burst (a photograph seen through 9 known homographies), fuse it "
                    "with motion=homography, and write input.tif plus the fuse outputs into OUTDIR.",
        epilog=f"motion models of 'fuse': {', '.join(motions)}.",
    )
    demo.add_argument("-o", "--output", default="nir-demo", metavar="OUTDIR",
                      help="folder for the outputs (default: ./nir-demo)")
    _add_fit_options(demo, full=False)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_cmd_demo, motion=None, preset=None, seed=None, extent=None, scale=None,
                      from_provenance=None)

    task_lines = "; ".join(f"{t.name}: {t.description}" for t in TASKS.values())
    separate = sub.add_parser(
        "separate", help="split a burst into a scene and an interference layer (" + ", ".join(TASKS) + ")",
        description="Separate a burst into the scene (following the motion model) and an interference layer, and "
                    "write the result's artefacts into OUTDIR: scene.tif, interference.tif, alpha.tif (fence, "
                    "rain), canonical.tif (the scene fused), frames.tif (the recomposed input), the scene's "
                    "alignment (homographies.json, or flow.tif and flow.png), side_by_side.png and "
                    "provenance.json; reflection (fast preset) also interference_homographies.json and, where the "
                    "reflection moves rigidly, interference_canonical.tif (the reflection fused).",
        epilog=f"tasks: {task_lines}",
    )
    separate.add_argument("burst", metavar="BURST", help="a multi-page TIFF, a .npy array, or a folder of frames")
    separate.add_argument("--task", default=None, choices=tuple(TASKS),
                          help=f"what to remove: {_entries(TASKS)} (required unless --from-provenance records it)")
    separate.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the outputs (created)")
    separate.add_argument("--motion", choices=motions, default=None,
                          help=f"the scene's motion model: {_entries(MOTION_TABLE)} (default: the task's)")
    separate.add_argument("--preset", choices=PRESETS, default=None, help="fast or paper (default: fast)")
    _add_fit_options(separate, full=True)
    separate.set_defaults(handler=_cmd_separate)

    batch = sub.add_parser(
        "batch", help="fuse or separate many bursts on a Dask cluster, one burst per task, into OUT/<name>/",
        description="Fit every INPUT (multi-page TIFFs, .npy files, folders of frames, .zarr arrays) on a Dask "
                    "cluster, one burst per task, each into OUT/<name>/ with the files 'fuse' or 'separate' writes. "
                    "Resumable: bursts whose folder exists are skipped (--overwrite fits them again), a killed "
                    "batch leaves no half-written folder, a failing burst is recorded in OUT/summary.csv and "
                    "OUT/summary.json and the others carry on. Every fit uses one torch thread per worker.",
        epilog=f"Examples: {PROG} batch wells/*.tif -o out/ --motion rigid; {PROG} batch a.tif b.tif -o out/ "
               f"--task rain --workers 2; {PROG} batch bursts/* -o out/ --scheduler tcp://10.0.0.5:8786")
    batch.add_argument("inputs", nargs="+", metavar="INPUT", help="bursts: files, folders of frames, .zarr arrays")
    batch.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the bursts' folders")
    batch.add_argument("--task", default=None, choices=tuple(TASKS),
                       help=f"separate with this task: {_entries(TASKS)} (default: fuse)")
    batch.add_argument("--motion", choices=motions, default=None,
                       help="motion model (default: homography; with --task the task's)")
    batch.add_argument("--preset", choices=PRESETS, default=None, help="fast or paper (default: fast)")
    batch.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="worker processes of the local cluster (default: one per core)")
    batch.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="a running Dask scheduler to use instead (tcp://host:8786; any cluster: dask-jobqueue, "
                            "Kubernetes, SSH)")
    batch.add_argument("--seed", type=_nonnegative_int, default=None, metavar="S", help="random seed (default 0)")
    _add_fit_options(batch, full=False)
    batch.set_defaults(handler=_cmd_batch)

    opts = sub.add_parser(
        "options", help="list every fit option (for --set KEY=VALUE) with its type, default and description",
        description="Every option a fit takes, by section: its name for --set (or section.attribute), its type, "
                    "its default (presets, motions and tasks change some) and what it does.")
    opts.set_defaults(handler=_cmd_options)
    return parser


# -- entry point ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit code (see the module's docstring).
    Ctrl-C (KeyboardInterrupt) at any point of it returns 130 and SIGTERM 143 (called from the main thread, where
    ``main`` installs a SIGTERM handler for the run), each after one line on stderr, without a traceback."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        if on_main_thread:
            signal.signal(signal.SIGTERM, _raise_terminated)
        return _main(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return int(exc.code or 0) if isinstance(exc.code, (int, type(None))) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: choose a command: fuse, separate, demo, batch or options (see '{PROG} --help')",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)
    except (CLIError, *USER_ERRORS) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# -- option values ----------------------------------------------------------------------------------

def _resolve_option(key: str):
    """The Option called ``key`` (flat name or section.attribute), or a CLIError naming close matches."""
    opt = find_option(key)
    if opt is not None:
        return opt
    every = config_options()
    names = list(every) + [opt.path for opt in every.values()]
    close = difflib.get_close_matches(key, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise CLIError(f"--set {key}: unknown option{hint}; '{PROG} options' lists every option")


def _parse_sets(items: list[str]) -> dict:
    """{flat name: typed value} of the --set KEY=VALUE arguments (later ones win)."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--set {item!r}: expected KEY=VALUE, e.g. --set batch=8192; '{PROG} options' lists "
                           "the keys")
        opt = _resolve_option(key)
        try:
            values[opt.flat] = parse_value(opt.flat, text)
        except ValueError as exc:
            raise CLIError(f"--set {item}: {_one_line(exc)}") from None
    return values


def format_value(value) -> str:
    """An option value as ``--set KEY=VALUE`` text that ``parse_value`` reads back to the same value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    if isinstance(value, (tuple, list)):
        return ",".join(repr(float(v)) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _type_name(opt) -> str:
    if opt.choices is not None:
        return " | ".join(str(c) for c in opt.choices)
    annotation = opt.annotation
    args = typing.get_args(annotation)
    if type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return f"{getattr(inner, '__name__', inner)} | none"
    if typing.get_origin(annotation) is tuple:
        return "low,high"
    if annotation is dict:
        return "JSON object"
    return getattr(annotation, "__name__", str(annotation))


def _cmd_options(args) -> int:
    print("Fit options, for '--set KEY=VALUE' (KEY: the name, or section.attribute). Defaults before presets, "
          "motions and tasks change them; every run records its values in provenance.json.")
    section = None
    for opt in config_options().values():
        if opt.section != section:
            section = opt.section
            print(f"\n{section}")
        bounds = []
        if opt.low is not None:
            bounds.append(f"{'>' if opt.low_open else '>='} {opt.low:g}")
        if opt.high is not None:
            bounds.append(f"<= {opt.high:g}")
        limits = f", {' and '.join(bounds)}" if bounds else ""
        print(f"  {opt.flat} ({opt.path}): {_type_name(opt)}{limits}; default {format_value(opt.default)}")
        print(f"      {opt.doc}")
    return EXIT_OK


# -- what to run ------------------------------------------------------------------------------------

@dataclass
class Plan:
    """A resolved command: ``call`` the keyword arguments of napari_nir.fuse / separate (task included for a
    separation), ``config`` the FitConfig they make (known before fitting), the canonical view to write."""

    kind: str  # "fuse", "separate" or "demo"
    call: dict
    config: object
    extent: str = "union"
    scale: float = 1.0
    record: str | None = None  # --from-provenance
    declared: list = field(default_factory=list)


def _read_provenance(path) -> dict:
    """The provenance record in a provenance.json, a napari-nir TIFF or a saved result (.npz)."""
    from . import io

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such provenance file: {p}")
    suffix = p.suffix.lower()
    if suffix in (".tif", ".tiff"):
        _, record = io.read_tiff(p)
    elif suffix == ".npz":
        import napari_nir

        record = napari_nir.load(p, device="cpu").provenance()
    else:
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CLIError(f"{p} is not a JSON provenance record ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("parameters"), dict):
        raise CLIError(f"{p} holds no napari-nir provenance record (a 'parameters' dict); give the provenance.json "
                       "of an earlier run, one of its TIFFs or a saved result .npz")
    return record


def _recorded_call(path, kind: str) -> tuple[dict, dict]:
    """(keyword arguments, canonical view) of the fit recorded in ``path``, for a ``kind`` command."""
    from .core.provenance import fuse_kwargs_from_provenance, separate_kwargs_from_provenance

    record = _read_provenance(path)
    recorded_task = record["parameters"].get("task") or ""
    if kind == "fuse" and recorded_task:
        raise CLIError(f"{path} records a separation (task {recorded_task}); repeat it with "
                       f"'{PROG} separate BURST -o OUTDIR --from-provenance {path}'")
    if kind == "separate" and not recorded_task:
        raise CLIError(f"{path} records a fusion, not a separation; repeat it with "
                       f"'{PROG} fuse BURST -o OUTDIR --from-provenance {path}'")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call = (separate_kwargs_from_provenance if kind == "separate" else fuse_kwargs_from_provenance)(record)
    for w in caught:
        print(f"{PROG}: warning: {_one_line(w.message)}", file=sys.stderr)
    view = record.get("canonical") if isinstance(record.get("canonical"), dict) else {}
    if not view and record.get("output") == "canonical":  # a canonical.tif's own record
        view = record
    return call, {k: view[k] for k in ("extent", "scale") if k in view}


def _agree(name: str, flag, value):
    if flag is not None and flag != value:
        raise CLIError(f"--{name} {flag} and --set {name}={format_value(value)} disagree; give one of them")
    return value


def _plan(args, kind: str) -> Plan:
    """Resolve the run: defaults < --from-provenance < flags < --set; check the configuration it makes."""
    from .core.presets import preset_config, separation_config
    from .core.result import artefact_files
    from .core.tasks import TASKS

    sets = _parse_sets(args.set)
    call: dict = {"motion": None if kind == "separate" else "homography", "preset": "fast", "steps": None,
                  "seed": 0, "device": "auto"}
    view: dict = {}
    if args.from_provenance:
        recorded, view = _recorded_call(args.from_provenance, kind)
        call.update(recorded)
    task = call.pop("task", None)
    if "task" in sets:
        if kind != "separate":
            raise CLIError(f"--set task: a task makes a separation; use '{PROG} separate BURST --task NAME'")
        task = _agree("task", args.task, sets.pop("task"))
    elif kind == "separate" and args.task is not None:
        task = args.task
    if kind == "separate" and not task:
        raise CLIError(f"choose what to remove with --task ({', '.join(TASKS)})")
    for name in NAMED:
        flag = getattr(args, name, None)
        if name in sets:
            call[name] = _agree(name, flag, sets.pop(name))
        elif flag is not None:
            call[name] = flag
    call.update(sets)
    options = {k: v for k, v in call.items() if k not in ("motion", "preset")}
    if kind == "separate":
        config = separation_config(task, call["preset"], call["motion"], **options)
        call = {"task": task, **call}
    else:
        config = preset_config(call["motion"], call["preset"], **options)
    config.validate()
    extent = args.extent or view.get("extent") or "union"
    scale = args.scale if args.scale is not None else view.get("scale", 1.0)
    declared = artefact_files(config) + list(CLI_FILES) + (["input.tif"] if kind == "demo" else [])
    return Plan(kind, call, config, extent, scale, args.from_provenance, declared)


# -- commands ---------------------------------------------------------------------------------------

def _cmd_fuse(args) -> int:
    return _run_fit(args, "fuse")


def _cmd_separate(args) -> int:
    return _run_fit(args, "separate")


def _run_fit(args, kind: str) -> int:
    fit, written, outdir = _fit_and_write(args, kind, args.burst)
    _report(fit, written, outdir)
    return EXIT_OK


def _fit_and_write(args, kind: str, burst, source: str | None = None):
    """Check the outputs and the memory, read ``burst`` (a path; or an array, then ``source`` names it), fit and
    write every output all or nothing; returns (fit, written paths, output folder)."""
    from . import io

    outdir = _output_folder(args.output)
    plan = _plan(args, kind)
    _check_outputs(outdir, plan.declared, args.overwrite)
    if isinstance(burst, (str, os.PathLike)):
        _check_memory_from_header(args, plan)
        source = os.fspath(burst)
        burst = io.read_burst(burst)
    _check_burst_shape(burst, source)
    fit = _fit(burst, args, plan)
    files = _render_outputs(fit, burst, args, plan, source=source)
    written = _write_all(outdir, files, args.overwrite, stale=[n for n in plan.declared if n not in files])
    return fit, written, outdir


def fit_to_folder(kind: str, burst, output, options: list[str] = (), *, source: str = "array") -> dict:
    """Fit ``burst`` and write into ``output`` exactly what ``napari-nir fuse|separate BURST -o OUTPUT OPTIONS``
    writes (for ``napari_nir.distributed``: one burst per task).

    kind: "fuse" or "separate". burst: a path (a multi-page TIFF, a .npy, a folder of frames) or an array
    (T, H, W[, C]) that ``source`` names in the provenance. options: the command's other arguments, e.g.
    ["--motion", "rigid", "--set", "threads=1", "--quiet"]. Raises what the command reports as an error
    (CLIError, ValueError, ...). Returns {"final_psnr_db", "seconds", "verdict", "reasons", "files"}.
    """
    args = build_parser().parse_args([kind, "BURST", "-o", os.fspath(output), *options])
    fit, written, _ = _fit_and_write(args, kind, burst, source)
    found = fit.diagnostics()
    prov = fit.provenance()
    return {"final_psnr_db": prov.get("final_psnr_db"), "seconds": prov.get("seconds"), "verdict": found.verdict,
            "reasons": list(found.reasons), "files": sorted(p.name for p in written)}


def _cmd_batch(args) -> int:
    try:
        from . import distributed
    except ImportError as exc:  # pragma: no cover - the testing extra installs it
        raise CLIError(f"'{PROG} batch' needs Dask's distributed scheduler ({exc}); install it with "
                       "pip install 'napari-nir[distributed]'") from None
    if args.workers is not None and args.scheduler:
        raise CLIError("--workers sizes the local cluster; with --scheduler the cluster is yours: give one of them")
    options = {name: getattr(args, name) for name in ("preset", "steps", "seed", "device")
               if getattr(args, name) is not None}
    options.update(_parse_sets(args.set))
    common = {"scheduler": args.scheduler, "workers": args.workers, "overwrite": args.overwrite}
    if args.task:
        rows = distributed.separate_many(args.inputs, args.output, task=args.task, motion=args.motion, **common,
                                         **options)
    else:
        rows = distributed.fuse_many(args.inputs, args.output, motion=args.motion or "homography", **common,
                                     **options)
    counts = {status: sum(row["status"] == status for row in rows) for status in ("done", "skipped", "failed")}
    print(f"{counts['done']} done, {counts['skipped']} skipped (done before), {counts['failed']} failed; "
          f"summary in {Path(args.output) / distributed.SUMMARY_CSV}")
    return EXIT_UNEXPECTED if counts["failed"] else EXIT_OK


def _cmd_demo(args) -> int:
    from ._sample_data import homography_burst

    outdir = _output_folder(args.output)
    plan = _plan(args, "demo")
    _check_outputs(outdir, plan.declared, args.overwrite)
    sample = homography_burst()
    burst = sample.frames
    fit = _fit(burst, args, plan)
    files = _render_outputs(fit, burst, args, plan, source="napari_nir._sample_data.homography_burst()")
    error = _corner_error(fit.homographies, sample.homographies, burst.shape[1:3])
    prov = files["provenance.json"][1]
    if error is not None:
        prov["ground_truth"] = {"mean_corner_error_px": round(error, 4),
                                "definition": "mean distance between the corners of every frame mapped to frame 0 "
                                              "by the fitted and by the true homographies, in input pixels"}
    files["input.tif"] = ("tiff", burst, {"output": "input", "source": prov["source"],
                                          "ground_truth_homographies": np.asarray(sample.homographies).tolist(),
                                          "ground_truth_convention": "frame-t pixel (col, row, 1) -> world pixel"},
                          burst.ndim == 4)
    prov["outputs"] = sorted(files)
    written = _write_all(outdir, files, args.overwrite, stale=[n for n in plan.declared if n not in files])
    _report(fit, written, outdir)
    if error is not None:
        print(f"alignment error against the ground truth: {error:.3f} px (mean frame-corner distance)")
    print(f"open them in napari: napari {outdir / 'input.tif'} {outdir / 'canonical.tif'}")
    return EXIT_OK


def _output_folder(text: str) -> Path:
    if not text:  # Path("") is the current folder
        raise CLIError("-o/--output is empty; give the folder for the outputs, e.g. -o out")
    return Path(text)


def _check_outputs(outdir: Path, names: list[str], overwrite: bool) -> None:
    """Refuse early (before any reading or fitting) an output folder that cannot be written and outputs that
    would be clobbered without ``overwrite``: ``outdir``, or while it does not exist its nearest existing parent,
    must be a folder (not a file, a symbolic-link loop or a dangling link) in which a file can be created (not
    denied, not a read-only file system), which is probed with an unnamed temporary file. Creates nothing."""
    for folder in (outdir, *outdir.parents):
        try:
            mode = folder.stat().st_mode
            break
        except (FileNotFoundError, NotADirectoryError):  # not there yet, or under a file: look further up
            if folder.is_symlink():
                raise CLIError(f"output folder {folder} is a symbolic link to a missing folder; fix the link or "
                               "choose another folder with -o") from None
        except OSError as exc:  # ELOOP (a symbolic-link loop), EACCES (a parent that cannot be searched), ...
            raise CLIError(f"cannot use output folder {outdir}: {exc.strerror or exc} ({folder}); choose another "
                           "folder with -o") from None
    else:  # pragma: no cover - the current folder or the root always exists
        raise CLIError(f"cannot use output folder {outdir}: none of its folders exists")
    if not stat.S_ISDIR(mode):
        where = "is a file" if folder == outdir else f"is under {folder}, which is a file"
        raise CLIError(f"output folder {outdir} {where}; choose a folder with -o")
    try:
        with tempfile.TemporaryFile(prefix=".napari-nir-probe-", dir=folder):
            pass
    except OSError as exc:
        made = "" if folder == outdir else f" (to create {outdir} in)"
        raise CLIError(f"cannot write into {folder}{made}: {exc.strerror or exc}; choose a folder you can write to "
                       "with -o") from None
    folders = [n for n in names if (outdir / n).is_dir()]
    if folders:  # never replaced: the commit would remove it with its contents
        raise CLIError(f"{outdir / folders[0]} is a folder, where an output file goes; move it away or choose "
                       "another folder with -o")
    present = [n for n in names if (outdir / n).exists()]
    if present and not overwrite:
        raise CLIError(f"{outdir} already holds {', '.join(present)}; pass --overwrite to replace "
                       f"{'it' if len(present) == 1 else 'them'}, or choose another folder with -o")


def _check_memory_from_header(args, plan: Plan) -> None:
    """Refuse a CPU fit that will not fit in memory from the input file's header, before the file is read (the fit
    checks again once it has the array). The file's array (read through one temporary copy) stays in memory beside
    the fit. A stack with --axes, a GPU device or a header that says nothing: left to the fit's own check."""
    from . import io
    from .core import memory
    from .core.burst import working_shape
    from .core.train import resolve_device

    header = io.burst_header(args.burst)
    if header is None or getattr(args, "axes", None) or resolve_device(plan.call.get("device", "auto")).type != "cpu":
        return
    shape, dtype = header
    if len(shape) not in (3, 4) or min(shape) < 1:
        return
    shape4 = shape if len(shape) == 4 else shape + (1,)
    file_bytes = math.prod(shape) * dtype.itemsize
    config = plan.config.replace(device="cpu")
    try:
        memory.check_fit_memory(working_shape(shape4, config.runtime.working_size), config, "cpu",
                                input_shape=shape4, available=memory.available_bytes("cpu") - 2 * file_bytes)
    except ValueError as exc:
        raise CLIError(f"{args.burst} ({' x '.join(map(str, shape))} {dtype}, {memory.format_bytes(file_bytes)} in "
                       f"memory) is refused before reading it: {exc}") from None


def _check_burst_shape(burst: np.ndarray, source) -> None:
    if burst.ndim < 3 or burst.shape[0] < 2:
        what = (f"a single {burst.ndim}-D image" if burst.ndim < 3
                else f"{burst.shape[0]} frame{'s' if burst.shape[0] != 1 else ''}")
        raise CLIError(f"{source} holds {what} (shape {burst.shape}), not a burst; a burst needs at least 2 frames: "
                       "a multi-page TIFF (T, H, W[, C]) or a folder with one image per frame")


def _fit(burst, args, plan: Plan):
    """Run napari_nir.fuse (or separate) with a tqdm progress bar on stderr (unless --quiet)."""
    import napari_nir

    bar = None

    def progress(event):
        nonlocal bar
        if args.quiet:
            return None
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=event.total, desc=event.stage, unit="step", file=sys.stderr, dynamic_ncols=True)
        if bar.total != event.total:
            bar.total = event.total
        if bar.desc != event.stage:  # the model's stage (fit; scene warm-up, separation; background, occlusion)
            bar.set_description(event.stage, refresh=False)
        bar.set_postfix(loss=f"{event.loss:.4g}", psnr=f"{event.psnr:.2f} dB", refresh=False)
        bar.update(max(0, int(event.step) - bar.n))
        return None

    inputs = _input_options(args)
    try:
        if plan.kind == "separate":
            return napari_nir.separate(burst, callback=progress, **plan.call, **inputs)
        return napari_nir.fuse(burst, callback=progress, **plan.call, **inputs)
    finally:
        if bar is not None:
            bar.close()


def _artefact_file(artefact, prov: dict) -> tuple:
    """(kind, payload, metadata, channels) of the file of one artefact, by the file's suffix."""
    from . import io

    suffix = Path(artefact.file).suffix.lower()
    if suffix in (".tif", ".tiff"):
        return ("tiff", np.asarray(artefact.data), {**prov, "output": artefact.role, **artefact.metadata},
                bool(artefact.channels))
    if suffix == ".json":
        return ("json", artefact.data, None, None)
    if suffix == ".npy":
        return ("npy", np.asarray(artefact.data), None, None)
    if suffix == ".png":
        images = list(artefact.data) if artefact.kind == "colour images" else [artefact.data]
        return ("png", io.side_by_side(images), None, None)
    raise RuntimeError(f"artefact {artefact.role!r}: no writer for {artefact.file!r}")


def _first_frame(burst, axes: str) -> np.ndarray:
    """Frame 0 of the input as (H, W[, C]): the first channel and plane of a stack with other axes (e.g. TCYX)."""
    if axes in ("TYX", "TYXC"):
        return np.asarray(burst[0])
    frame = np.moveaxis(np.asarray(burst), [axes.index("Y"), axes.index("X")], [-2, -1])
    return frame.reshape(-1, *frame.shape[-2:])[0]


def _side_by_side_panels(fit, burst, by_role: dict) -> list:
    """The input's first frame next to what the run is for: the scene and interference of a separation, else
    the canonical view."""
    roles = ("scene", "interference") if fit.config.task else ("canonical",)
    panels = [_first_frame(burst, fit.source_axes)]
    for role in roles:
        if role in by_role:
            artefact = by_role[role]
            data = np.asarray(artefact.data)
            panels.append(data[0] if artefact.spec.axes.startswith("T") else data)
    return panels


def _render_outputs(fit, burst, args, plan: Plan, *, source: str) -> dict:
    """{file name: (kind, payload, metadata, channels)} for every output; nothing is written here."""
    from . import io
    from .core.result import ARTEFACTS

    prov = dict(fit.provenance())
    roles = [role for role, spec in ARTEFACTS.items() if spec.file]
    artefacts = fit.artefacts(extent=plan.extent, scale=plan.scale, roles=roles)
    files = {a.file: _artefact_file(a, prov) for a in artefacts}
    by_role = {a.role: a for a in artefacts}
    files["side_by_side.png"] = ("png", io.side_by_side(_side_by_side_panels(fit, burst, by_role)), None, None)
    canonical = by_role.get("canonical")
    view = ({k: v for k, v in canonical.metadata.items() if k != "convention"} if canonical is not None
            else {"extent": plan.extent, "scale": plan.scale})
    prov_doc = {**prov, "source": source, "command": [PROG, *_command(args, fit, plan)],
                "outputs": sorted(set(files) | {"provenance.json"}), "canonical": view,
                "history": list(getattr(fit, "history", []))}
    if plan.record:
        prov_doc["from_provenance"] = os.fspath(plan.record)
    files["provenance.json"] = ("json", prov_doc, None, None)
    return files


def _command(args, fit, plan: Plan) -> list[str]:
    """The arguments that repeat this run: the flags, then --set for every option that differs from what the
    motion, preset and task give (whether it came from --set or --from-provenance)."""
    from .core.presets import preset_config, separation_config

    config = fit.config
    params = config.to_dict()
    flags = FLAGS[plan.kind]
    if plan.kind == "demo":
        out = ["demo", "-o", str(args.output)]
        baseline = preset_config("homography", "fast")
    elif plan.kind == "separate":
        out = ["separate", str(args.burst), "--task", config.task, "-o", str(args.output)]
        baseline = separation_config(config.task, config.preset, params["motion"])
    else:
        out = ["fuse", str(args.burst), "-o", str(args.output)]
        baseline = preset_config(params["motion"], config.preset)
    if "motion" in flags:
        out += ["--motion", str(params["motion"]), "--preset", str(config.preset), "--seed", str(config.seed)]
    if plan.kind != "demo":
        out += ["--extent", plan.extent, "--scale", f"{plan.scale:g}"]
        for flag, name in (("--axes", "axes"), ("--register-on", "register_on")):
            if getattr(args, name, None) is not None:
                out += [flag, str(getattr(args, name))]
        if getattr(args, "init_transforms", None):
            out += ["--init-transforms", str(args.init_transforms), "--init-convention", args.init_convention]
    out += ["--steps", str(config.steps), "--device", str(plan.call.get("device", "auto"))]
    base = baseline.to_dict()
    for flat, value in params.items():
        if flat in flags or flat in ("task", "device"):
            continue
        if value != base.get(flat):
            out += ["--set", f"{flat}={format_value(value)}"]
    return out


def _write_all(outdir: Path, files: dict, overwrite: bool, stale: list[str] = ()) -> list[Path]:
    """Write ``files`` into ``outdir`` all or nothing. ``stale``: files this kind of run may write that this
    result has none of (e.g. interference_canonical.tif when no rigid layer was found); with ``overwrite`` an old
    one goes with the old set, so that it cannot contradict the new files.

    Guaranteed, whatever error, Ctrl-C (SIGINT) or SIGTERM comes and when: ``outdir`` ends holding either every
    old file of ``files`` and ``stale`` as it was, or every new file of ``files`` and none of ``stale``, and no
    hidden staging or backup folder (only ``outdir`` itself may remain, created). The files are written into a
    hidden staging folder inside ``outdir``, then moved in by ``_commit``. SIGINT and SIGTERM are held all along:
    one that comes while writing stops the run before the next file (nothing changes), one that comes during the
    commit takes effect after it (the new set is complete); either way it is raised again on the way out."""
    outdir.mkdir(parents=True, exist_ok=True)
    _check_outputs(outdir, list(files), overwrite)
    removed = [n for n in stale if n not in files] if overwrite else []
    with _signals_held() as pending:
        staging = Path(tempfile.mkdtemp(prefix=".napari-nir-", dir=outdir))
        try:
            for name, entry in files.items():
                if pending:
                    break
                _write_file(staging / name, *entry)
            if not pending:
                return _commit(outdir, staging, list(files), removed)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    raise KeyboardInterrupt  # reached only when a held signal's own handler did not raise (the CLI's all do)


def _write_file(path: Path, kind: str, payload, meta, channels) -> None:
    from . import io

    if kind == "tiff":
        io.write_tiff(path, payload, meta, channels=channels)
    elif kind == "png":
        io.write_png(path, payload)
    elif kind == "npy":
        np.save(path, payload, allow_pickle=False)
    else:
        io.write_json(path, payload)


def _commit(outdir: Path, staging: Path, names: list[str], removed: list[str]) -> list[Path]:
    """Move the staged ``names`` into ``outdir`` and take ``removed`` out of it as one transaction: the old files
    of both first go into a hidden backup folder, then the new ones come in; on any exception the new ones go back
    to ``staging`` and the old ones to their place (roll back). Call it with the signals held."""
    backup = Path(tempfile.mkdtemp(prefix=".napari-nir-old-", dir=outdir))
    saved, placed = [], []
    try:
        for name in (*names, *removed):
            if os.path.lexists(outdir / name):
                os.replace(outdir / name, backup / name)
                saved.append(name)
        for name in names:
            os.replace(staging / name, outdir / name)
            placed.append(name)
    except BaseException:
        try:
            for name in placed:
                os.replace(outdir / name, staging / name)
            for name in saved:
                os.replace(backup / name, outdir / name)
        except OSError as exc:  # keep the backup: the old files are there
            raise OSError(f"could not put the previous outputs back into {outdir} after an error; they are in "
                          f"{backup}") from exc
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return [outdir / name for name in names]


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM for the block: one that comes is only recorded in the list yielded, and raised
    again (to the handler that was there) when the block is left, after its ``finally`` clauses. The Python-level
    handlers are swapped rather than the signal mask blocked, since the kernel may deliver a signal to any thread
    that does not block it (torch's, tqdm's) and Python then runs the handler in the main thread anyway. Signals
    set to be ignored stay ignored. Only the main thread can swap handlers; elsewhere nothing is held."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
        yield pending
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if pending:
            signal.raise_signal(pending[0])


def _report(fit, written: list[Path], outdir: Path) -> None:
    prov = fit.provenance()
    psnr = prov.get("final_psnr_db")
    seconds = prov.get("seconds")
    params = prov.get("parameters", {})
    verb = f"separated (task={params['task']})" if params.get("task") else "fused"
    parts = [f"{verb} with motion={params.get('motion', '?')}"]
    if psnr is not None:
        parts.append(f"reconstruction PSNR {psnr:.2f} dB")
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    print(", ".join(parts))
    found = fit.diagnostics()
    if found.verdict != "ok":
        print(f"verdict: {found.verdict.upper()}, the fit may not explain the frames (diagnostics.json, residual.tif):")
        for reason in found.reasons:
            print(f"  - {reason}")
    else:
        print("verdict: ok (diagnostics.json)")
    print(f"wrote {len(written)} files to {outdir}{os.sep}:")
    for path in written:
        print(f"  {path}")


def _corner_error(fitted, truth, shape) -> float | None:
    """Mean corner distance (pixels) between frame -> frame 0 maps of fitted and true homographies, or None."""
    if fitted is None or truth is None:
        return None
    fitted, truth = np.asarray(fitted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if fitted.shape != truth.shape or fitted.ndim != 3:
        return None
    h, w = shape
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [w - 1, h - 1, 1], [0, h - 1, 1]], dtype=np.float64).T
    errors = []
    for t in range(1, len(fitted)):
        a = np.linalg.inv(fitted[0]) @ fitted[t] @ corners
        b = np.linalg.inv(truth[0]) @ truth[t] @ corners
        errors.append(np.linalg.norm(a[:2] / a[2] - b[:2] / b[2], axis=0).mean())
    return float(np.mean(errors)) if errors else None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
